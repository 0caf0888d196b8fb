"""The ``cpp`` backend of the moment ops: csrc/moment/moment_cpu.cpp's kernels, for CPU tensors.

Built on first use (see :mod:`fastdfd.ops.extensions`); the default on the CPU when the
build succeeds, else the ``torch`` backend serves (after one warning).

Two ways in, both with the activation and residual epilogues. Eager, :data:`EAGER` calls the ops the extension
registers with the dispatcher
(``torch.ops.fastdfd_cpu.*``, csrc/moment/moment_library_cpu.cpp), whose casts, layout rule and
autograd run in C++: a tiny layer's tap costs tens of microseconds instead of hundreds. While
``torch.compile`` traces, :data:`LAUNCHERS` serve the Python custom ops (:mod:`..custom_op`), which
carry the fake implementations the compiler needs (when the tap is not traced as aten ops instead).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdfd.kernels.moment.layout import KIND_IDS, kernel_layout, like_strides

from ... import extensions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FUSES_ACTIVATION = True  # the kernels apply the activation epilogue in the tap's pass (act, slope)
FUSES_RESIDUAL = True  # and add a residual before it, writing its gradient in the backward's pass


def check(x: Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"{x.device.type} tensors (the cpp backend is for CPU tensors)"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"{x.dtype} inputs"
    return extensions.unavailable("cpu")


def _ext():
    return extensions.load("cpu")[0]


def _tap_forward(x, mean, var, weight, bias, eps, groups, write_y, act=0, slope=0.0, residual=None):
    x, strides = kernel_layout(x)
    residual = like_strides(residual, x)  # the kernels read it with x's strides
    y, s1, s2 = _ext().tap_forward(x, mean, var, weight, bias, float(eps), int(groups), bool(write_y), *strides,
                                   int(act), float(slope), residual)
    return (y if write_y else None), s1, s2


def _tap_backward(x, dy, ds1, ds2, mean, var, weight, bias, eps, groups, act=0, slope=0.0, residual=None):
    x, strides = kernel_layout(x)
    dy = like_strides(dy, x)
    residual = like_strides(residual, x) if dy is not None and act else None  # identity: dr is dy
    dx, dr = _ext().tap_backward(x, dy, ds1, ds2, mean, var, weight, bias, float(eps), int(groups), *strides,
                                 int(act), float(slope), residual)
    return dx, (dr if residual is not None else None)


def _finalize_forward(s1, s2, count, var, eps, offsets, kind):
    return _ext().finalize_forward(s1, s2, count, var, eps, offsets, KIND_IDS[kind])


def _finalize_backward(s1, s2, count, var, eps, offsets, dout, kind):
    ds1, ds2 = _ext().finalize_backward(s1, s2, count, var, eps, offsets, dout, KIND_IDS[kind])
    return ds1, ds2


def _eager_tap(x, mean, var, weight, bias, eps, groups, write_y, act=0, slope=0.0, residual=None):
    _ext()  # the extension's load registers torch.ops.fastdfd_cpu
    return torch.ops.fastdfd_cpu.tap(x, mean, var, weight, bias, float(eps), int(groups), bool(write_y), int(act),
                                     float(slope), residual)


def _eager_finalize(s1, s2, count, var, eps, offsets, kind):
    _ext()
    return torch.ops.fastdfd_cpu.finalize(s1, s2, count, var, eps, offsets, KIND_IDS[kind])


# the eager entries: tap(x, mean, var, weight, bias, eps, groups, write_y, act, slope, residual) -> (y, S1, S2) and
# finalize(S1, S2, count, var, eps, offsets, kind) -> [L, G], differentiable, the custom ops' contract
EAGER = {"tap": _eager_tap, "finalize": _eager_finalize}

LAUNCHERS = {
    "tap_forward": _tap_forward,
    "tap_backward": _tap_backward,
    "finalize_forward": _finalize_forward,
    "finalize_backward": _finalize_backward,
}
