"""The ``triton`` backend of the moment ops: the kernels of kernels/moment/ behind the custom ops.

Serves fp16/bf16/fp32 CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (how the
CPU CI runs these kernels); anything else falls back to the next backend. The kernels are
imported on first use: importing fastdfd never imports triton.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ... import triton_runtime


FUSES_ACTIVATION = True  # the kernels apply the activation epilogue in the tap's pass (ACT, slope)
FUSES_RESIDUAL = True  # and add a residual before it (HAS_R), writing its gradient in the backward's pass


def check(x: Tensor) -> str | None:
    return triton_runtime.unavailable(x)


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


def _tap_forward(x, mean, var, weight, bias, eps, groups, write_y, act=0, slope=0.0, residual=None):
    from fastdfd.kernels.moment.tap import tap_forward

    return tap_forward(x, mean, var, weight, bias, eps, groups, write_y, programs_for(x), act, slope, residual)


def _tap_backward(x, dy, ds1, ds2, mean, var, weight, bias, eps, groups, act=0, slope=0.0, residual=None):
    from fastdfd.kernels.moment.tap import tap_backward

    return tap_backward(x, dy, ds1, ds2, mean, var, weight, eps, groups, programs_for(x), bias, act, slope, residual)


def _finalize_forward(*args):
    from fastdfd.kernels.moment.finalize import finalize_forward

    return finalize_forward(*args)


def _finalize_backward(*args):
    from fastdfd.kernels.moment.finalize import finalize_backward

    return finalize_backward(*args)


LAUNCHERS = {
    "tap_forward": _tap_forward,
    "tap_backward": _tap_backward,
    "finalize_forward": _finalize_forward,
    "finalize_backward": _finalize_backward,
}
