"""The fused generator-ensemble path, shared by the ``triton`` and ``cpp`` backends.

Generator-major activations [K, B, C, H, W]. Per step: one first-layer op (batched
matmul + label-row gather, BN0 sums in the epilogue), then one op per 3x3 conv whose
prologue applies the previous BN + LeakyReLU + nearest upsample while loading and whose
epilogue writes the next BN's sums. Between them only [K, C] tensors are touched: the
BN of a layer is an affine map per (k, c) computed from its sums, and autograd runs
through that tiny arithmetic to hand each op's backward the gradients of its sums.

The ops are ``torch.library`` custom ops (torch.compile sees one opaque node each) that
carry the backend's name and call its launchers, ``GEN_LAUNCHERS[name]`` (``backends/<name>.py``)::

    linear_gather(z, wz, wy, local) -> (h [K, B, D], sum h [K, D], sum h^2 [K, D])
    conv_forward(x, scale, shift, weight, bias, upsample, slope, tanh, stats) -> (y, S1, S2)
    conv_backward(x, scale, shift, weight, y, dy, dS1, dS2, upsample, slope, tanh)
        -> (dx, dscale | None, dshift | None, dweight)

(kernels/generator/ for ``triton``, csrc/generator/generator_cpu.cpp for ``cpp``). Every op
checks its operands' shapes, dtypes and devices first (:mod:`fastdfd.kernels.generator.layout`,
the checks the Triton launchers run too). Under ``torch.no_grad()`` (sampling during
distillation) the same forward launchers run and nothing is saved for a backward.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from fastdfd.kernels.generator.layout import check_conv, check_linear_gather

from ...models.generator import BN_EPS, LEAKY_SLOPE, OUT_BN_EPS, GeneratorSpec
from .backends import cpp, triton

GEN_LAUNCHERS: dict[str, dict[str, Callable]] = {"triton": triton.LAUNCHERS, "cpp": cpp.LAUNCHERS}


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 else t


# ------------------------------------------------------------------ first layer (fc + gather)
# Custom ops (not autograd.Functions): torch.compile(fullgraph=True) sees one opaque node each.
@torch.library.custom_op("fastdfd::gen_linear_gather", mutates_args=())
def gen_linear_gather(z: Tensor, wz: Tensor, wy: Tensor, local: Tensor, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """h = z @ Wz + Wy[local] [K, B, D], with fp32 sums of h and h^2 over the batch ([K, D])."""
    check_linear_gather(z, wz, wy, local)
    return GEN_LAUNCHERS[impl]["linear_gather"](z, wz, wy, local)


@gen_linear_gather.register_fake
def _(z, wz, wy, local, impl):
    h = wz.new_empty(z.shape[0], z.shape[1], wz.shape[2])
    s = z.new_empty(z.shape[0], wz.shape[2], dtype=torch.float32)
    return h, s, torch.empty_like(s)


def _fc_setup(ctx, inputs, output):
    z, wz, wy, local, impl = inputs
    ctx.save_for_backward(z, wz, local, output[0])
    ctx.wy_shape = wy.shape


def _fc_grad(ctx, dh, ds1, ds2):
    # two batched GEMMs and a scatter-add: cuBLAS/ATen do these well, nothing to fuse
    z, wz, local, h = ctx.saved_tensors
    g = torch.zeros_like(h, dtype=torch.float32) if dh is None else dh.float()
    if ds1 is not None:
        g = g + ds1.unsqueeze(1)
    if ds2 is not None:
        g = g + 2.0 * h.float() * ds2.unsqueeze(1)
    g = g.to(wz.dtype)
    dwz = torch.bmm(z.transpose(1, 2).to(wz.dtype), g)
    rows = torch.arange(z.shape[0], device=z.device).unsqueeze(1).expand_as(local)
    dwy = torch.zeros(ctx.wy_shape, device=g.device, dtype=torch.float32)
    dwy = dwy.index_put((rows, local), g.float(), accumulate=True)  # the gather's backward
    dz = torch.bmm(g, wz.transpose(1, 2)).to(z.dtype) if ctx.needs_input_grad[0] else None
    return dz, dwz, dwy.to(wz.dtype), None, None


gen_linear_gather.register_autograd(_fc_grad, setup_context=_fc_setup)


# ------------------------------------------------------------------------------- conv layers
@torch.library.custom_op("fastdfd::gen_conv_forward", mutates_args=())
def gen_conv_forward(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor,
                     bias: Optional[Tensor], upsample: int, tanh: bool, stats: bool,
                     impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """Prologue (BN affine + LeakyReLU + upsample) -> conv3x3 (+bias, tanh) -> sums of y, y^2 per (k, co)."""
    check_conv(x, scale, shift, weight, bias, upsample)
    y, s1, s2 = GEN_LAUNCHERS[impl]["conv_forward"](x, scale, shift, weight, bias, upsample, LEAKY_SLOPE, tanh, stats)
    if s1 is None:  # sums not wanted (no output BN): autograd still needs tensors
        s1 = y.new_zeros(y.shape[0], y.shape[2], dtype=torch.float32)
        s2 = torch.zeros_like(s1)  # outputs of a custom op must not alias
    return y, s1, s2


@gen_conv_forward.register_fake
def _(x, scale, shift, weight, bias, upsample, tanh, stats, impl):
    k, b, _, h, w = x.shape
    y = weight.new_empty(k, b, weight.shape[1], h * upsample, w * upsample)
    s = x.new_empty(k, weight.shape[1], dtype=torch.float32)
    return y, s, torch.empty_like(s)


@torch.library.custom_op("fastdfd::gen_conv_backward", mutates_args=())
def gen_conv_backward(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor, y: Tensor,
                      dy: Tensor, ds1: Tensor, ds2: Tensor, upsample: int,
                      tanh: bool, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dscale, dshift, dweight); dscale/dshift are empty without a prologue."""
    check_conv(x, scale, shift, weight, None, upsample, y, dy, ds1, ds2)
    dx, dscale, dshift, dweight = GEN_LAUNCHERS[impl]["conv_backward"](x, scale, shift, weight, y, dy, ds1, ds2,
                                                                       upsample, LEAKY_SLOPE, tanh)
    if dscale is None:
        dscale, dshift = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return dx, dscale, dshift, dweight


