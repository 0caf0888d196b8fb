"""The ``cpp`` backend of the generator ensemble: csrc/generator/generator_cpu.cpp, fp32 CPU tensors.

The first layer needs no kernel of its own on the CPU: ``baddbmm`` over the label rows
gathered from Wy is already one batched GEMM. The convolutions are the extension's
sub-pixel im2col + sgemm per generator (see the source's header for why not oneDNN's
grouped convolution). Built on first use with the moment kernels (one extension).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import extensions


def check(x: Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"{x.device.type} tensors (the cpp backend is for CPU tensors)"
    if x.dtype != torch.float32:
        return f"{x.dtype} generator parameters (the cpp generator kernels take fp32)"
    return extensions.unavailable("cpu")


def _ext():
    return extensions.load("cpu")[0]


def _linear_gather(z, wz, wy, local):
    rows = torch.arange(z.shape[0], device=z.device).unsqueeze(1)
    h = torch.baddbmm(wy[rows, local], z, wz)
    return h, h.sum(1), h.square().sum(1)


def _conv_forward(x, scale, shift, weight, bias, upsample, slope, tanh, stats):
    return tuple(_ext().generator_conv_forward(x, scale, shift, weight, bias, int(upsample), float(slope), bool(tanh)))


def _conv_backward(x, scale, shift, weight, y, dy, ds1, ds2, upsample, slope, tanh):
    dx, dscale, dshift, dweight = _ext().generator_conv_backward(
        x, scale, shift, weight, y, dy, ds1, ds2, int(upsample), float(slope), bool(tanh))
    if scale is None:
        return dx, None, None, dweight
    return dx, dscale, dshift, dweight


LAUNCHERS = {"linear_gather": _linear_gather, "conv_forward": _conv_forward, "conv_backward": _conv_backward}
