"""Triton batched 3x3 convolution of K generators, with the generator's elementwise chain fused.

Activations are generator-major, x [K, B, CIN, h, w]; generator k has its own weights
W[k] [COUT, CIN, 3, 3]. One layer of the generator is, per generator::

    a  = leaky_relu(x * scale[k, ci] + shift[k, ci])      prologue: the previous train-mode BN
    u  = upsample_nearest(a, UP)                          (UP = 2 inside, 1 at the output layer)
    y  = conv3x3(u, W[k], padding=1) (+ bias[k])          implicit GEMM, K a grid axis
    y  = tanh(y)                                          (output layer only)
    S1[k, co] = sum y      S2[k, co] = sum y^2            epilogue: the next BN's statistics

The prologue runs on the operand tile as it is loaded: a and u are never written (u is
UP^2 times larger than x). Statistics are partial sums per (k, row tile, co) that the
launcher adds up: deterministic, no atomics.

Backward. The statistics are differentiable outputs, so with dy, dS1, dS2 from above the
gradient at the conv output is (t = the stored output; tanh' = 1 - t^2)::

    g = (dy + dS1[k, co] + 2 * t * dS2[k, co]) * (1 - t^2 if TANH else 1)

and it is formed on load, inside both backward kernels (never written):

- dgrad, over low-resolution input pixels: du = conv3x3^T(g, W) summed over the UP x UP
  block that each input pixel was copied to (the upsample's backward), then in the
  epilogue the prologue's backward: dv = du * (v > 0 ? 1 : slope) with v recomputed from
  x, dx = dv * scale, and partial sums of dv * x (-> dscale) and dv (-> dshift).
- wgrad: dW[k, tap] = act^T @ g over all output pixels, with act rebuilt from x by the
  same prologue (nothing saved but x and the output t).

Weights are read as Wt [K, 9, CIN, COUT] (the launcher permutes the small weight tensor once)
so every tile load is contiguous along COUT.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import on_device
from .layout import TRITON_FLOATS, check_conv

NUM_WARPS = 8


@triton.jit
def _act_tile(x_ptr, offs, mask, sc, sh, PROLOGUE: tl.constexpr, SLOPE: tl.constexpr):
    """The conv's input operand: leaky_relu(x * scale + shift), zero outside the image."""
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE:
        a = a * sc + sh
        a = tl.where(a > 0, a, a * SLOPE)
        a = tl.where(mask, a, 0.0)
    return a


