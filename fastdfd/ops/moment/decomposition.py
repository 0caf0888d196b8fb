"""The moment tap as ``torch.compile`` sees it: the same math in aten ops, which inductor fuses.

Eager, the tap runs a backend's fused kernels through the ``fastdfd::tap_forward`` /
``tap_backward`` custom ops (:mod:`.custom_op`). Under ``torch.compile`` an opaque custom op is a
fusion barrier: inductor fuses each BN of a hooks-based step with the ReLU, residual add or pooling
after it and folds the statistics' reductions into the same loops, but it cannot look inside the
fused tap. So while dynamo traces, the dispatch entries of the fused backends (:mod:`.dispatch`)
call :func:`tap` instead, an ``autograd.Function`` whose forward and backward are the tap's math
in aten ops (the forward is :mod:`.reference`'s, sums in the accumulation dtype)::

    forward   d = x - mu_r;  S1[g, c] = sum d,  S2[g, c] = sum d^2;
              y = a(u),  u = d * gamma * rsqrt(var_r + eps) + beta [+ r]   (eval-mode BN, residual r, activation a)
    backward  dz = dy a'(u);  dr = dz;
              dx = dz * gamma * rsqrt(var_r + eps) + dS1[g, c] + 2 d dS2[g, c]  (one pass)

Inductor then emits loops that read x once for y, S1 and S2 with the epilogue (ReLU, the residual
add) in the same pass, and a backward that reads x and dy once; the backward is the one-pass form
above, not autograd's derivative of the forward's aten ops.

Why a traced function rather than a decomposition in inductor's table: the choice is then part of
the graph dynamo hands on, so the compile caches (AOTAutograd's and inductor's, keyed on that
graph) can never serve a graph compiled under the other choice.

The finalize (one call per step over every layer's sums) stays one opaque node: it is a few
thousand values, and its layer segments are data (``offsets``) that aten ops would turn into
dynamic shapes.

Which backends trace this way is :func:`set_inductor_decomposition` (all by default: on the CPU
inductor's fused loops beat the opaque ``cpp`` kernels between compiled neighbours; on a card the
device check measures the same choice).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from .activation import Activation, activation_derivative, apply_activation
from .reference import (accumulation_dtype, bn_affine_grads, bn_scale, channel_view, eval_batch_norm,
                        moment_sums_torch)

FUSED = frozenset({"triton", "cpp", "cuda"})
#: the fused backends whose tap is traced as aten ops under torch.compile
_DECOMPOSED: set[str] = set(FUSED)


def set_inductor_decomposition(backends: Iterable[str]) -> frozenset[str]:
    """Choose the fused backends whose tap ``torch.compile`` traces as aten ops (the others stay one
    opaque custom op per layer in the graph).

    Takes effect for functions traced afterwards (call ``torch._dynamo.reset()`` to retrace one
    already compiled). Returns the previous choice.
    Raises ValueError for a name that is not a fused backend.
    """
    chosen = set(backends)
    unknown = chosen - FUSED
    if unknown:
        raise ValueError(f"unknown fused backend(s) {sorted(unknown)}; expected a subset of {sorted(FUSED)}")
    previous = frozenset(_DECOMPOSED)
    _DECOMPOSED.clear()
    _DECOMPOSED.update(chosen)
    return previous


def _segment_view(t: Tensor, x: Tensor, groups: int) -> Tensor:
    """[G, C] -> broadcastable against x split into segments, [G, N / G, C, *spatial]."""
    return t.view((groups, 1, -1) + (1,) * (x.dim() - 2))


def _tap_forward_math(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float, groups: int, write_y: bool, act: str = "identity", slope: float = 0.0,
                      residual: Optional[Tensor] = None):
    """The reference's forward (:mod:`.reference`): inductor reads x once for the sums and y."""
    s1, s2 = moment_sums_torch(x, mean, groups)
    if not write_y:
        return x.new_empty(0), s1, s2
    z = eval_batch_norm(x, mean, var, weight, bias, eps)
    return apply_activation(act, slope, z if residual is None else z + residual), s1, s2


