"""Teachers and students from the model zoos: ``timm:NAME`` and ``torchvision:NAME[:WEIGHTS]``.

:func:`fastdfd.models.create_model` hands every name with one of these prefixes to
:func:`create_zoo_model`, so the CLI (``--teacher``, ``--student``, ``--model``) and the
recipes (``teacher.model``, ``student.model``) take them wherever they take fastdfd's own
registry names:

- ``timm:NAME`` -> ``timm.create_model(NAME, pretrained=..., num_classes=..., in_chans=...)``;
  NAME may carry a pretrained tag (``resnet50.a1_in1k``), which picks timm's configuration;
- ``torchvision:NAME`` -> ``torchvision.models.get_model(NAME, weights=..., num_classes=...)``,
  one of torchvision's image classifiers; they take 3-channel images.

Random weights unless asked otherwise. Published weights are loaded by the zoos' own loaders:

- timm: ``pretrained=True`` (``--pretrained``, recipe ``teacher.pretrained = true``) goes to timm,
  which reads its Hugging Face hub cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1``
  reads a filled cache without the network) or torch.hub's cache for url-only weights, and
  downloads what is missing where there is a network. ``pretrained_file=FILE``
  (``--pretrained-file``) loads a local file instead, through timm's
  ``pretrained_cfg_overlay=dict(file=FILE)`` (timm drops the classifier when ``num_classes``
  is not the pretrained head's, and adapts the stem to ``in_channels``);
- torchvision: a weights enum member, ``torchvision:resnet50:IMAGENET1K_V2`` (or ``:DEFAULT``),
  or ``weights="IMAGENET1K_V2"`` (``--weights-enum``, recipe ``teacher.weights_enum``);
  ``pretrained=True`` means ``DEFAULT``. torch.hub reads ``$TORCH_HOME/hub/checkpoints/<file>``
  (the file name of the enum's url) and downloads it when missing.

With no network and nothing cached, the error names the cache path to fill and the file to put
there. A trained network's own weights still come from a file
(:func:`fastdfd.models.weights.load_weights`, ``--weights``). Neither package is a dependency of
fastdfd: each is imported on first use, and a missing one is an ImportError naming the pip command
and the spec.
"""

from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

ZOOS = ("timm", "torchvision")
# the module each zoo's names are looked up in
_MODULES = {"timm": "timm", "torchvision": "torchvision.models"}


def is_zoo_spec(name: str) -> bool:
    """True for ``timm:...`` and ``torchvision:...`` (prefix case-insensitive)."""
    return isinstance(name, str) and name.partition(":")[0].strip().lower() in ZOOS and ":" in name


def parse_zoo_spec(spec: str) -> tuple[str, str, str | None]:
    """``'timm:resnet18'`` -> ``('timm', 'resnet18', None)``; ``'torchvision:resnet50:IMAGENET1K_V2'``
    -> ``('torchvision', 'resnet50', 'IMAGENET1K_V2')``. ValueError for an empty name, an empty weights
    part, or a third part on a timm name."""
    zoo, _, name = spec.partition(":")
    zoo, name = zoo.strip().lower(), name.strip()
    if zoo not in ZOOS:
        raise ValueError(f"model {spec!r}: expected a zoo prefix, one of {', '.join(f'{z}:' for z in ZOOS)}")
    name, sep, weights = (part.strip() for part in name.partition(":"))
    if not name:
        raise ValueError(f"model {spec!r}: no model name after '{zoo}:' (e.g. {zoo}:resnet18)")
    if not sep:
        return zoo, name, None
    if zoo == "timm":
        # timm reads hf-hub:/local-dir: names from the network or the disk
        raise ValueError(f"model {spec!r}: timm model names have no ':' (hf-hub: and local-dir: names are not "
                         f"taken); give NAME or NAME.TAG with pretrained=True (--pretrained) for timm's published "
                         f"weights, and pretrained_file=FILE (--pretrained-file) for a local file")
    if not weights or ":" in weights:
        raise ValueError(f"model {spec!r}: expected torchvision:NAME:WEIGHTS, a member of the model's weights "
                         f"enum (e.g. torchvision:resnet50:IMAGENET1K_V2 or torchvision:resnet50:DEFAULT)")
    return zoo, name, weights


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


def _is_fetch_error(e: BaseException) -> bool:
    """A failed download or cache miss: an OSError (urllib's URLError, huggingface_hub's
    LocalEntryNotFoundError, a refused connection) or an error of the HTTP stacks."""
    root = type(e).__module__.partition(".")[0]
    return isinstance(e, OSError) or root in ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")