@triton.jit
def _grad_tile(dy_ptr, t_ptr, offs, mask, ds1, ds2, TANH: tl.constexpr):
    """Gradient at the conv's pre-activation output, from dy and the statistics' gradients."""
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = g + ds1 + 2.0 * t * ds2
    if TANH:
        g = g * (1.0 - t * t)
    return tl.where(mask, g, 0.0)


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates to +-1 without inf/inf (triton has no portable tanh).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # [K, B, CIN, h, w] pre-activation input (h = H / UP)
    scale_ptr,  # [K, CIN] fp32 prologue slope
    shift_ptr,  # [K, CIN] fp32 prologue offset
    wt_ptr,  # [K, 9, CIN, COUT] weights, tap-major
    bias_ptr,  # [K, COUT] (read only if HAS_BIAS)
    y_ptr,  # [K, B, COUT, H, W] output
    part1_ptr,  # [K, M_TILES, COUT] fp32 partial sum of y
    part2_ptr,  # [K, M_TILES, COUT] fp32 partial sum of y^2
    B, CIN, COUT, H, W,
    UP: tl.constexpr, PROLOGUE: tl.constexpr, SLOPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k = tl.program_id(2).to(tl.int64)
    hw = H * W
    lo_h = H // UP
    lo_w = W // UP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel (b, oy, ox) of generator k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel
    mask_m = offs_m < B * hw
    mask_n = offs_n < COUT
    b = offs_m // hw
    oy = (offs_m % hw) // W
    ox = offs_m % W
    x_base = x_ptr + k * B * CIN * lo_h * lo_w
    w_base = wt_ptr + k * 9 * CIN * COUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(9):
        iy = oy + tap // 3 - 1
        ix = ox + tap % 3 - 1
        inside = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        # nearest upsample: conv-input pixel (iy, ix) is stored pixel (iy // UP, ix // UP)
        pix = b * CIN * lo_h * lo_w + (iy // UP) * lo_w + ix // UP
        for c0 in range(0, CIN, BLOCK_K):
            offs_k = c0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < CIN
            sc = tl.load(scale_ptr + k * CIN + offs_k, mask=mask_k, other=0.0)
            sh = tl.load(shift_ptr + k * CIN + offs_k, mask=mask_k, other=0.0)
            amask = inside[:, None] & mask_k[None, :]
            a = _act_tile(x_base, pix[:, None] + offs_k[None, :] * (lo_h * lo_w), amask, sc[None, :], sh[None, :],
                          PROLOGUE, SLOPE)
            w = tl.load(w_base + (tap * CIN + offs_k[:, None]) * COUT + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc += tl.dot(a.to(w.dtype), w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k * COUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if TANH:
        acc = _tanh(acc)
    mask = mask_m[:, None] & mask_n[None, :]
    y_offs = k * B * COUT * hw + b[:, None] * COUT * hw + offs_n[None, :] * hw + (offs_m % hw)[:, None]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if STATS:
        yv = tl.where(mask, acc, 0.0)
        part = (k * tl.num_programs(0) + pid_m) * COUT + offs_n
        tl.store(part1_ptr + part, tl.sum(yv, axis=0), mask=mask_n)
        tl.store(part2_ptr + part, tl.sum(yv * yv, axis=0), mask=mask_n)


@triton.jit
def _conv_dgrad_kernel(
    x_ptr,  # [K, B, CIN, h, w] the forward's input
    scale_ptr, shift_ptr,  # [K, CIN] fp32, the forward's prologue
    wt_ptr,  # [K, 9, CIN, COUT]
    dy_ptr,  # [K, B, COUT, H, W] gradient of the output
    t_ptr,  # [K, B, COUT, H, W] the forward's output
    ds1_ptr, ds2_ptr,  # [K, COUT] fp32 gradients of the statistics
    dx_ptr,  # [K, B, CIN, h, w] output
    part1_ptr,  # [K, M_TILES, CIN] fp32 partial sum of dv * x   (-> dscale)
    part2_ptr,  # [K, M_TILES, CIN] fp32 partial sum of dv       (-> dshift)
    B, CIN, COUT, H, W,
    UP: tl.constexpr, PROLOGUE: tl.constexpr, SLOPE: tl.constexpr, TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k = tl.program_id(2).to(tl.int64)
    hw = H * W
    lo_h = H // UP
    lo_w = W // UP
    lo_hw = lo_h * lo_w
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # stored input pixel (b, i, j)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel
    mask_m = offs_m < B * lo_hw
    mask_n = offs_n < CIN
    b = offs_m // lo_hw
    i = (offs_m % lo_hw) // lo_w
    j = offs_m % lo_w
    g_base = k * B * COUT * hw + b * COUT * hw
    w_base = wt_ptr + k * 9 * CIN * COUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for sub in range(UP * UP):  # the UP x UP conv-input pixels this stored pixel was copied to
        uy = i * UP + sub // UP
        ux = j * UP + sub % UP
        for tap in range(9):  # output pixel o used input u through tap (r, s) iff o = u - (r, s) + 1
            oy = uy - tap // 3 + 1
            ox = ux - tap % 3 + 1
            inside = mask_m & (oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)
            g_offs = g_base + oy * W + ox
            for c0 in range(0, COUT, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < COUT
                ds1 = tl.load(ds1_ptr + k * COUT + offs_k, mask=mask_k, other=0.0)
                ds2 = tl.load(ds2_ptr + k * COUT + offs_k, mask=mask_k, other=0.0)
                g = _grad_tile(dy_ptr, t_ptr, g_offs[:, None] + offs_k[None, :] * hw, inside[:, None] & mask_k[None, :],
                               ds1[None, :], ds2[None, :], TANH)
                w = tl.load(w_base + (tap * CIN + offs_n[None, :]) * COUT + offs_k[:, None],
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K (co), BLOCK_N (ci)]
                acc += tl.dot(g.to(w.dtype), w)
    mask = mask_m[:, None] & mask_n[None, :]
    x_offs = k * B * CIN * lo_hw + b[:, None] * CIN * lo_hw + offs_n[None, :] * lo_hw + (offs_m % lo_hw)[:, None]
    if PROLOGUE:
        sc = tl.load(scale_ptr + k * CIN + offs_n, mask=mask_n, other=0.0)[None, :]
        sh = tl.load(shift_ptr + k * CIN + offs_n, mask=mask_n, other=0.0)[None, :]
        xv = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        dv = tl.where(xv * sc + sh > 0, acc, acc * SLOPE)
        dv = tl.where(mask, dv, 0.0)
        part = (k * tl.num_programs(0) + pid_m) * CIN + offs_n
        tl.store(part1_ptr + part, tl.sum(dv * xv, axis=0), mask=mask_n)
        tl.store(part2_ptr + part, tl.sum(dv, axis=0), mask=mask_n)
        acc = dv * sc
    tl.store(dx_ptr + x_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_wgrad_kernel(
    x_ptr,  # [K, B, CIN, h, w]
    scale_ptr, shift_ptr,  # [K, CIN] fp32
    dy_ptr, t_ptr,  # [K, B, COUT, H, W]
    ds1_ptr, ds2_ptr,  # [K, COUT] fp32
    dwt_ptr,  # [K, 9, CIN, COUT] fp32 output
    B, CIN, COUT, H, W,
    UP: tl.constexpr, PROLOGUE: tl.constexpr, SLOPE: tl.constexpr, TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    kt = tl.program_id(2)
    k = (kt // 9).to(tl.int64)
    tap = kt % 9
    hw = H * W
    lo_h = H // UP
    lo_w = W // UP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input channel
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel
    mask_m = offs_m < CIN
    mask_n = offs_n < COUT
    sc = tl.load(scale_ptr + k * CIN + offs_m, mask=mask_m, other=0.0)[:, None]
    sh = tl.load(shift_ptr + k * CIN + offs_m, mask=mask_m, other=0.0)[:, None]
    ds1 = tl.load(ds1_ptr + k * COUT + offs_n, mask=mask_n, other=0.0)[None, :]
    ds2 = tl.load(ds2_ptr + k * COUT + offs_n, mask=mask_n, other=0.0)[None, :]
    x_base = x_ptr + k * B * CIN * lo_h * lo_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, B * hw, BLOCK_K):  # reduction over every output pixel of generator k
        offs_p = p0 + tl.arange(0, BLOCK_K)
        mask_p = offs_p < B * hw
        b = offs_p // hw
        oy = (offs_p % hw) // W
        ox = offs_p % W
        iy = oy + tap // 3 - 1
        ix = ox + tap % 3 - 1
        inside = mask_p & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        pix = b * CIN * lo_h * lo_w + (iy // UP) * lo_w + ix // UP
        a = _act_tile(x_base, offs_m[:, None] * (lo_h * lo_w) + pix[None, :], mask_m[:, None] & inside[None, :],
                      sc, sh, PROLOGUE, SLOPE)  # [BLOCK_M (ci), BLOCK_K (pixels)]
        g_offs = k * B * COUT * hw + b[:, None] * COUT * hw + offs_n[None, :] * hw + (offs_p % hw)[:, None]
        g = _grad_tile(dy_ptr, t_ptr, g_offs, mask_p[:, None] & mask_n[None, :], ds1, ds2, TANH)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(a.to(dy_ptr.dtype.element_ty), g.to(dy_ptr.dtype.element_ty))
    out = dwt_ptr + (k * 9 + tap) * CIN * COUT + offs_m[:, None] * COUT + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


def _block(n: int, cap: int) -> int:
    """A power-of-two block for a channel count: >= 16 (tl.dot's minimum), <= cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def conv_configs(cin: int, cout: int, elem_bytes: int) -> dict[str, dict]:
    """Tile sizes of the three kernels for one layer's channel counts and operand width.

    The operand tiles are built in registers (prologue on load) and software-pipelined, so
    their K depth sets the register count. Compiled for sm_90 under Triton 3.6, the K depths
    fwd 32 (fp32) and wgrad 64 sat at 236-255 registers of 255; the K depths below give at
    most 181 under 3.6 and 3.9 (python -m fastdfd.kernels.tools.aot_versions). Tile M and N, and
    so the wgmma shape, are unchanged; the dot accumulates over K in the MMA's own k-steps
    whatever the block depth.
    """
    return {
        "fwd": {"BLOCK_M": 64, "BLOCK_N": _block(cout, 64), "BLOCK_K": _block(cin, 16 if elem_bytes >= 4 else 32)},
        "dgrad": {"BLOCK_M": 64, "BLOCK_N": _block(cin, 64), "BLOCK_K": 16},  # g is formed from two loads
        "wgrad": {"BLOCK_M": _block(cin, 64), "BLOCK_N": _block(cout, 64), "BLOCK_K": 32},
    }


def _flags(prologue: bool, slope: float, upsample: int, tanh: bool) -> dict:
    return {"UP": int(upsample), "PROLOGUE": bool(prologue), "SLOPE": float(slope), "TANH": bool(tanh)}


def conv_forward(x, scale, shift, weight, bias, *, upsample: int, slope: float, tanh: bool, stats: bool = True):
    """y [K, B, COUT, H*UP, W*UP] and fp32 sums of y, y^2 per (k, co) (None if not ``stats``)."""
    check_conv(x, scale, shift, weight, bias, upsample, floats=TRITON_FLOATS)
    with on_device(x):
        return _conv_forward(x, scale, shift, weight, bias, upsample, slope, tanh, stats)


def _conv_forward(x, scale, shift, weight, bias, upsample, slope, tanh, stats):
    k, b, cin, h, w = x.shape
    cout = weight.shape[1]
    big_h, big_w = h * upsample, w * upsample
    x = x.contiguous()
    wt = weight.permute(0, 3, 4, 2, 1).reshape(k, 9, cin, cout).contiguous()
    y = torch.empty(k, b, cout, big_h, big_w, device=x.device, dtype=weight.dtype)
    cfg = conv_configs(cin, cout, weight.element_size())["fwd"]
    m_tiles = triton.cdiv(b * big_h * big_w, cfg["BLOCK_M"])
    part1 = torch.empty((k, m_tiles, cout) if stats else (1,), device=x.device, dtype=torch.float32)
    part2 = torch.empty_like(part1)
    prologue = scale is not None
    dummy = part1
    flags = _flags(prologue, slope, upsample, tanh)
    _conv_fwd_kernel[(m_tiles, triton.cdiv(cout, cfg["BLOCK_N"]), k)](
        x, scale.contiguous() if prologue else dummy, shift.contiguous() if prologue else dummy, wt,
        bias.contiguous() if bias is not None else dummy, y, part1, part2, b, cin, cout, big_h, big_w,
        HAS_BIAS=bias is not None, STATS=stats, num_warps=NUM_WARPS, **flags, **cfg,
    )
    if not stats:
        return y, None, None
    return y, part1.sum(1), part2.sum(1)


def conv_backward(x, scale, shift, weight, t, dy, ds1, ds2, *, upsample: int, slope: float, tanh: bool):
    """(dx, dscale, dshift, dweight) of :func:`conv_forward`; dscale/dshift are None without a prologue."""
    check_conv(x, scale, shift, weight, None, upsample, t, dy, ds1, ds2, floats=TRITON_FLOATS)
    with on_device(x):
        return _conv_backward(x, scale, shift, weight, t, dy, ds1, ds2, upsample, slope, tanh)


def _conv_backward(x, scale, shift, weight, t, dy, ds1, ds2, upsample, slope, tanh):
    k, b, cin, h, w = x.shape
    cout = weight.shape[1]
    big_h, big_w = h * upsample, w * upsample
    x, t, dy = x.contiguous(), t.contiguous(), dy.contiguous()
    ds1, ds2 = ds1.contiguous(), ds2.contiguous()
    wt = weight.permute(0, 3, 4, 2, 1).reshape(k, 9, cin, cout).contiguous()
    prologue = scale is not None
    sc = scale.contiguous() if prologue else ds1
    sh = shift.contiguous() if prologue else ds1
    flags = _flags(prologue, slope, upsample, tanh)
    cfgs = conv_configs(cin, cout, weight.element_size())

    cfg = cfgs["dgrad"]
    m_tiles = triton.cdiv(b * h * w, cfg["BLOCK_M"])
    dx = torch.empty_like(x)
    part1 = torch.empty((k, m_tiles, cin) if prologue else (1,), device=x.device, dtype=torch.float32)
    part2 = torch.empty_like(part1)
    _conv_dgrad_kernel[(m_tiles, triton.cdiv(cin, cfg["BLOCK_N"]), k)](
        x, sc, sh, wt, dy, t, ds1, ds2, dx, part1, part2, b, cin, cout, big_h, big_w,
        num_warps=NUM_WARPS, **flags, **cfg,
    )

    cfg = cfgs["wgrad"]
    dwt = torch.empty(k, 9, cin, cout, device=x.device, dtype=torch.float32)
    _conv_wgrad_kernel[(triton.cdiv(cin, cfg["BLOCK_M"]), triton.cdiv(cout, cfg["BLOCK_N"]), k * 9)](
        x, sc, sh, dy, t, ds1, ds2, dwt, b, cin, cout, big_h, big_w, num_warps=NUM_WARPS, **flags, **cfg,
    )
    dweight = dwt.view(k, 3, 3, cin, cout).permute(0, 4, 3, 1, 2).to(weight.dtype)
    if not prologue:
        return dx, None, None, dweight
    return dx, part1.sum(1), part2.sum(1), dweight