@gen_conv_backward.register_fake
def _(x, scale, shift, weight, y, dy, ds1, ds2, upsample, tanh, impl):
    s = x.new_empty((x.shape[0], x.shape[2]) if scale is not None else (0,), dtype=torch.float32)
    return torch.empty_like(x), s, torch.empty_like(s), torch.empty_like(weight)


def _conv_setup(ctx, inputs, output):
    x, scale, shift, weight, bias, upsample, tanh, stats, impl = inputs
    ctx.save_for_backward(x, scale, shift, weight, output[0])
    ctx.upsample, ctx.tanh, ctx.has_bias, ctx.impl = upsample, tanh, bias is not None, impl


def _conv_grad(ctx, dy, ds1, ds2):
    x, scale, shift, weight, y = ctx.saved_tensors
    k, cout = y.shape[0], y.shape[2]
    dy = torch.zeros_like(y) if dy is None else dy
    ds1 = y.new_zeros(k, cout, dtype=torch.float32) if ds1 is None else ds1.float()
    ds2 = y.new_zeros(k, cout, dtype=torch.float32) if ds2 is None else ds2.float()
    dx, dscale, dshift, dweight = gen_conv_backward(x, scale, shift, weight, y, dy, ds1, ds2, ctx.upsample, ctx.tanh,
                                                    ctx.impl)
    dbias = None
    if ctx.has_bias:  # the output layer only: a few channels, cheap to form here
        t = y.float()
        g = dy.float() + ds1[:, None, :, None, None] + 2.0 * t * ds2[:, None, :, None, None]
        if ctx.tanh:
            g = g * (1.0 - t * t)
        dbias = g.sum((1, 3, 4)).to(weight.dtype)
    return dx, _opt(dscale), _opt(dshift), dweight, dbias, None, None, None, None


gen_conv_forward.register_autograd(_conv_grad, setup_context=_conv_setup)


def bn_affine(s1: Tensor, s2: Tensor, count: int, gamma: Tensor | None, beta: Tensor | None, eps: float):
    """Train-mode BN as y = x * scale + shift per (k, c), from sums over ``count`` elements (biased var)."""
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0.0)
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma.float()
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.float()
    return scale, shift


def fused_ensemble_forward(
    params: Mapping[str, Tensor], spec: GeneratorSpec, z: Tensor, local: Tensor, impl: str
) -> Tensor:
    k, b = z.shape[0], z.shape[1]
    dtype = params["fc_z"].dtype
    h, s1, s2 = gen_linear_gather(z.to(dtype), params["fc_z"], params["fc_y"], local.long(), impl)
    c0, s0 = spec.widths[0], spec.init_size
    x = h.view(k, b, c0, s0, s0)
    s1 = s1.view(k, c0, s0 * s0).sum(-1)  # features -> BN channels
    s2 = s2.view(k, c0, s0 * s0).sum(-1)
    scale, shift = bn_affine(s1, s2, b * s0 * s0, params["bn0_weight"], params["bn0_bias"], BN_EPS)
    for i in range(len(spec.widths)):
        x, s1, s2 = gen_conv_forward(x, scale, shift, params[f"conv{i}_weight"], None, 2, False, True, impl)
        scale, shift = bn_affine(s1, s2, b * x.shape[-1] * x.shape[-2], params[f"bn{i + 1}_weight"],
                                 params[f"bn{i + 1}_bias"], BN_EPS)
    out_bn = "out_scale" in params
    t, s1, s2 = gen_conv_forward(x, scale, shift, params["out_weight"], params["out_bias"], 1, True, out_bn,
                                 impl)
    if out_bn:  # the paper's scale-only BN over the tanh output, from the sums the kernel wrote
        sc, sh = bn_affine(s1, s2, b * spec.image_size**2, params["out_scale"], None, OUT_BN_EPS)
        t = (t * sc[:, None, :, None, None] + sh[:, None, :, None, None]).to(dtype)
    return t
