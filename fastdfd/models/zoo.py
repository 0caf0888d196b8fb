"""Teachers and students from the model zoos: ``timm:NAME`` and ``torchvision:NAME``.

:func:`fastdfd.models.create_model` hands every name with one of these prefixes to
:func:`create_zoo_model`, so the CLI (``--teacher``, ``--student``, ``--model``) and the
recipes (``teacher.model``, ``student.model``) take them wherever they take fastdfd's own
registry names:

- ``timm:NAME`` -> ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)``;
  NAME may carry a pretrained tag (``resnet50.a1_in1k``), which picks timm's configuration only;
- ``torchvision:NAME`` -> ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``,
  one of torchvision's image classifiers; they take 3-channel images.

Nothing is ever downloaded: the networks are built with random weights (``pretrained=False``
/ ``weights=None``), and a trained network's weights come from a file
(:func:`fastdfd.models.weights.load_weights`, ``--weights``), in the layouts timm and
torchvision save. Neither package is a dependency of fastdfd: each is imported on first use,
and a missing one is an ImportError naming the pip command and the spec.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from torch import nn

ZOOS = ("timm", "torchvision")
# the module each zoo's names are looked up in
_MODULES = {"timm": "timm", "torchvision": "torchvision.models"}


def is_zoo_spec(name: str) -> bool:
    """True for ``timm:...`` and ``torchvision:...`` (prefix case-insensitive)."""
    return isinstance(name, str) and name.partition(":")[0].strip().lower() in ZOOS and ":" in name


def parse_zoo_spec(spec: str) -> tuple[str, str]:
    """``'timm:resnet18'`` -> ``('timm', 'resnet18')``; ValueError for an empty or nested name."""
    zoo, _, name = spec.partition(":")
    zoo, name = zoo.strip().lower(), name.strip()
    if zoo not in ZOOS:
        raise ValueError(f"model {spec!r}: expected a zoo prefix, one of {', '.join(f'{z}:' for z in ZOOS)}")
    if not name:
        raise ValueError(f"model {spec!r}: no model name after '{zoo}:' (e.g. {zoo}:resnet18)")
    if ":" in name:
        # timm reads hf-hub:/local-dir: names from the network or the disk even without pretrained weights
        raise ValueError(f"model {spec!r}: {zoo} model names have no ':' (hub and local-dir sources are not "
                         f"supported: fastdfd never downloads; give the architecture's name and --weights FILE)")
    return zoo, name


def import_zoo(zoo: str, spec: str | None = None):
    """The zoo's module (``timm`` or ``torchvision.models``), or an ImportError naming the pip command."""
    what = spec or f"{zoo}:NAME"
    try:
        return importlib.import_module(_MODULES[zoo])
    except ModuleNotFoundError as e:
        if e.name in (zoo, _MODULES[zoo]):
            raise ImportError(f"{what} needs {zoo}, which is not installed: pip install {zoo}") from e
        detail = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001  (a build that does not match torch fails in many ways)
        detail = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    import torch

    raise ImportError(f"{what} needs {zoo}, which is installed but does not import ({detail}); "
                      f"pip install {zoo} (a build that matches torch {torch.__version__})")


def zoo_status() -> dict[str, str]:
    """Each zoo: ``'timm 1.0.3'``, or why it cannot be used (for ``fastdfd models``)."""
    status = {}
    for zoo in ZOOS:
        try:
            import_zoo(zoo)
            version = getattr(importlib.import_module(zoo), "__version__", "?")
            status[zoo] = f"{zoo} {version}"
        except ImportError as e:
            status[zoo] = str(e).replace(f"{zoo}:NAME needs {zoo}, which is ", "")
    return status


def _torchvision_classifiers(tvm) -> list[str]:
    return list(tvm.list_models(module=tvm))


def list_zoo_models(zoo: str, pattern: str = "") -> list[str]:
    """The names ``zoo:NAME`` accepts (timm: its architectures; torchvision: its image classifiers),
    those containing ``pattern`` only when given."""
    if zoo not in ZOOS:
        raise ValueError(f"unknown zoo {zoo!r}; expected one of {', '.join(ZOOS)}")
    module = import_zoo(zoo)
    names = list(module.list_models()) if zoo == "timm" else _torchvision_classifiers(module)
    return sorted(n for n in names if pattern.lower() in n.lower())


def _unknown(spec: str, name: str, known: list[str], zoo: str) -> ValueError:
    close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
    hint = f"close matches: {', '.join(f'{zoo}:{c}' for c in close)}" if close else "no close match"
    return ValueError(f"unknown model {spec!r}: {zoo} has no model {name!r}; {hint} "
                      f"(fastdfd models --zoo {zoo} lists them all)")


def create_zoo_model(spec: str, num_classes: int | None = None, in_channels: int | None = None,
                     **kwargs: Any) -> nn.Module:
    """Build ``timm:NAME`` or ``torchvision:NAME`` with random weights (never downloads).

    ``num_classes=None`` keeps the zoo's default (1000); ``in_channels`` becomes timm's
    ``in_chans``; torchvision's classifiers take 3 channels, and another count is a ValueError
    naming the spec and both counts. An unknown NAME is a ValueError listing close matches;
    other keyword arguments go to the zoo's constructor as they are.
    """
    zoo, name = parse_zoo_spec(spec)
    for key in ("pretrained", "weights", "pretrained_cfg_overlay", "checkpoint_path"):
        if kwargs.get(key):
            raise ValueError(f"model {spec!r}: {key}={kwargs[key]!r} is not supported; fastdfd builds zoo models "
                             "with random weights (never downloads) and loads trained weights from a file "
                             "(--weights, fastdfd.models.weights.load_weights)")
        kwargs.pop(key, None)
    module = import_zoo(zoo, spec)
    if zoo == "timm":
        arch = name.partition(".")[0]  # 'resnet50.a1_in1k': the tag only selects timm's pretrained config
        known = list(module.list_models())
        if arch not in set(known):
            raise _unknown(spec, arch, known, zoo)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None:
            kwargs["in_chans"] = in_channels
        return module.create_model(name, pretrained=False, **kwargs)

    known = _torchvision_classifiers(module)
    if name not in set(known):
        if name in set(module.list_models()):
            raise ValueError(f"model {spec!r} is not one of torchvision's image classifiers (a detection, "
                             f"segmentation, optical-flow or video model); fastdfd needs [N, classes] logits")
        raise _unknown(spec, name, known, zoo)
    if in_channels is not None and in_channels != 3:
        raise ValueError(f"model {spec!r}: torchvision's classifiers take 3-channel images, but {in_channels} "
                         f"channel(s) were asked for (the data's channels); use a timm model (timm:NAME builds "
                         f"any channel count) or 3-channel data")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return module.get_model(name, weights=None, **kwargs)


__all__ = ["ZOOS", "create_zoo_model", "import_zoo", "is_zoo_spec", "list_zoo_models", "parse_zoo_spec",
           "zoo_status"]
