"""Name -> factory registry for the networks used as teachers and students.

Names with a zoo prefix, ``timm:NAME`` and ``torchvision:NAME[:WEIGHTS]``, are built by
:mod:`fastdfd.models.zoo` wherever a registry name is taken (random weights, or the zoo's published
weights through its own loader and cache: ``pretrained=True``, ``pretrained_file=``, ``weights=``).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

import torch.nn as nn

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}

ZOO_HINT = "timm:NAME or torchvision:NAME for the zoos' architectures"
# what create_model passes to the zoos only: their published weights
PRETRAINED_KEYS = ("pretrained", "pretrained_file", "weights")


class UnknownModelError(KeyError, ValueError):
    """An unknown registry name (a KeyError as before, and a ValueError so the CLI reports it plainly)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``fn(num_classes=..., **kw) -> nn.Module`` under ``name``."""
    if ":" in name:
        raise ValueError(f"model name {name!r}: ':' is reserved for the zoo prefixes ({ZOO_HINT})")

    def decorator(fn: ModelFactory) -> ModelFactory:
        old = _REGISTRY.get(name)
        # Re-importing the same module (e.g. importlib.reload) must not fail,
        # but two different factories claiming one name is a bug.
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"model name {name!r} already registered by {old.__module__}.{old.__qualname__}"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``, or a zoo model ``timm:NAME`` / ``torchvision:NAME[:WEIGHTS]``
    (:func:`fastdfd.models.zoo.create_zoo_model`, which also takes ``pretrained=True``,
    ``pretrained_file=FILE`` (timm) and ``weights=`` (torchvision)); ``num_classes=None`` keeps the
    factory default.

    An unknown registry name raises :class:`UnknownModelError` (a KeyError and a ValueError)
    listing the registered names; published weights asked of a registry model are a ValueError.
    """
    from .zoo import create_zoo_model, is_zoo_spec

    if is_zoo_spec(name):
        return create_zoo_model(name, num_classes=num_classes, **kwargs)
    try:
        factory = _REGISTRY[name]
    except KeyError:
        available = ", ".join(list_models()) or "<none registered>"
        close = difflib.get_close_matches(str(name), list_models(), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; available: {available}; or {ZOO_HINT}") from None
    for key in PRETRAINED_KEYS:
        if kwargs.get(key) not in (None, False):
            raise ValueError(f"model {name!r}: {key}={kwargs[key]!r} takes a zoo model (timm:NAME or "
                             f"torchvision:NAME); fastdfd's own models load a trained state_dict (--weights FILE)")
        kwargs.pop(key, None)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return factory(**kwargs)


def list_models() -> list[str]:
    """Sorted names of all registered models (the zoos' names are listed by
    :func:`fastdfd.models.zoo.list_zoo_models`)."""
    return sorted(_REGISTRY)
