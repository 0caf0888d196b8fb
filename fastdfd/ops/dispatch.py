"""Backend dispatch: one public function per op, the implementation chosen here.

Each op (``moment_sums``, ``moment_tap``, ``moment_finalize``, ``ensemble_forward``) has one
public entry point in its folder's ``api.py`` (:mod:`fastdfd.ops.moment.api`,
:mod:`fastdfd.ops.generator.api`); the folder's ``dispatch.py`` registers each backend's
implementation under the op's name. Callers never branch on the backend. The choice, in order:

1. the innermost ``with fastdfd.backend(name):`` block,
2. the ``FASTDFD_BACKEND`` environment variable,
3. the fastest backend available for the tensor's device (``PREFERENCE``).

A requested backend that cannot serve the call (not built, not installed, or not for
this device) falls back to the default order with one warning per (backend, reason):
a missing optional extension must never stop a training run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")

# Fastest first. "torch" is last everywhere: it is the oracle and serves every device.
# On GPUs "triton" leads "cuda" until the GPU suite has measured the two on a card.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    # Returns None when the backend can serve this input tensor, else a reason string.
    check: Callable[[torch.Tensor], str | None]


_REGISTRY: dict[str, dict[str, _Impl]] = {}
# Innermost ``backend()`` choice. A plain process-wide stack (not a ContextVar) so that
# torch.compile can trace dispatch: dynamo reads (and guards on) module globals.
_OVERRIDE: list[str | None] = [None]
_WARNED: set[tuple[str, str]] = set()


def _always(_x: torch.Tensor) -> str | None:
    return None


def register(op: str, backend_name: str, check: Callable[[torch.Tensor], str | None] = _always):
    """Decorator: register ``fn`` as ``backend_name``'s implementation of ``op``."""
    if backend_name not in BACKENDS:
        raise ValueError(f"unknown backend {backend_name!r}; expected one of {BACKENDS}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend_name] = _Impl(fn, check)
        return fn

    return wrap


def _validate_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def requested_backend() -> str | None:
    """The backend asked for by context manager or environment, or None for automatic."""
    name = _OVERRIDE[-1]
    if name is not None:
        return name
    env = os.environ.get("FASTDFD_BACKEND", "").strip()
    return _validate_name(env, "FASTDFD_BACKEND") if env else None


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Run the enclosed ops on backend ``name`` (None restores automatic choice)."""
    _OVERRIDE.append(None if name is None else _validate_name(name, "fastdfd.backend"))
    try:
        yield
    finally:
        _OVERRIDE.pop()


def _warn_once(name: str, reason: str) -> None:
    if (name, reason) not in _WARNED:
        _WARNED.add((name, reason))
        warnings.warn(f"fastdfd: backend {name!r} unavailable ({reason}); falling back", RuntimeWarning, stacklevel=3)


def resolve(op: str, x: torch.Tensor) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for input ``x`` (its device and dtype): (backend name, fn)."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    wanted = requested_backend()
    if wanted is not None:
        impl = impls.get(wanted)
        reason = f"no {op} implementation" if impl is None else impl.check(x)
        if reason is None:
            return wanted, impl.fn
        _warn_once(wanted, reason)
    for name in PREFERENCE.get(x.device.type, ("torch",)):
        impl = impls.get(name)
        if impl is not None and impl.check(x) is None:
            return name, impl.fn
    return "torch", impls["torch"].fn


def unavailable(op: str, name: str, x: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run ``op`` on inputs like ``x`` here (its own reason), or None when it can."""
    impl = _REGISTRY.get(op, {}).get(name)
    return f"no {op} implementation registered for {name!r}" if impl is None else impl.check(x)


def available(op: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run ``op`` on inputs of this device and dtype right now."""
    probe = torch.empty(0, device=device, dtype=dtype)
    return [n for n, impl in _REGISTRY.get(op, {}).items() if impl.check(probe) is None]
