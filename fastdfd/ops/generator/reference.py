"""The batched generator ensemble in plain PyTorch: the ``torch`` backend, the reference and the oracle.

Batch-major [B, K*C, H, W] activations (generator k owns channels k*C .. k*C+C-1), so that
train-mode BN per (generator, channel) is one ``F.batch_norm`` over K*C channels and each
3x3 conv is one grouped convolution (groups = K). Autograd does the backward.

Also here, generator-major references of the single layers the Triton kernels fuse
(:func:`linear_gather_reference`, :func:`conv_layer_reference`), which the kernel tests
compare against in float64.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ...models.generator import BN_EPS, LEAKY_SLOPE, OUT_BN_EPS, GeneratorSpec


def ensemble_forward_reference(
    params: Mapping[str, torch.Tensor], spec: GeneratorSpec, z: torch.Tensor, local: torch.Tensor
) -> torch.Tensor:
    k, b = z.shape[0], z.shape[1]
    rows = torch.arange(k, device=z.device).unsqueeze(1)
    h = torch.bmm(z, params["fc_z"]) + params["fc_y"][rows, local]  # [k, B, D]
    w0, s0 = spec.widths[0], spec.init_size
    h = h.transpose(0, 1).reshape(b, k * w0, s0, s0)
    h = F.leaky_relu(
        F.batch_norm(h, None, None, params["bn0_weight"].reshape(-1), params["bn0_bias"].reshape(-1), True, 0.0, BN_EPS),
        LEAKY_SLOPE,
    )
    for i in range(len(spec.widths)):
        w = params[f"conv{i}_weight"]
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), padding=1, groups=k)
        h = F.batch_norm(
            h, None, None, params[f"bn{i + 1}_weight"].reshape(-1), params[f"bn{i + 1}_bias"].reshape(-1),
            True, 0.0, BN_EPS,
        )
        h = F.leaky_relu(h, LEAKY_SLOPE)
    w = params["out_weight"]
    h = torch.tanh(F.conv2d(h, w.reshape(-1, *w.shape[2:]), params["out_bias"].reshape(-1), padding=1, groups=k))
    if "out_scale" in params:
        h = F.batch_norm(h, None, None, params["out_scale"].reshape(-1), None, True, 0.0, OUT_BN_EPS)
    s = spec.image_size
    return h.reshape(b, k, spec.channels, s, s).transpose(0, 1)


def linear_gather_reference(z, wz, wy, local):
    """h [K, B, D] = z @ Wz + Wy[local], and sums of h, h^2 over B ([K, D] each)."""
    rows = torch.arange(z.shape[0], device=z.device).unsqueeze(1)
    h = torch.bmm(z, wz) + wy[rows, local]
    return h, h.sum(1), h.square().sum(1)


def conv_layer_reference(x, scale, shift, weight, bias, *, upsample: int, slope: float, tanh: bool):
    """One fused generator layer on generator-major x [K, B, CIN, h, w]: see kernels/generator/conv.py.

    Returns y [K, B, COUT, H, W] and sums of y, y^2 per (k, co).
    """
    k, b, cin, h, w = x.shape
    a = x
    if scale is not None:
        a = F.leaky_relu(x * scale[:, None, :, None, None] + shift[:, None, :, None, None], slope)
    a = a.transpose(0, 1).reshape(b, k * cin, h, w)
    if upsample > 1:
        a = F.interpolate(a, scale_factor=upsample, mode="nearest")
    y = F.conv2d(a, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                 padding=1, groups=k)
    if tanh:
        y = torch.tanh(y)
    y = y.reshape(b, k, -1, *y.shape[2:]).transpose(0, 1)
    return y, y.sum((1, 3, 4)), y.square().sum((1, 3, 4))
