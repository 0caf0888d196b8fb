"""The fused moment ops as PyTorch custom ops, shared by every compiled backend.

Each fused op pair (tap forward/backward, finalize forward/backward) is one
``torch.library`` custom op with a fake (meta) implementation and an autograd formula,
so ``torch.compile(fullgraph=True)`` sees one opaque node per BN layer instead of breaking
the graph. The op carries the backend's name (``triton``, ``cpp``, ``cuda``) and calls
that backend's launchers, ``LAUNCHERS[name]`` (``backends/<name>.py``).

A launcher set provides::

    tap_forward(x, mean, var, weight, bias, eps, groups, write_y, act, slope, residual) -> (y | None, S1, S2)
    tap_backward(x, dy | None, dS1, dS2, mean, var, weight, bias, eps, groups, act, slope, residual)
        -> (dx, dr | None)

(``act``/``slope``: the activation epilogue, :mod:`.activation`; ``residual``: None or a tensor of x's dtype
and shape added before it, y = a(BN(x) + r), whose gradient dr = dy a'(u) the backward writes; it reaches the
backward only with a non-identity activation, since otherwise dr is dy. A backend that does not fuse them
gets identity, 0, None, and the dispatch applies them after the tap: :mod:`.dispatch`)
    finalize_forward(S1, S2, count, var, eps, offsets, kind) -> [L, G]
    finalize_backward(S1, S2, count, var, eps, offsets, dout, kind) -> (dS1, dS2)

receiving statistics, weights and sums in the accumulation dtype (fp32; fp64 for fp64
input), contiguous. x may have any strides: the tap launchers bring it to the kernels'
layout (:func:`fastdfd.kernels.moment.layout.kernel_layout`: dense, copied to contiguous when
it is a slice, a batch stride, an expand, ...) and give y/dx exactly that layout's strides,
which the fake implementations below report too. The tap's BN-affine gradients (only needed
when a user trains the teacher) are computed here in plain torch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fastdfd.kernels.moment.layout import ACTIVATIONS, kernel_output_like
from .backends import cpp, cuda, triton
from .activation import Activation
from .reference import accumulation_dtype, bn_affine_grads

LAUNCHERS: dict[str, dict[str, Callable]] = {"triton": triton.LAUNCHERS, "cpp": cpp.LAUNCHERS, "cuda": cuda.LAUNCHERS}


def _acc(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.detach().to(dtype).contiguous()


# ------------------------------------------------------------------------------ moment tap
@torch.library.custom_op("fastdfd::tap_forward", mutates_args=())
def tap_forward(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, groups: int, write_y: bool, impl: str, act: int = 0, slope: float = 0.0,
    residual: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(x.dtype)
    y, s1, s2 = LAUNCHERS[impl]["tap_forward"](
        x, _acc(mean, acc), _acc(var, acc), _acc(weight, acc), _acc(bias, acc), eps, groups, write_y, act, slope,
        residual)
    return (y if y is not None else x.new_empty(0)), s1, s2


@tap_forward.register_fake
def _(x, mean, var, weight, bias, eps, groups, write_y, impl, act=0, slope=0.0, residual=None):
    s = x.new_empty((groups, x.shape[1]), dtype=accumulation_dtype(x.dtype))
    return (kernel_output_like(x) if write_y else x.new_empty(0)), s, torch.empty_like(s)


@torch.library.custom_op("fastdfd::tap_backward", mutates_args=())
def tap_backward(
    x: Tensor, dy: Optional[Tensor], ds1: Tensor, ds2: Tensor, mean: Tensor, var: Tensor,
    weight: Optional[Tensor], bias: Optional[Tensor], eps: float, groups: int, impl: str, act: int = 0,
    slope: float = 0.0, residual: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(x.dtype)
    dx, dr = LAUNCHERS[impl]["tap_backward"](
        x, dy, _acc(ds1, acc), _acc(ds2, acc), _acc(mean, acc), _acc(var, acc), _acc(weight, acc), _acc(bias, acc),
        eps, groups, act, slope, residual)
    return dx, (dr if dr is not None else x.new_empty(0))  # a custom op returns tensors: empty for none


@tap_backward.register_fake
def _(x, dy, ds1, ds2, mean, var, weight, bias, eps, groups, impl, act=0, slope=0.0, residual=None):
    with_dr = residual is not None and dy is not None and act != 0
    return kernel_output_like(x), (kernel_output_like(x) if with_dr else x.new_empty(0))


def _tap_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps, groups, write_y, impl, act, slope, residual = inputs
    has_r = residual is not None and write_y
    # the residual is read again backward only for a'(u); with the identity its gradient is dy itself
    ctx.save_for_backward(x, mean, var, weight, bias, residual if has_r and act != 0 else None)
    ctx.eps, ctx.groups, ctx.write_y, ctx.impl, ctx.act, ctx.slope = eps, groups, write_y, impl, act, slope
    ctx.has_r = has_r


def _tap_grad(ctx, dy, ds1, ds2):
    x, mean, var, weight, bias, residual = ctx.saved_tensors
    c, acc = x.shape[1], accumulation_dtype(x.dtype)
    ds1 = ds1 if ds1 is not None else x.new_zeros((ctx.groups, c), dtype=acc)
    ds2 = ds2 if ds2 is not None else x.new_zeros((ctx.groups, c), dtype=acc)
    dy = dy if ctx.write_y else None
    dx = dr = None
    want_r = ctx.has_r and ctx.needs_input_grad[11] and dy is not None
    if ctx.needs_input_grad[0] or (want_r and residual is not None):
        dx, dr = tap_backward(x, dy, ds1, ds2, mean, var, weight, bias, ctx.eps, ctx.groups, ctx.impl, ctx.act,
                              ctx.slope, residual)
        dx = dx if ctx.needs_input_grad[0] else None
        dr = dr if want_r and residual is not None else None
    if want_r and residual is None:  # identity: d(BN(x) + r)/dr = 1
        dr = dy
    dw = db = None
    if dy is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
        activation = Activation(ACTIVATIONS[ctx.act], ctx.slope)
        dw, db = bn_affine_grads(x, dy, mean, var, weight, ctx.eps, ctx.needs_input_grad[3], ctx.needs_input_grad[4],
                                 bias, activation, residual)
    return dx, None, None, dw, db, None, None, None, None, None, None, dr


tap_forward.register_autograd(_tap_grad, setup_context=_tap_setup)


# -------------------------------------------------------------------------------- finalize
@torch.library.custom_op("fastdfd::finalize_forward", mutates_args=())
def finalize_forward(s1: Tensor, s2: Tensor, count: Tensor, var: Tensor, eps: Tensor, offsets: Tensor,
                     kind: str, impl: str) -> Tensor:
    return LAUNCHERS[impl]["finalize_forward"](s1.contiguous(), s2.contiguous(), count, var, eps, offsets, kind)


@finalize_forward.register_fake
def _(s1, s2, count, var, eps, offsets, kind, impl):
    return s1.new_empty((offsets.shape[0] - 1, s1.shape[0]))


@torch.library.custom_op("fastdfd::finalize_backward", mutates_args=())
def finalize_backward(s1: Tensor, s2: Tensor, count: Tensor, var: Tensor, eps: Tensor, offsets: Tensor,
                      dout: Tensor, kind: str, impl: str) -> tuple[Tensor, Tensor]:
    return LAUNCHERS[impl]["finalize_backward"](
        s1.contiguous(), s2.contiguous(), count, var, eps, offsets, dout.to(s1.dtype).contiguous(), kind)


@finalize_backward.register_fake
def _(s1, s2, count, var, eps, offsets, dout, kind, impl):
    return torch.empty_like(s1), torch.empty_like(s2)


def _finalize_setup(ctx, inputs, output):
    s1, s2, count, var, eps, offsets, kind, impl = inputs
    ctx.save_for_backward(s1, s2, count, var, eps, offsets)
    ctx.kind, ctx.impl = kind, impl


def _finalize_grad(ctx, dout):
    s1, s2, count, var, eps, offsets = ctx.saved_tensors
    ds1, ds2 = finalize_backward(s1, s2, count, var, eps, offsets, dout, ctx.kind, ctx.impl)
    return ds1, ds2, None, None, None, None, None, None


finalize_forward.register_autograd(_finalize_grad, setup_context=_finalize_setup)
