"""Triton first layer of K class-conditional generators, with BN statistics in the epilogue.

For generator k, latents z[k] [B, L] and the position local[k, b] of each label in the
generator's own class set::

    h[k, b, :] = z[k, b, :] @ Wz[k] + Wy[k, local[k, b], :]          h: [K, B, D]

which equals concat(z, onehot(local)) @ concat(Wz, Wy): the one-hot half of the matmul is
a row gather, so the cost does not grow with the number of classes (1000 at ImageNet).

The epilogue also writes per-(k, feature) partial sums of h and h^2 over this program's
rows, part[k, m_tile, d] (deterministic: no atomics). The caller folds features into BN
channels (D = C0 * s0 * s0) and sums the tiles: the train-mode BN that follows needs
nothing else, and h is not read again for its statistics.

Grid: (cdiv(B, BLOCK_M), cdiv(D, BLOCK_N), K); K is a grid axis, so K generators cost
one launch. The backward is two batched GEMMs and a scatter-add, left to cuBLAS/ATen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import on_device
from .layout import TRITON_FLOATS, check_linear_gather

NUM_WARPS = 4


@triton.jit
def _linear_gather_kernel(
    z_ptr,  # [K, B, L] latents, contiguous
    wz_ptr,  # [K, L, D] latent weights, contiguous
    wy_ptr,  # [K, NCLS, D] label rows, contiguous
    local_ptr,  # [K, B] int64 label position within each generator's class set
    h_ptr,  # [K, B, D] output
    part1_ptr,  # [K, M_TILES, D] fp32 partial sum of h
    part2_ptr,  # [K, M_TILES, D] fp32 partial sum of h^2
    B, L, D, NCLS,
    STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < B
    mask_n = offs_n < D
    z_base = z_ptr + k * B * L
    w_base = wz_ptr + k * L * D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_K):
        offs_k = l0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < L
        a = tl.load(z_base + offs_m[:, None] * L + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_base + offs_k[:, None] * D + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(a.to(w.dtype), w)
    mask = mask_m[:, None] & mask_n[None, :]
    row = tl.load(local_ptr + k * B + offs_m, mask=mask_m, other=0)
    # a label position outside [0, NCLS) reads nothing (never memory past Wy); callers validate labels
    in_range = mask & ((row >= 0) & (row < NCLS))[:, None]
    acc += tl.load(wy_ptr + k * NCLS * D + row[:, None] * D + offs_n[None, :], mask=in_range, other=0.0).to(tl.float32)
    tl.store(h_ptr + k * B * D + offs_m[:, None] * D + offs_n[None, :], acc.to(h_ptr.dtype.element_ty), mask=mask)
    if STATS:
        hv = tl.where(mask, acc, 0.0)
        part = (k * tl.num_programs(0) + pid_m) * D + offs_n
        tl.store(part1_ptr + part, tl.sum(hv, axis=0), mask=mask_n)
        tl.store(part2_ptr + part, tl.sum(hv * hv, axis=0), mask=mask_n)


def linear_gather_config(batch: int, features: int, latent: int) -> dict:
    """Tile sizes: tl.dot needs every block >= 16; small batches (K = 1000 x B = 4) get 16 rows."""
    block_m = 16 if batch <= 16 else (32 if batch <= 32 else 64)
    block_n = 64 if features >= 64 else max(16, triton.next_power_of_2(features))
    block_k = 32 if latent >= 32 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}


def linear_gather(z: torch.Tensor, wz: torch.Tensor, wy: torch.Tensor, local: torch.Tensor, stats: bool = True):
    """h [K, B, D] and, if ``stats``, fp32 per-(k, feature) sums of h and h^2 ([K, D] each)."""
    check_linear_gather(z, wz, wy, local, floats=TRITON_FLOATS)
    k, b, lat = z.shape
    d = wz.shape[2]
    z, wz, wy, local = z.contiguous(), wz.contiguous(), wy.contiguous(), local.contiguous()
    with on_device(z):
        h = torch.empty(k, b, d, device=z.device, dtype=wz.dtype)
        cfg = linear_gather_config(b, d, lat)
        m_tiles = triton.cdiv(b, cfg["BLOCK_M"])
        shape = (k, m_tiles, d) if stats else (1,)
        part1 = torch.empty(shape, device=z.device, dtype=torch.float32)
        part2 = torch.empty(shape, device=z.device, dtype=torch.float32)
        grid = (m_tiles, triton.cdiv(d, cfg["BLOCK_N"]), k)
        _linear_gather_kernel[grid](z, wz, wy, local, h, part1, part2, b, lat, d, wy.shape[1], STATS=stats,
                                    num_warps=NUM_WARPS, **cfg)
    if not stats:
        return h, None, None
    return h, part1.sum(1), part2.sum(1)
