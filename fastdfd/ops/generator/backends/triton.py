"""The ``triton`` backend of the generator ensemble: kernels/generator/linear_gather.py and conv.py.

Serves the same tensors as the moment kernels (fp16/bf16/fp32 on CUDA, CPU under
TRITON_INTERPRET=1). Imported lazily: importing fastdfd never imports triton. The launchers
check their operands and launch on the tensors' device themselves.
"""

from __future__ import annotations

from torch import Tensor

from ... import triton_runtime


def check(x: Tensor) -> str | None:
    return triton_runtime.unavailable(x)


def _linear_gather(z, wz, wy, local):
    from fastdfd.kernels.generator.linear_gather import linear_gather

    return linear_gather(z, wz, wy, local, stats=True)


def _conv_forward(x, scale, shift, weight, bias, upsample, slope, tanh, stats):
    from fastdfd.kernels.generator.conv import conv_forward

    return conv_forward(x, scale, shift, weight, bias, upsample=upsample, slope=slope, tanh=tanh, stats=stats)


def _conv_backward(x, scale, shift, weight, y, dy, ds1, ds2, upsample, slope, tanh):
    from fastdfd.kernels.generator.conv import conv_backward

    return conv_backward(x, scale, shift, weight, y, dy, ds1, ds2, upsample=upsample, slope=slope, tanh=tanh)


LAUNCHERS = {"linear_gather": _linear_gather, "conv_forward": _conv_forward, "conv_backward": _conv_backward}
