"""The ``cuda`` backend of the moment ops: csrc/moment/moment_cuda.cu behind the custom ops, for CUDA tensors.

Built on first use with nvcc (needs a CUDA build of torch and CUDA_HOME). Not first in the
default order on GPUs until the GPU suite has measured it against ``triton``; select it
with ``fastdfd.backend("cuda")`` or ``FASTDFD_BACKEND=cuda``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastdfd.kernels.moment.layout import KIND_IDS, kernel_layout, like_strides

from ..activation import refuse_epilogue
from ... import extensions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The kernels have no activation epilogue yet: the dispatch applies the activation after the tap
# (fastdfd/ops/moment/dispatch.py), so these launchers only ever see identity.
FUSES_ACTIVATION = False
FUSES_RESIDUAL = False  # no residual operand: the dispatch adds a residual after the tap (one more pass)


def check(x: Tensor) -> str | None:
    if x.device.type != "cuda":
        return f"{x.device.type} tensors (the cuda backend is for CUDA tensors)"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"{x.dtype} inputs (the kernels take fp16, bf16 and fp32)"
    return extensions.unavailable("cuda")


def check_finalize(s1: Tensor) -> str | None:
    if s1.dtype != torch.float32:
        return f"{s1.dtype} sums (the finalize kernel takes fp32)"
    return check(s1)


def _ext():
    return extensions.load("cuda")[0]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _stream(x: Tensor) -> int:
    """The current stream of x's device (the binding launches under a device guard on x's device)."""
    return torch.cuda.current_stream(x.device).cuda_stream


def _tap_forward(x, mean, var, weight, bias, eps, groups, write_y, act=0, slope=0.0, residual=None):
    refuse_epilogue("cuda", act, residual)
    x, strides = kernel_layout(x)
    y, s1, s2 = _ext().tap_forward(x, mean, var, weight, bias, float(eps), int(groups), bool(write_y), *strides,
                                   _sm_count(x.device.index or 0), _stream(x))
    return (y if write_y else None), s1, s2


def _tap_backward(x, dy, ds1, ds2, mean, var, weight, bias, eps, groups, act=0, slope=0.0, residual=None):
    refuse_epilogue("cuda", act, residual)
    x, strides = kernel_layout(x)
    dy = like_strides(dy, x)
    return _ext().tap_backward(x, dy, ds1, ds2, mean, var, weight, float(eps), int(groups), *strides, _stream(x)), None


def _finalize_forward(s1, s2, count, var, eps, offsets, kind):
    return _ext().finalize_forward(s1, s2, count, var, eps, offsets, KIND_IDS[kind], _stream(s1))


def _finalize_backward(s1, s2, count, var, eps, offsets, dout, kind):
    ds1, ds2 = _ext().finalize_backward(s1, s2, count, var, eps, offsets, dout, KIND_IDS[kind], _stream(s1))
    return ds1, ds2


LAUNCHERS = {
    "tap_forward": _tap_forward,
    "tap_backward": _tap_backward,
    "finalize_forward": _finalize_forward,
    "finalize_backward": _finalize_backward,
}
