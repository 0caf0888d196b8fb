"""The ``triton`` backend: the fused kernels of :mod:`fastdfd.kernels` as PyTorch custom ops.

Each kernel pair is a ``torch.library`` custom op with a fake (meta) implementation and
an autograd formula, so that ``torch.compile(fullgraph=True)`` sees one opaque node per
BN layer instead of breaking the graph. The kernels are imported on first use: importing
fastdfd never imports triton.

Serves fp16/bf16/fp32 CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (how the
CPU CI runs these kernels). Anything else falls back to the next backend.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from ..backends import register
from .layout import PackedLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


_MISSING: list[str | None] = []  # memo (a plain global: torch.compile traces dispatch through here)


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


@functools.lru_cache(maxsize=None)
def _programs(device_type: str, index: int | None) -> int:
    """Programs that fill the chip: a few waves over the SMs (small under the interpreter)."""
    if device_type == "cuda":
        return 4 * torch.cuda.get_device_properties(index or 0).multi_processor_count
    return 4


def programs_for(x: Tensor) -> int:
    return _programs(x.device.type, x.device.index)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


# ------------------------------------------------------------------------------ moment tap
@torch.library.custom_op("fastdfd::tap_forward", mutates_args=())
def tap_forward(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, groups: int, write_y: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastdfd.kernels.moment_tap import tap_forward as launch

    y, s1, s2 = launch(x, _f32(mean), _f32(var), _f32(weight), _f32(bias), eps, groups, write_y, programs_for(x))
    return (y if y is not None else x.new_empty(0)), s1, s2


@tap_forward.register_fake
def _(x, mean, var, weight, bias, eps, groups, write_y):
    s = x.new_empty((groups, x.shape[1]), dtype=torch.float32)
    return (torch.empty_like(x) if write_y else x.new_empty(0)), s, torch.empty_like(s)


@torch.library.custom_op("fastdfd::tap_backward", mutates_args=())
def tap_backward(
    x: Tensor, dy: Optional[Tensor], ds1: Tensor, ds2: Tensor, mean: Tensor, var: Tensor,
    weight: Optional[Tensor], eps: float, groups: int,
) -> Tensor:
    from fastdfd.kernels.moment_tap import tap_backward as launch

    return launch(x, dy, ds1.float().contiguous(), ds2.float().contiguous(), _f32(mean), _f32(var), _f32(weight),
                  eps, groups, programs_for(x))


@tap_backward.register_fake
def _(x, dy, ds1, ds2, mean, var, weight, eps, groups):
    return torch.empty_like(x)


def _tap_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps, groups, write_y = inputs
    ctx.save_for_backward(x, mean, var, weight)
    ctx.eps, ctx.groups, ctx.write_y = eps, groups, write_y


def _tap_grad(ctx, dy, ds1, ds2):
    x, mean, var, weight = ctx.saved_tensors
    c = x.shape[1]
    if ds1 is None:
        ds1 = x.new_zeros((ctx.groups, c), dtype=torch.float32)
    if ds2 is None:
        ds2 = x.new_zeros((ctx.groups, c), dtype=torch.float32)
    dy = dy if ctx.write_y else None
    dx = tap_backward(x, dy, ds1, ds2, mean, var, weight, ctx.eps, ctx.groups) if ctx.needs_input_grad[0] else None
    dw = db = None
    if dy is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
        # BN affine gradients only matter when a user trains the teacher; plain torch suffices
        dims = [0] + list(range(2, x.dim()))
        shape = (1, c) + (1,) * (x.dim() - 2)
        dyf = dy.float()
        if ctx.needs_input_grad[3]:
            xhat = (x.float() - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + ctx.eps)
            dw = (dyf * xhat).sum(dims).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            db = dyf.sum(dims).to(weight.dtype if weight is not None else dy.dtype)
    return dx, None, None, dw, db, None, None, None


tap_forward.register_autograd(_tap_grad, setup_context=_tap_setup)


# -------------------------------------------------------------------------------- finalize
@torch.library.custom_op("fastdfd::finalize_forward", mutates_args=())
def finalize_forward(s1: Tensor, s2: Tensor, count: Tensor, var: Tensor, eps: Tensor, offsets: Tensor,
                     kind: str) -> Tensor:
    from fastdfd.kernels.moment_finalize import finalize_forward as launch

    return launch(s1.contiguous(), s2.contiguous(), count, var, eps, offsets, kind)


@finalize_forward.register_fake
def _(s1, s2, count, var, eps, offsets, kind):
    return s1.new_empty((offsets.shape[0] - 1, s1.shape[0]))


@torch.library.custom_op("fastdfd::finalize_backward", mutates_args=())
def finalize_backward(s1: Tensor, s2: Tensor, count: Tensor, var: Tensor, eps: Tensor, offsets: Tensor,
                      dout: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    from fastdfd.kernels.moment_finalize import finalize_backward as launch

    return launch(s1.contiguous(), s2.contiguous(), count, var, eps, offsets, dout.float().contiguous(), kind)


@finalize_backward.register_fake
def _(s1, s2, count, var, eps, offsets, dout, kind):
    return torch.empty_like(s1), torch.empty_like(s2)


def _finalize_setup(ctx, inputs, output):
    s1, s2, count, var, eps, offsets, kind = inputs
    ctx.save_for_backward(s1, s2, count, var, eps, offsets)
    ctx.kind = kind


def _finalize_grad(ctx, dout):
    s1, s2, count, var, eps, offsets = ctx.saved_tensors
    ds1, ds2 = finalize_backward(s1, s2, count, var, eps, offsets, dout, ctx.kind)
    return ds1, ds2, None, None, None, None, None


finalize_forward.register_autograd(_finalize_grad, setup_context=_finalize_setup)


# -------------------------------------------------------------------- backend registration
@register("moment_tap", "triton", check=check)
def moment_tap_triton(x, running_mean, running_var, weight, bias, eps, groups):
    return tap_forward(x, running_mean, running_var, weight, bias, float(eps), int(groups), True)


@register("moment_sums", "triton", check=check)
def moment_sums_triton(x, shift, groups):
    # the sums-only tap: same kernel without the BN output (var is not read)
    _, s1, s2 = tap_forward(x, shift, shift, None, None, 0.0, int(groups), False)
    return s1, s2


def check_finalize(s1: Tensor) -> str | None:
    if s1.dtype != torch.float32:
        return f"{s1.dtype} sums (the finalize kernel takes fp32)"
    return check(s1)


@register("moment_finalize", "triton", check=check_finalize)
def moment_finalize_triton(s1, s2, count, layout: PackedLayout, kind: str):
    return finalize_forward(s1, s2, count.float(), layout.running_var, layout.eps, layout.offsets, kind)
