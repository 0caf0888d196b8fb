"""The ``triton`` backend: the kernels of :mod:`fastdfd.kernels` behind the fused custom ops.

Serves fp16/bf16/fp32 CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (how the
CPU CI runs these kernels). Anything else falls back to the next backend. The kernels are
imported on first use: importing fastdfd never imports triton.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .fused import LAUNCHERS, register_fused_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MISSING: list[str | None] = []  # memo (a plain global: torch.compile traces dispatch through here)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


# run eagerly under torch.compile's trace (the import would break the graph), kept as a constant
@torch.compiler.assume_constant_result
def _triton_missing() -> str | None:
    if not _MISSING:
        try:
            import triton  # noqa: F401

            _MISSING.append(None)
        except Exception as e:  # not installed, or broken for this platform
            _MISSING.append(f"triton is not importable ({type(e).__name__}: {e})")
    return _MISSING[0]


def check(x: Tensor) -> str | None:
    missing = _triton_missing()
    if missing:
        return missing
    if x.dtype not in SUPPORTED_DTYPES:
        return f"{x.dtype} inputs (the kernels take fp16, bf16 and fp32)"
    if x.device.type == "cuda" or (x.device.type == "cpu" and interpreting()):
        return None
    return f"{x.device.type} tensors (needs CUDA, or CPU with TRITON_INTERPRET=1)"


def check_finalize(s1: Tensor) -> str | None:
    if s1.dtype != torch.float32:
        return f"{s1.dtype} sums (the finalize kernel takes fp32)"
    return check(s1)


@functools.lru_cache(maxsize=None)
def _programs(device_type: str, index: int | None) -> int:
    """Programs that fill the chip: a few waves over the SMs (small under the interpreter)."""
    if device_type == "cuda":
        return 4 * torch.cuda.get_device_properties(index or 0).multi_processor_count
    return 4


def programs_for(x: Tensor) -> int:
    return _programs(x.device.type, x.device.index)


def _tap_forward(x, mean, var, weight, bias, eps, groups, write_y):
    from fastdfd.kernels.moment_tap import tap_forward

    return tap_forward(x, mean, var, weight, bias, eps, groups, write_y, programs_for(x))


def _tap_backward(x, dy, ds1, ds2, mean, var, weight, eps, groups):
    from fastdfd.kernels.moment_tap import tap_backward

    return tap_backward(x, dy, ds1, ds2, mean, var, weight, eps, groups, programs_for(x))


def _finalize_forward(*args):
    from fastdfd.kernels.moment_finalize import finalize_forward

    return finalize_forward(*args)


def _finalize_backward(*args):
    from fastdfd.kernels.moment_finalize import finalize_backward

    return finalize_backward(*args)


LAUNCHERS["triton"] = {
    "tap_forward": _tap_forward,
    "tap_backward": _tap_backward,
    "finalize_forward": _finalize_forward,
    "finalize_backward": _finalize_backward,
}
register_fused_backend("triton", check, check_finalize)
