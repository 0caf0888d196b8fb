"""Triton moment tap: eval-mode BN output and per-(segment, channel) shifted power sums
from one read of x, and the single-pass backward.

Forward, for x [N, C, P] (P = prod(spatial)), N split into G contiguous segments::

    d = x - mu_r[c]
    y = a(u),  u = d * gamma[c] * rsqrt(var_r[c] + eps) + beta[c] [+ r]   (written only if WRITE_Y; a: ACT;
                                                                          r: the residual, HAS_R)
    S1[g, c] = sum_{n in g, p} d        S2[g, c] = sum_{n in g, p} d^2

Backward, given dy (if the BN output was used) and dS1, dS2 [G, C]::

    dz = dy a'(u)   (u recomputed from x [and r])      dr = dz   (written if HAS_R)
    dx = dz * gamma[c] * rsqrt(var_r[c] + eps) + dS1[g, c] + 2 * d * dS2[g, c]

which reads x and dy (and r) once and writes dx (and dr) once, whatever the loss on the sums was. With
the identity the residual's gradient is dy itself: the launcher then reads no r backward.

Work split (both kernels): program (cb, g*SPLIT + s) owns channels [cb*BLOCK_C, ...) of
segment g, and the s-th of SPLIT contiguous chunks of that segment's N/G*P positions.
SPLIT grows when C*G alone cannot fill the chip (few channels, large N*P: the ResNet stem,
or a BatchNorm1d with 64 features and batch 4096) -- the two-level reduction of PyTorch's
Normalization.cuh. Partial sums land in part[g, s, c]; a [G, SPLIT, C] -> [G, C] sum
finishes them (deterministic: no atomics).

Addressing: element (n, c, p) is at n*stride_n + c*stride_c + p*stride_p, which covers
NCHW (stride_p = 1) and channels_last (stride_c = 1) without copies; Triton specialises
a stride of 1 so each layout gets coalesced loads along its contiguous axis. x, y, dy, dx
and the residual r and dr share one set of strides, so the launchers take x only in the layout of
:func:`.layout.kernel_layout` (non-overlapping and dense; slices, batch strides and
expands are copied to contiguous) and allocate y/dx with exactly x's strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import check_operand, on_device
from .layout import ACTIVATION_IDS, check_kernel_layout, empty_kernel_like, kernel_layout, like_strides


@triton.jit
def _program_tile(C, P, rows_per_group, chunk, SPLIT, BLOCK_C: tl.constexpr):
    """This program's segment g, its channels, and its [j_start, j_end) of the segment's positions."""
    gs = tl.program_id(1)
    g = gs // SPLIT
    s = gs % SPLIT
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_start = s * chunk
    j_end = tl.minimum(j_start + chunk, rows_per_group * P)
    return g, s, offs_c, offs_c < C, j_start, j_end


@triton.jit
def _bn_scale(var_ptr, w_ptr, offs_c, mask_c, eps, HAS_W: tl.constexpr):
    """gamma * rsqrt(var_r + eps) per channel: the eval BN's slope, forward and backward."""
    scale = tl.rsqrt(tl.load(var_ptr + offs_c, mask=mask_c, other=1.0) + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + offs_c, mask=mask_c, other=1.0)
    return scale


@triton.jit
def _activation(z, slope, ACT: tl.constexpr):
    """a(z) for the activation id ACT (ACTIVATION_IDS in .layout; fastdfd/ops/moment/activation.py's math)."""
    y = z
    # relu and relu6 by where(), not maximum/minimum: a NaN stays NaN, as in torch
    if ACT == 1:  # relu
        y = tl.where(z < 0, 0.0, z)
    if ACT == 2:  # relu6
        y = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    if ACT == 3:  # leaky_relu
        y = tl.where(z > 0, z, z * slope)
    if ACT == 4:  # silu
        y = z * tl.sigmoid(z)
    return y


@triton.jit
def _activation_slope(z, slope, ACT: tl.constexpr):
    """a'(z), torch's values at the kinks."""
    g = z * 0.0 + 1.0
    if ACT == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    if ACT == 2:
        g = tl.where((z > 0) & (z < 6.0), 1.0, 0.0)
    if ACT == 3:
        g = tl.where(z > 0, 1.0, slope)
    if ACT == 4:
        sg = tl.sigmoid(z)
        g = sg * (1.0 + z * (1.0 - sg))
    return g


