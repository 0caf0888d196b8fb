"""The ``triton`` backend of the generator ensemble: kernels/generator_fc.py and generator_conv.py.

Serves the same tensors as the moment kernels (fp16/bf16/fp32 on CUDA, CPU under
TRITON_INTERPRET=1). Imported lazily: importing fastdfd never imports triton.
"""

from __future__ import annotations

import contextlib

import torch

from .generator_fused import register_generator_backend
from .triton_backend import check


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (nothing to do under the CPU interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _linear_gather(z, wz, wy, local):
    from fastdfd.kernels.generator_fc import linear_gather

    with _on_device(z):
        return linear_gather(z, wz, wy, local, stats=True)


def _conv_forward(x, scale, shift, weight, bias, upsample, slope, tanh, stats):
    from fastdfd.kernels.generator_conv import conv_forward

    with _on_device(x):
        return conv_forward(x, scale, shift, weight, bias, upsample=upsample, slope=slope, tanh=tanh, stats=stats)


def _conv_backward(x, scale, shift, weight, y, dy, ds1, ds2, upsample, slope, tanh):
    from fastdfd.kernels.generator_conv import conv_backward

    with _on_device(x):
        return conv_backward(x, scale, shift, weight, y, dy, ds1, ds2, upsample=upsample, slope=slope, tanh=tanh)


register_generator_backend(
    "triton", {"linear_gather": _linear_gather, "conv_forward": _conv_forward, "conv_backward": _conv_backward}, check
)
