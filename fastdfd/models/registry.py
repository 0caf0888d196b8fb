"""Name -> factory registry for the networks used as teachers and students."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``fn(num_classes=..., **kw) -> nn.Module`` under ``name``."""

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
    """Build the registered model ``name``; ``num_classes=None`` keeps the factory default."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        available = ", ".join(list_models()) or "<none registered>"
        raise KeyError(f"unknown model {name!r}; available: {available}") from None
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return factory(**kwargs)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)
