"""The ``cpp`` backend of the moment ops: csrc/moment/moment_cpu.cpp behind the custom ops, for CPU tensors.

Built on first use (see :mod:`fastdfd.ops.extensions`); the default on the CPU when the
build succeeds, else the ``torch`` backend serves (after one warning).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdfd.kernels.moment.layout import KIND_IDS, kernel_layout, like_strides

from ... import extensions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check(x: Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"{x.device.type} tensors (the cpp backend is for CPU tensors)"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"{x.dtype} inputs"
    return extensions.unavailable("cpu")


def _ext():
    return extensions.load("cpu")[0]


def _tap_forward(x, mean, var, weight, bias, eps, groups, write_y):
    x, strides = kernel_layout(x)
    y, s1, s2 = _ext().tap_forward(x, mean, var, weight, bias, float(eps), int(groups), bool(write_y), *strides)
    return (y if write_y else None), s1, s2


def _tap_backward(x, dy, ds1, ds2, mean, var, weight, eps, groups):
    x, strides = kernel_layout(x)
    dy = like_strides(dy, x)
    return _ext().tap_backward(x, dy, ds1, ds2, mean, var, weight, float(eps), int(groups), *strides)


def _finalize_forward(s1, s2, count, var, eps, offsets, kind):
    return _ext().finalize_forward(s1, s2, count, var, eps, offsets, KIND_IDS[kind])


def _finalize_backward(s1, s2, count, var, eps, offsets, dout, kind):
    ds1, ds2 = _ext().finalize_backward(s1, s2, count, var, eps, offsets, dout, KIND_IDS[kind])
    return ds1, ds2


LAUNCHERS = {
    "tap_forward": _tap_forward,
    "tap_backward": _tap_backward,
    "finalize_forward": _finalize_forward,
    "finalize_backward": _finalize_backward,
}