@triton.jit
def _tile_offsets(j0, j_end, base_n, P, offs_c, mask_c, stride_n, stride_c, stride_p, BLOCK_J: tl.constexpr):
    """Element offsets and mask of the [BLOCK_C, BLOCK_J] tile starting at position j0."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    n = base_n + offs_j // P
    p = offs_j % P
    off = n.to(tl.int64)[None, :] * stride_n + offs_c.to(tl.int64)[:, None] * stride_c + p[None, :] * stride_p
    return off, mask_c[:, None] & (offs_j < j_end)[None, :]


@triton.jit
def _tap_fwd_kernel(
    x_ptr,  # *T   input, element (n, c, p) at n*stride_n + c*stride_c + p*stride_p
    y_ptr,  # *T   output (same strides as x); unused when WRITE_Y is False
    part1_ptr,  # *fp32 [G, SPLIT, C] partial shifted sums S1
    part2_ptr,  # *fp32 [G, SPLIT, C] partial shifted sums S2
    mean_ptr,  # *fp32 [C] running mean (the shift)
    var_ptr,  # *fp32 [C] running variance
    w_ptr,  # *fp32 [C] BN weight (gamma); unused without HAS_W
    b_ptr,  # *fp32 [C] BN bias (beta); unused without HAS_B
    r_ptr,  # *T   residual added before the activation (same strides as x); unused without HAS_R
    C,  # channels
    P,  # spatial positions per (n, c)
    rows_per_group,  # N / G
    chunk,  # positions (flattened over (n, p) of one segment) per split
    stride_n,
    stride_c,
    stride_p,
    eps,
    slope,  # leaky_relu's negative slope (unused by the other activations)
    SPLIT,  # splits per segment (runtime: one compiled kernel serves every shape)
    WRITE_Y: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,  # the activation epilogue, y = a(BN(x) [+ r]) (0: identity)
    HAS_R: tl.constexpr,  # a residual r is added before the activation (only with WRITE_Y)
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    g, s, offs_c, mask_c, j_start, j_end = _program_tile(C, P, rows_per_group, chunk, SPLIT, BLOCK_C)
    mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    if WRITE_Y:
        scale = _bn_scale(var_ptr, w_ptr, offs_c, mask_c, eps, HAS_W)
        if HAS_B:
            shift = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0)
        else:
            shift = tl.zeros([BLOCK_C], dtype=tl.float32)

    acc1 = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_J):
        off, mask = _tile_offsets(j0, j_end, g * rows_per_group, P, offs_c, mask_c, stride_n, stride_c, stride_p,
                                  BLOCK_J)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mu[:, None], 0.0)
        acc1 += d
        acc2 += d * d
        if WRITE_Y:
            u = d * scale[:, None] + shift[:, None]
            if HAS_R:
                u += tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)
            y = _activation(u, slope, ACT)
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
    out = (g * SPLIT + s) * C + offs_c
    tl.store(part1_ptr + out, tl.sum(acc1, axis=1), mask=mask_c)
    tl.store(part2_ptr + out, tl.sum(acc2, axis=1), mask=mask_c)


@triton.jit
def _tap_bwd_kernel(
    x_ptr,  # *T   input saved by the forward (strides as in the forward)
    dy_ptr,  # *T  gradient of y, same strides as x; unused without HAS_DY
    dx_ptr,  # *T  output gradient, same strides as x
    ds1_ptr,  # *fp32 [G, C] gradient of S1
    ds2_ptr,  # *fp32 [G, C] gradient of S2
    mean_ptr,  # *fp32 [C]
    var_ptr,  # *fp32 [C]; unused without HAS_DY
    w_ptr,  # *fp32 [C]; unused without HAS_W
    b_ptr,  # *fp32 [C]; read only for an activation's a'(u) with HAS_B
    r_ptr,  # *T   the forward's residual, same strides as x; unused without HAS_R
    dr_ptr,  # *T  the residual's gradient dy a'(u), same strides as x; unused without HAS_R
    C,
    P,
    rows_per_group,
    chunk,
    stride_n,
    stride_c,
    stride_p,
    eps,
    slope,
    SPLIT,
    HAS_DY: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    HAS_R: tl.constexpr,  # a residual went through a non-identity activation (only with HAS_DY)
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    g, s, offs_c, mask_c, j_start, j_end = _program_tile(C, P, rows_per_group, chunk, SPLIT, BLOCK_C)
    mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    g1 = tl.load(ds1_ptr + g * C + offs_c, mask=mask_c, other=0.0)
    g2 = 2.0 * tl.load(ds2_ptr + g * C + offs_c, mask=mask_c, other=0.0)
    if HAS_DY:
        scale = _bn_scale(var_ptr, w_ptr, offs_c, mask_c, eps, HAS_W)
        if HAS_B:
            shift = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0)
        else:
            shift = tl.zeros([BLOCK_C], dtype=tl.float32)

    for j0 in range(j_start, j_end, BLOCK_J):
        off, mask = _tile_offsets(j0, j_end, g * rows_per_group, P, offs_c, mask_c, stride_n, stride_c, stride_p,
                                  BLOCK_J)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        d = x - mu[:, None]
        dx = g1[:, None] + d * g2[:, None]
        if HAS_DY:
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if ACT != 0:  # dz = dy a'(u), u recomputed from the x (and r) read here
                u = d * scale[:, None] + shift[:, None]
                if HAS_R:
                    u += tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)
                dy = dy * _activation_slope(u, slope, ACT)
            if HAS_R:
                tl.store(dr_ptr + off, dy.to(dr_ptr.dtype.element_ty), mask=mask)
            dx += dy * scale[:, None]
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
TILE = 2048  # elements per (BLOCK_C x BLOCK_J) tile: two fp32 accumulators stay in registers
NUM_WARPS = 8  # 8 elements per thread per tile: ~70 registers, room for several programs per SM


def tap_config(n: int, c: int, p: int, groups: int, channel_contiguous: bool, programs: int) -> dict:
    """Tile shape and split count so that about ``programs`` programs share the work."""
    total = (n // groups) * p
    if channel_contiguous:  # channels_last: wide in C, coalesced along channels
        block_c = min(64, triton.next_power_of_2(c))
        block_j = max(1, min(TILE // block_c, triton.next_power_of_2(total)))
    else:  # NCHW: long rows along the flattened (n, p) axis
        block_j = min(512, triton.next_power_of_2(total))
        block_c = max(1, min(TILE // block_j, triton.next_power_of_2(c)))
    c_blocks = triton.cdiv(c, block_c)
    split = max(1, min(triton.cdiv(programs, c_blocks * groups), triton.cdiv(total, block_j)))
    chunk = triton.cdiv(triton.cdiv(total, split), block_j) * block_j
    split = triton.cdiv(total, chunk)
    return {"BLOCK_C": block_c, "BLOCK_J": block_j, "SPLIT": split, "chunk": chunk, "c_blocks": c_blocks}


INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WHERE = "fastdfd triton tap"


def _check_act(act: int) -> None:
    if act not in ACTIVATION_IDS.values():
        raise ValueError(f"{WHERE}: unknown activation id {act!r}; expected one of {ACTIVATION_IDS}")


def _check(x, groups: int, vectors: dict, sums: dict) -> None:
    """x and every per-channel operand, before raw addressing (x's strides: :func:`.layout.check_kernel_layout`)."""
    check_operand(WHERE, "x", x, device=x.device, dtypes=INPUT_DTYPES)
    if x.dim() < 2 or x.numel() == 0 or groups < 1 or x.shape[0] % groups:
        raise ValueError(f"{WHERE}: x {tuple(x.shape)} is not [N, C, *spatial], is empty, or does not split into "
                         f"{groups} groups")
    c = x.shape[1]
    for name, t in vectors.items():
        check_operand(WHERE, name, t, device=x.device, dtypes=(torch.float32,), numel=c, contiguous=True)
    for name, t in sums.items():
        check_operand(WHERE, name, t, device=x.device, dtypes=(torch.float32,), numel=groups * c, contiguous=True)


def _check_residual(x, residual) -> None:
    if residual is not None:
        check_operand(WHERE, "residual", residual, device=x.device, dtypes=(x.dtype,), shape=tuple(x.shape))


def tap_forward(x, mean, var, weight, bias, eps: float, groups: int, write_y: bool, programs: int, act: int = 0,
                slope: float = 0.0, residual=None):
    """Launch the forward; returns (y or None, S1 [G, C], S2 [G, C]); y has x's kernel-layout strides.
    ``act``/``slope``: the activation epilogue (ACTIVATION_IDS of .layout); ``residual``: None or a tensor of
    x's dtype and shape added before it (read in x's kernel layout; a copy when its strides differ)."""
    _check_act(act)
    _check(x, groups, {"mean": mean, "var": var if write_y else None, "weight": weight, "bias": bias}, {})
    _check_residual(x, residual)
    x, strides = kernel_layout(x)
    residual = like_strides(residual, x) if write_y else None
    n, c = x.shape[0], x.shape[1]
    p = x.numel() // (n * c)
    cfg = tap_config(n, c, p, groups, strides[1] == 1 and c > 1, programs)
    y = empty_kernel_like(x) if write_y else None
    check_kernel_layout(x, strides, y, residual)
    with on_device(x):
        part1 = torch.empty((groups, cfg["SPLIT"], c), device=x.device, dtype=torch.float32)
        part2 = torch.empty_like(part1)
        _tap_fwd_kernel[(cfg["c_blocks"], groups * cfg["SPLIT"])](
            x, y if write_y else x, part1, part2, mean, var,
            weight if weight is not None else mean, bias if bias is not None else mean,
            residual if residual is not None else x,
            c, p, n // groups, cfg["chunk"], *strides, float(eps), float(slope), cfg["SPLIT"],
            WRITE_Y=write_y, HAS_W=weight is not None, HAS_B=bias is not None, ACT=int(act) if write_y else 0,
            HAS_R=residual is not None, BLOCK_C=cfg["BLOCK_C"], BLOCK_J=cfg["BLOCK_J"], num_warps=NUM_WARPS,
        )
        if cfg["SPLIT"] == 1:
            return y, part1.view(groups, c), part2.view(groups, c)
        return y, part1.sum(dim=1), part2.sum(dim=1)


def tap_backward(x, dy, ds1, ds2, mean, var, weight, eps: float, groups: int, programs: int, bias=None, act: int = 0,
                 slope: float = 0.0, residual=None):
    """Launch the backward; returns (dx, dr or None), both with x's kernel-layout strides. ``bias``, ``act``,
    ``slope``, ``residual``: the forward's, for the activation's a'(u); dr = dy a'(u) is written when a residual
    is given with dy and a non-identity activation (with the identity it is dy, and no residual is needed)."""
    _check_act(act)
    _check(x, groups, {"mean": mean, "var": var, "weight": weight, "bias": bias}, {"ds1": ds1, "ds2": ds2})
    check_operand(WHERE, "dy", dy, device=x.device, dtypes=(x.dtype,), shape=tuple(x.shape))
    _check_residual(x, residual)
    x, strides = kernel_layout(x)
    dy = like_strides(dy, x)
    residual = like_strides(residual, x) if dy is not None and act else None
    n, c = x.shape[0], x.shape[1]
    p = x.numel() // (n * c)
    cfg = tap_config(n, c, p, groups, strides[1] == 1 and c > 1, programs)
    dx = empty_kernel_like(x)
    dr = empty_kernel_like(x) if residual is not None else None
    check_kernel_layout(x, strides, dy, dx, residual, dr)
    with on_device(x):
        _tap_bwd_kernel[(cfg["c_blocks"], groups * cfg["SPLIT"])](
            x, dy if dy is not None else x, dx, ds1, ds2, mean, var, weight if weight is not None else mean,
            bias if bias is not None else mean, residual if residual is not None else x, dr if dr is not None else dx,
            c, p, n // groups, cfg["chunk"], *strides, float(eps), float(slope), cfg["SPLIT"],
            HAS_DY=dy is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            ACT=int(act) if dy is not None else 0, HAS_R=residual is not None,
            BLOCK_C=cfg["BLOCK_C"], BLOCK_J=cfg["BLOCK_J"], num_warps=NUM_WARPS,
        )
    return dx, dr