def _tap_backward_math(x: Tensor, dy: Optional[Tensor], ds1: Tensor, ds2: Tensor, mean: Tensor, var: Tensor,
                       weight: Optional[Tensor], eps: float, groups: int, bias: Optional[Tensor] = None,
                       act: str = "identity", slope: float = 0.0,
                       residual: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(dx, dz) with dz = dy a'(u) in the accumulation dtype (the residual's gradient; None without dy)."""
    acc = accumulation_dtype(x.dtype)
    xg = x.to(acc).unflatten(0, (groups, x.shape[0] // groups))
    d = xg - channel_view(mean.to(acc), x).unsqueeze(0)
    dx = _segment_view(ds1.to(acc), x, groups) + 2 * d * _segment_view(ds2.to(acc), x, groups)
    dz = None
    if dy is not None:
        scale = channel_view(bn_scale(var, weight, eps, acc), x).unsqueeze(0)
        dz = dy.to(acc).unflatten(0, (groups, x.shape[0] // groups))
        if act != "identity":  # dy * a'(u), u = d * scale + beta (+ r) from the d above (x read once)
            u = d * scale if bias is None else d * scale + channel_view(bias.to(acc), x).unsqueeze(0)
            if residual is not None:
                u = u + residual.to(acc).unflatten(0, (groups, x.shape[0] // groups))
            dz = dz * activation_derivative(act, slope, u)
        dx = dx + dz * scale
        dz = dz.flatten(0, 1)
    return dx.flatten(0, 1).to(x.dtype), dz


def decomposes(impl: str) -> bool:
    """Whether ``impl``'s tap is traced as aten ops now (under ``torch.compile`` and chosen)."""
    return impl in _DECOMPOSED and torch.compiler.is_compiling()


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, groups, write_y, act, slope, residual):
        # the residual is read again backward only for a'(u); with the identity its gradient is dy itself
        ctx.save_for_backward(x, mean, var, weight, bias, residual if write_y and act != "identity" else None)
        ctx.eps, ctx.groups, ctx.write_y, ctx.act, ctx.slope = eps, groups, write_y, act, slope
        return _tap_forward_math(x, mean, var, weight, bias, eps, groups, write_y, act, slope, residual)

    @staticmethod
    def backward(ctx, dy, ds1, ds2):
        x, mean, var, weight, bias, residual = ctx.saved_tensors
        acc = accumulation_dtype(x.dtype)
        ds1 = ds1 if ds1 is not None else x.new_zeros((ctx.groups, x.shape[1]), dtype=acc)
        ds2 = ds2 if ds2 is not None else x.new_zeros((ctx.groups, x.shape[1]), dtype=acc)
        dy = dy if ctx.write_y else None
        dx = dr = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[10]:
            dx, dz = _tap_backward_math(x, dy, ds1, ds2, mean, var, weight, ctx.eps, ctx.groups, bias, ctx.act,
                                        ctx.slope, residual)
            dx = dx if ctx.needs_input_grad[0] else None
            if ctx.needs_input_grad[10] and dz is not None:
                dr = dz.to(dy.dtype)  # the residual has x's dtype, as dy
        dw = db = None
        if dy is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            dw, db = bn_affine_grads(x, dy, mean, var, weight, ctx.eps, ctx.needs_input_grad[3], ctx.needs_input_grad[4],
                                     bias, Activation(ctx.act, ctx.slope), residual)
        return dx, None, None, dw, db, None, None, None, None, None, dr


def tap(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
        groups: int, write_y: bool, act: str = "identity", slope: float = 0.0,
        residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The tap in aten ops, differentiable with the one-pass backward: ``fastdfd::tap_forward``'s
    contract (y = a(BN(x) [+ residual]) in x's dtype for the activation ``act`` of :mod:`.activation`, or an
    empty tensor without ``write_y``; S1, S2 [groups, C] in the accumulation dtype)."""
    return _Tap.apply(x, mean, var, weight, bias, eps, groups, write_y, act, slope, residual)
