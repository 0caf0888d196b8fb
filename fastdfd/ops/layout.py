"""The packed layout of many BN layers' statistics, for one finalize over all layers.

A teacher has 20-60 BN layers with a few hundred channels each. Their per-(segment,
channel) power sums are concatenated along the channel axis into one [G, C_total]
buffer; this layout carries, per packed channel, what the distance needs (running
mean/var, eps, which layer it belongs to). It is built once per teacher (the running
statistics are constant while attached) and reused every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PackedLayout:
    running_mean: torch.Tensor  # [C_total], accumulation dtype
    running_var: torch.Tensor  # [C_total]
    eps: torch.Tensor  # [C_total], each channel's layer eps
    layer: torch.Tensor  # [C_total] int64, index of the owning layer
    channels: torch.Tensor  # [L], channel count per layer (accumulation dtype, for means)
    offsets: torch.Tensor  # [L + 1] int32, first packed channel of each layer (for kernels)
    num_layers: int

    @staticmethod
    def build(
        means: Sequence[torch.Tensor],
        variances: Sequence[torch.Tensor],
        eps: Sequence[float],
        dtype: torch.dtype = torch.float32,
    ) -> "PackedLayout":
        """Pack per-layer running statistics (detached copies; the teacher is never touched)."""
        if not (len(means) == len(variances) == len(eps)) or not means:
            raise ValueError("need the same, non-zero number of means, variances and eps values")
        device = means[0].device
        sizes = [int(m.numel()) for m in means]
        mean = torch.cat([m.detach().reshape(-1).to(dtype) for m in means])
        var = torch.cat([v.detach().reshape(-1).to(dtype) for v in variances])
        eps_c = torch.cat([torch.full((n,), float(e), dtype=dtype, device=device) for n, e in zip(sizes, eps)])
        layer = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        channels = torch.tensor(sizes, dtype=dtype, device=device)
        offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
        return PackedLayout(mean, var, eps_c, layer, channels, offsets, len(sizes))

    def counts(self, per_layer: Sequence[int]) -> torch.Tensor:
        """Per-channel element counts from per-layer counts (one small host-to-device copy)."""
        c = torch.tensor(per_layer, dtype=self.running_mean.dtype).to(self.running_mean.device)
        return c[self.layer]


def flat_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_p) when x's spatial dims flatten to one strided axis, else None.

    Kernels address element (n, c, p) of an [N, C, *spatial] tensor at
    n*stride_n + c*stride_c + p*stride_p: NCHW has stride_p == 1, channels_last stride_c == 1.
    """
    sizes, strides = x.shape, x.stride()
    spatial = [(s, st) for s, st in zip(sizes[2:], strides[2:]) if s != 1]
    for (_, outer), (size, inner) in zip(spatial, spatial[1:]):
        if outer != inner * size:
            return None
    stride_p = spatial[-1][1] if spatial else 1
    return strides[0], strides[1], stride_p


def kernel_layout(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x (copied to contiguous only if its strides cannot be flattened) and its flat strides."""
    strides = flat_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = flat_strides(x)
    return x, strides


def like_strides(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` (e.g. dy) with exactly x's strides, copied only when they differ (kernels index both alike)."""
    if t is None or t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)