def _cause(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def torch_hub_checkpoints() -> Path:
    """torch.hub's download cache for weight files: ``$TORCH_HOME/hub/checkpoints`` (torch.hub.get_dir())."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``) as huggingface_hub reads it."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))


def _url_file(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _timm_unavailable(spec: str, name: str, timm, kwargs: dict, e: BaseException) -> FileNotFoundError:
    """The error for timm weights that could not be read or fetched: where timm looked, what to put there."""
    cfg = None
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001  (only for the message)
        pass
    cfg = {k: getattr(cfg, k, None) for k in ("hf_hub_id", "hf_hub_filename", "url")}
    cfg.update({k: v for k, v in (kwargs.get("pretrained_cfg_overlay") or {}).items() if k in cfg})
    hub_id, url = cfg["hf_hub_id"], cfg["url"]
    cache_dir = kwargs.get("cache_dir")
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        filename = cfg["hf_hub_filename"] or "model.safetensors (or pytorch_model.bin)"
        folder = Path(cache_dir or hf_hub_cache()) / f"models--{repo.replace('/', '--')}"
        where = (f"the Hugging Face cache {folder} (snapshots/<commit>/{filename} and refs/{revision or 'main'}: "
                 f"run `hf download {repo}` where there is a network and copy {folder} here; "
                 f"HF_HOME / HF_HUB_CACHE choose the cache, HF_HUB_OFFLINE=1 reads it without the network)")
    elif url:
        folder = Path(cache_dir) if cache_dir else torch_hub_checkpoints()
        where = f"torch.hub's cache: {folder / _url_file(url)} (from {url})"
    else:
        where = "timm's cache (this configuration names no hub repository or url)"
    return FileNotFoundError(
        f"model {spec!r}: timm's pretrained weights could not be read from its cache nor downloaded ({_cause(e)}); "
        f"put them in {where}, or pass a local file: pretrained_file=FILE (--pretrained-file FILE; timm's "
        f"pretrained_cfg_overlay=dict(file=FILE))")


def _create_timm(spec: str, name: str, timm, num_classes, in_channels, pretrained: bool,
                 pretrained_file, kwargs: dict) -> nn.Module:
    arch = name.partition(".")[0]  # 'resnet50.a1_in1k': the tag selects timm's pretrained config
    known = list(timm.list_models())
    if arch not in set(known):
        raise _unknown(spec, arch, known, "timm")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_chans"] = in_channels
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model {spec!r}: pretrained_file not found: {path}")
        kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": str(path)}
        pretrained = True
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        if pretrained_file is None and _is_fetch_error(e):
            raise _timm_unavailable(spec, name, timm, kwargs, e) from e
        if isinstance(e, RuntimeError) and "No pretrained weights exist" in str(e):
            raise ValueError(f"model {spec!r}: timm has no pretrained weights for {name!r}; pick a tag that has "
                             f"(timm.list_pretrained('{arch}*')) or pass pretrained_file=FILE") from e
        if pretrained_file is not None:
            raise ValueError(f"model {spec!r}: timm could not load pretrained_file {pretrained_file} "
                             f"({_cause(e)})") from e
        raise


def _torchvision_weights(spec: str, name: str, tvm, weights):
    """The weights enum member named ``weights`` (``'IMAGENET1K_V2'``, ``'DEFAULT'``,
    ``'ResNet50_Weights.IMAGENET1K_V2'`` or the member itself); ValueError listing the valid names."""
    enum = tvm.get_model_weights(name)
    if isinstance(weights, enum):
        return weights
    if not isinstance(weights, str):
        raise ValueError(f"model {spec!r}: weights={weights!r} is not a member of {enum.__name__}")
    member = weights.strip()
    if member.startswith(f"{enum.__name__}."):
        member = member[len(enum.__name__) + 1:]
    valid = list(enum.__members__)  # aliases included: DEFAULT
    if member not in valid:
        raise ValueError(f"model {spec!r}: unknown weights {weights!r} for torchvision's {name}; "
                         f"{enum.__name__} has {', '.join(valid)}")
    return enum[member]


def _create_torchvision(spec: str, name: str, tvm, num_classes, in_channels, weights, kwargs: dict) -> nn.Module:
    known = _torchvision_classifiers(tvm)
    if name not in set(known):
        if name in set(tvm.list_models()):
            raise ValueError(f"model {spec!r} is not one of torchvision's image classifiers (a detection, "
                             f"segmentation, optical-flow or video model); fastdfd needs [N, classes] logits")
        raise _unknown(spec, name, known, "torchvision")
    if in_channels is not None and in_channels != 3:
        raise ValueError(f"model {spec!r}: torchvision's classifiers take 3-channel images, but {in_channels} "
                         f"channel(s) were asked for (the data's channels); use a timm model (timm:NAME builds "
                         f"any channel count) or 3-channel data")
    if weights is None:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return tvm.get_model(name, weights=None, **kwargs)
    member = _torchvision_weights(spec, name, tvm, weights)
    categories = len(member.meta.get("categories") or ())
    if num_classes is not None and categories and num_classes != categories:
        raise ValueError(f"model {spec!r}: the weights {type(member).__name__}.{member.name} have a {categories}-class "
                         f"head, but num_classes={num_classes} was asked for (the data's classes); torchvision "
                         f"keeps the head, so use data with {categories} classes, a timm teacher (timm:NAME "
                         f"--pretrained drops a head that does not fit), or no weights enum and --weights FILE")
    try:
        return tvm.get_model(name, weights=member, **kwargs)
    except Exception as e:
        if not _is_fetch_error(e):
            raise
        file = torch_hub_checkpoints() / _url_file(member.url)
        raise FileNotFoundError(
            f"model {spec!r}: torchvision's weights {type(member).__name__}.{member.name} are not in torch.hub's "
            f"cache and could not be downloaded ({_cause(e)}); put {member.url} at {file} (TORCH_HOME chooses the "
            f"cache), or build without weights and load the file with --weights FILE") from e


def create_zoo_model(spec: str, num_classes: int | None = None, in_channels: int | None = None, *,
                     pretrained: bool = False, pretrained_file: str | os.PathLike | None = None,
                     weights: Any = None, **kwargs: Any) -> nn.Module:
    """Build ``timm:NAME`` or ``torchvision:NAME[:WEIGHTS]``, with random weights unless asked otherwise.

    ``num_classes=None`` keeps the zoo's default (1000, or the pretrained head's); ``in_channels``
    becomes timm's ``in_chans``; torchvision's classifiers take 3 channels, and another count is a
    ValueError naming the spec and both counts. An unknown NAME is a ValueError listing close
    matches; other keyword arguments go to the zoo's constructor as they are.

    Published weights (the module docstring says where each zoo caches them):

    - ``pretrained=True``: timm's ``pretrained=True`` (a ``num_classes`` other than the pretrained
      head's drops the head, as timm does); for torchvision, the ``DEFAULT`` weights;
    - ``pretrained_file=FILE`` (timm): that file, through ``pretrained_cfg_overlay=dict(file=FILE)``;
    - ``weights=`` (torchvision) or the spec's third part: a member of the model's weights enum,
      by name (``'IMAGENET1K_V2'``, ``'DEFAULT'``) or itself; an unknown name is a ValueError listing
      the valid ones, and a ``num_classes`` other than its categories' count is a ValueError.

    Weights that are neither cached nor downloadable are a FileNotFoundError naming the cache path
    and the file to put there.
    """
    zoo, name, spec_weights = parse_zoo_spec(spec)
    if zoo == "timm":
        if weights is not None:
            raise ValueError(f"model {spec!r}: weights={weights!r} names a torchvision weights enum; timm takes "
                             f"pretrained=True (--pretrained; NAME.TAG picks the weights) or pretrained_file=FILE")
        return _create_timm(spec, name, import_zoo(zoo, spec), num_classes, in_channels, bool(pretrained),
                            pretrained_file, kwargs)
    if pretrained_file is not None:
        raise ValueError(f"model {spec!r}: pretrained_file is timm's; torchvision's weights come from a weights "
                         f"enum (torchvision:NAME:WEIGHTS, --weights-enum) or a state_dict file (--weights FILE)")
    if spec_weights is not None and weights is not None and str(weights).rpartition(".")[2] != spec_weights:
        raise ValueError(f"model {spec!r}: weights={weights!r} and the spec's {spec_weights!r} disagree; give one")
    weights = weights if weights is not None else spec_weights
    if weights is None and pretrained:
        weights = "DEFAULT"
    return _create_torchvision(spec, name, import_zoo(zoo, spec), num_classes, in_channels, weights, kwargs)


__all__ = ["ZOOS", "create_zoo_model", "hf_hub_cache", "import_zoo", "is_zoo_spec", "list_zoo_models",
           "parse_zoo_spec", "torch_hub_checkpoints", "zoo_status"]
