"""Triton finalize: every BN layer's moment distance from one packed buffer, in one launch.

The layers' shifted sums sit side by side in S1, S2 [G, C_total]; layer l owns channels
offsets[l] .. offsets[l+1]. Program (l, g) computes layer l's distance for segment g;
one launch covers a whole teacher (20-60 layers), forward and backward.

Per channel, with M the element count, d = S1/M (= mu_b - mu_r), var_b = S2/M - d^2,
v_b = var_b + eps, v_r = var_r + eps, dv = var_b - var_r::

    kl (KIND 0)          sum_c 0.5 log(v_r/v_b) + (v_b + d^2)/(2 v_r) - 0.5
    kl_reverse (KIND 1)  sum_c 0.5 log(v_b/v_r) + (v_r + d^2)/(2 v_b) - 0.5
    l2 (KIND 2)          sqrt(sum_c dv^2) + sqrt(sum_c d^2)
    mse (KIND 3)         (sum_c d^2 + sum_c dv^2) / C_l

Backward: with a = dD/dd and b = dD/dvar_b per channel (vb = S2/M - d^2 couples them),
    dS1 = (a - 2 d b) / M,   dS2 = b / M,   times the upstream dD[l, g]:
    kl:          a = d / v_r                 b = 0.5 (1/v_r - 1/v_b)
    kl_reverse:  a = d / v_b                 b = 0.5/v_b - (v_r + d^2) / (2 v_b^2)
    l2:          a = d / ||d||               b = dv / ||dv||         (0 where a norm is 0)
    mse:         a = 2 d / C_l               b = 2 dv / C_l
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

from ..launch import check_operand, on_device
from .layout import KIND_IDS  # kl 0, kl_reverse 1, l2 2, mse 3


@triton.jit
def _channel_stats(s1_ptr, s2_ptr, count_ptr, var_ptr, eps_ptr, row, offs, mask):
    m = tl.load(count_ptr + offs, mask=mask, other=1.0)
    d = tl.load(s1_ptr + row + offs, mask=mask, other=0.0) / m
    var_b = tl.load(s2_ptr + row + offs, mask=mask, other=0.0) / m - d * d
    var_r = tl.load(var_ptr + offs, mask=mask, other=1.0)
    eps = tl.load(eps_ptr + offs, mask=mask, other=1.0)
    return m, d, var_b, var_r, eps


@triton.jit
def _layer_sums(s1_ptr, s2_ptr, count_ptr, var_ptr, eps_ptr, row, start, end, KIND: tl.constexpr,
                BLOCK: tl.constexpr):
    """One layer's reductions over its channels: (sum of KL terms, 0) for the KL kinds,
    (sum dv^2, sum d^2) for l2 and mse."""
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(start, end, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < end
        m, d, var_b, var_r, eps = _channel_stats(s1_ptr, s2_ptr, count_ptr, var_ptr, eps_ptr, row, offs, mask)
        vb = var_b + eps
        vr = var_r + eps
        if KIND == 0:
            acc1 += tl.where(mask, 0.5 * tl.log(vr / vb) + (vb + d * d) / (2.0 * vr) - 0.5, 0.0)
        elif KIND == 1:
            acc1 += tl.where(mask, 0.5 * tl.log(vb / vr) + (vr + d * d) / (2.0 * vb) - 0.5, 0.0)
        else:
            dv = var_b - var_r
            acc1 += tl.where(mask, dv * dv, 0.0)
            acc2 += tl.where(mask, d * d, 0.0)
    return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)


@triton.jit
def _finalize_fwd_kernel(
    s1_ptr,  # *fp32 [G, C_total] shifted first-order sums
    s2_ptr,  # *fp32 [G, C_total] shifted second-order sums
    count_ptr,  # *fp32 [C_total] elements per (segment, channel)
    var_ptr,  # *fp32 [C_total] running variances
    eps_ptr,  # *fp32 [C_total] each channel's BN eps
    offsets_ptr,  # *i32 [L + 1] first channel of each layer
    out_ptr,  # *fp32 [L, G] distances
    C_total,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    layer = tl.program_id(0)
    g = tl.program_id(1)
    G = tl.num_programs(1)
    start = tl.load(offsets_ptr + layer)
    end = tl.load(offsets_ptr + layer + 1)
    sum1, sum2 = _layer_sums(s1_ptr, s2_ptr, count_ptr, var_ptr, eps_ptr, g * C_total, start, end, KIND, BLOCK)
    if KIND == 2:
        out = tl.sqrt(sum1) + tl.sqrt(sum2)
    elif KIND == 3:
        out = (sum1 + sum2) / (end - start).to(tl.float32)
    else:
        out = sum1
    tl.store(out_ptr + layer * G + g, out)


@triton.jit
def _finalize_bwd_kernel(
    s1_ptr,  # *fp32 [G, C_total]
    s2_ptr,  # *fp32 [G, C_total]
    count_ptr,  # *fp32 [C_total]
    var_ptr,  # *fp32 [C_total]
    eps_ptr,  # *fp32 [C_total]
    offsets_ptr,  # *i32 [L + 1]
    dout_ptr,  # *fp32 [L, G] upstream gradient of the distances
    ds1_ptr,  # *fp32 [G, C_total] output
    ds2_ptr,  # *fp32 [G, C_total] output
    C_total,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    layer = tl.program_id(0)
    g = tl.program_id(1)
    G = tl.num_programs(1)
    start = tl.load(offsets_ptr + layer)
    end = tl.load(offsets_ptr + layer + 1)
    row = g * C_total
    up = tl.load(dout_ptr + layer * G + g)
    inv_dv = 0.0
    inv_d = 0.0
    if KIND == 2:  # the norms first: each channel's gradient divides by them
        sum_dv, sum_d = _layer_sums(s1_ptr, s2_ptr, count_ptr, var_ptr, eps_ptr, row, start, end, KIND, BLOCK)
        n_dv = tl.sqrt(sum_dv)
        n_d = tl.sqrt(sum_d)
        inv_dv = tl.where(n_dv > 0, 1.0 / n_dv, 0.0)
        inv_d = tl.where(n_d > 0, 1.0 / n_d, 0.0)
    for c0 in range(start, end, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < end
        m, d, var_b, var_r, eps = _channel_stats(s1_ptr, s2_ptr, count_ptr, var_ptr, eps_ptr, row, offs, mask)
        vb = var_b + eps
        vr = var_r + eps
        if KIND == 0:
            a = d / vr
            b = 0.5 * (1.0 / vr - 1.0 / vb)
        elif KIND == 1:
            a = d / vb
            b = 0.5 / vb - (vr + d * d) / (2.0 * vb * vb)
        elif KIND == 2:
            a = d * inv_d
            b = (var_b - var_r) * inv_dv
        else:
            inv_c = 2.0 / (end - start).to(tl.float32)
            a = d * inv_c
            b = (var_b - var_r) * inv_c
        tl.store(ds1_ptr + row + offs, up * (a - 2.0 * d * b) / m, mask=mask)
        tl.store(ds2_ptr + row + offs, up * b / m, mask=mask)


# ----------------------------------------------------------------------------- launchers
BLOCK = 256


WHERE = "fastdfd triton finalize"


def _check(s1, s2, count, var, eps, offsets, kind: str, dout=None) -> int:
    """Shapes, dtypes, devices and contiguity the kernels' raw addressing assumes; returns the kind's id."""
    if kind not in KIND_IDS:
        raise ValueError(f"{WHERE}: unknown kind {kind!r}; expected one of {tuple(KIND_IDS)}")
    check_operand(WHERE, "s1", s1, device=s1.device, dtypes=(torch.float32,), contiguous=True)
    if s1.dim() != 2:
        raise RuntimeError(f"{WHERE}: sums must be [G, C_total], got {tuple(s1.shape)}")
    groups, c_total = s1.shape
    check_operand(WHERE, "offsets", offsets, device=s1.device, dtypes=(torch.int32,), contiguous=True)
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise RuntimeError(f"{WHERE}: offsets must be [L + 1] with L >= 1, got {tuple(offsets.shape)}")
    want = {"s2": (s2, groups * c_total), "count": (count, c_total), "var": (var, c_total), "eps": (eps, c_total)}
    if dout is not None:
        want["dout"] = (dout, (offsets.numel() - 1) * groups)
    for name, (t, n) in want.items():
        check_operand(WHERE, name, t, device=s1.device, dtypes=(torch.float32,), numel=n, contiguous=True)
    return KIND_IDS[kind]


def finalize_forward(s1, s2, count, var, eps, offsets, kind: str):
    """[G, C_total] sums -> [L, G] distances, one launch for every layer."""
    kind_id = _check(s1, s2, count, var, eps, offsets, kind)
    num_layers, groups = offsets.numel() - 1, s1.shape[0]
    with on_device(s1):
        out = torch.empty((num_layers, groups), device=s1.device, dtype=torch.float32)
        _finalize_fwd_kernel[(num_layers, groups)](
            s1, s2, count, var, eps, offsets, out, s1.shape[1], KIND=kind_id, BLOCK=BLOCK)
    return out


def finalize_backward(s1, s2, count, var, eps, offsets, dout, kind: str):
    """Gradients of the [L, G] distances with respect to S1 and S2."""
    kind_id = _check(s1, s2, count, var, eps, offsets, kind, dout)
    with on_device(s1):
        ds1, ds2 = torch.empty_like(s1), torch.empty_like(s2)
        _finalize_bwd_kernel[(offsets.numel() - 1, s1.shape[0])](
            s1, s2, count, var, eps, offsets, dout, ds1, ds2, s1.shape[1], KIND=kind_id, BLOCK=BLOCK)
    return ds1, ds2
