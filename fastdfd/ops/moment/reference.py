"""The moment ops in plain PyTorch (autograd for gradients): the ``torch`` backend.

This is the oracle every other backend is tested against (in float64) and the fallback
anywhere. It states the math the fused kernels (``kernels/moment/``, ``csrc/moment/``) implement:

Moment tap, per segment g (N split into G contiguous parts) and channel c, with
M = (N / G) * prod(spatial) elements and the shift mu_r (the running mean, known
before the pass, so E[x^2] - E[x]^2 does not cancel when batch means sit near it)::

    S1[g, c] = sum (x - mu_r[c])          S2[g, c] = sum (x - mu_r[c])^2
    mu_b = mu_r + S1 / M                  var_b = S2 / M - (S1 / M)^2   (biased)
    y = a((x - mu_r) * rsqrt(var_r + eps) * gamma + beta [+ r])         (eval-mode BN, an optional
                                                                         residual r of x's shape, then the
                                                                         activation epilogue a, .activation)

Distances per channel, summed (kl, kl_reverse) or normed/averaged (l2, mse) per layer;
v_b = var_b + eps, v_r = var_r + eps, d = mu_b - mu_r = S1 / M::

    kl          0.5 log(v_r / v_b) + (v_b + d^2) / (2 v_r) - 0.5
    kl_reverse  0.5 log(v_b / v_r) + (v_r + d^2) / (2 v_b) - 0.5
    l2          ||var_r - var_b||_2 + ||d||_2          (DeepInversion's hook, not squared)
    mse         mean_c d^2 + mean_c (var_b - var_r)^2  (GDFQ)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdfd.kernels.moment.layout import KIND_IDS, KINDS  # noqa: F401  (the kinds, numbered as the kernels take them)

from .activation import IDENTITY, Activation
from .packed import PackedLayout


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 statistics for fp32/fp16/bf16 inputs; float64 inputs keep float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[C] -> broadcastable against x's [N, C, *spatial]."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def moment_sums_torch(x: torch.Tensor, shift: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(x.dtype)
    # segments by a view of the batch axis only: no copy of x in any layout (channels_last too), which
    # also keeps it one fused loop when torch.compile traces it (decomposition.py)
    d = (x.to(acc) - channel_view(shift.to(acc), x)).unflatten(0, (groups, x.shape[0] // groups))
    dims = [1] + list(range(3, d.dim()))
    return d.sum(dims), (d * d).sum(dims)


def moment_tap_torch(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    groups: int,
    activation: Activation = IDENTITY,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s1, s2 = moment_sums_torch(x, running_mean, groups)
    y = eval_batch_norm(x, running_mean, running_var, weight, bias, eps)
    return activation(y if residual is None else y + residual), s1, s2


def eval_batch_norm(x, running_mean, running_var, weight, bias, eps: float) -> torch.Tensor:
    """BN with running statistics, output in x's dtype (fp32 math for fp16/bf16 input)."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

    def cast(t):
        return None if t is None else t.to(acc)

    y = F.batch_norm(x.to(acc), cast(running_mean), cast(running_var), cast(weight), cast(bias),
                     training=False, eps=eps)
    return y.to(x.dtype)


def bn_scale(var: torch.Tensor, weight: torch.Tensor | None, eps: float, acc: torch.dtype) -> torch.Tensor:
    """gamma * rsqrt(var_r + eps) per channel, in ``acc``: the eval BN's slope, forward and backward."""
    scale = torch.rsqrt(var.to(acc) + eps)
    return scale if weight is None else scale * weight.to(acc)


def pre_activation(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """z = BN(x) (+ residual) in the accumulation dtype, recomputed from x: what an activation's derivative
    needs."""
    acc = accumulation_dtype(x.dtype)
    z = (x.to(acc) - channel_view(mean.to(acc), x)) * channel_view(bn_scale(var, weight, eps, acc), x)
    z = z if bias is None else z + channel_view(bias.to(acc), x)
    return z if residual is None else z + residual.to(acc)


def bn_affine_grads(x: torch.Tensor, dy: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    weight: torch.Tensor | None, eps: float, want_weight: bool, want_bias: bool,
                    bias: torch.Tensor | None = None, activation: Activation = IDENTITY,
                    residual: torch.Tensor | None = None):
    """Gradients of y = a(xhat * gamma + beta [+ r]) for gamma and beta (None where not wanted): only needed
    when a user trains the teacher's BN affine. The tap's custom op and its traced form share it."""
    acc = accumulation_dtype(x.dtype)
    dims = [0] + list(range(2, x.dim()))
    dya = dy.to(acc)
    if not activation.is_identity:  # dz = dy a'(z)
        dya = dya * activation.derivative(pre_activation(x, mean, var, weight, bias, eps, residual))
    dw = db = None
    if want_weight:
        xhat = (x.to(acc) - channel_view(mean.to(acc), x)) * channel_view(torch.rsqrt(var.to(acc) + eps), x)
        dw = (dya * xhat).sum(dims).to(weight.dtype)
    if want_bias:
        db = dya.sum(dims).to(weight.dtype if weight is not None else dy.dtype)
    return dw, db


def _safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    # sqrt'(0) is infinite; the norm's subgradient at 0 is 0 (as torch.linalg.vector_norm).
    tiny = torch.finfo(t.dtype).tiny
    return torch.where(t > 0, t.clamp_min(tiny).sqrt(), torch.zeros_like(t))


def _segment_sum(terms: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """[G, C_total] per-channel terms -> [L, G] per-layer sums."""
    if layout.num_layers == 1:
        return terms.sum(dim=1, keepdim=True).t()
    out = terms.new_zeros(terms.shape[0], layout.num_layers)
    return out.index_add(1, layout.layer, terms).t()


def moment_finalize_torch(
    s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor, layout: PackedLayout, kind: str
) -> torch.Tensor:
    d = s1 / count
    var_b = s2 / count - d * d
    if kind == "kl":
        vb, vr = var_b + layout.eps, layout.running_var + layout.eps
        terms = 0.5 * torch.log(vr / vb) + (vb + d * d) / (2 * vr) - 0.5
        return _segment_sum(terms, layout)
    if kind == "kl_reverse":
        vb, vr = var_b + layout.eps, layout.running_var + layout.eps
        terms = 0.5 * torch.log(vb / vr) + (vr + d * d) / (2 * vb) - 0.5
        return _segment_sum(terms, layout)
    dv = var_b - layout.running_var
    if kind == "l2":
        return _safe_sqrt(_segment_sum(dv * dv, layout)) + _safe_sqrt(_segment_sum(d * d, layout))
    if kind == "mse":
        return (_segment_sum(d * d, layout) + _segment_sum(dv * dv, layout)) / layout.channels.view(-1, 1)
    raise ValueError(f"unknown moment distance {kind!r}; expected one of {KINDS}")
