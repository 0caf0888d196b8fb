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
        """Pack per-layer running statistics (detached copies; the teacher is never touched).

        Reads nothing back from the device, but copies three small host tensors to it
        (blocking copies, which wait for the device's stream): build once, reuse.
        """
        if not (len(means) == len(variances) == len(eps)) or not means:
            raise ValueError("need the same, non-zero number of means, variances and eps values")
        device = means[0].device
        sizes = [int(m.numel()) for m in means]
        mean = torch.cat([m.detach().reshape(-1).to(dtype) for m in means])
        var = torch.cat([v.detach().reshape(-1).to(dtype) for v in variances])
        eps_c = torch.cat([torch.full((n,), float(e), dtype=dtype, device=device) for n, e in zip(sizes, eps)])
        # from the Python sizes, then one copy: repeat_interleave on a device would read the total size
        # back, and under torch.compile's trace its output size is data-dependent
        layer = torch.tensor([i for i, n in enumerate(sizes) for _ in range(n)], dtype=torch.int64).to(device)
        channels = torch.tensor(sizes, dtype=dtype, device=device)
        offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
        return PackedLayout(mean, var, eps_c, layer, channels, offsets, len(sizes))

    def counts(self, per_layer: Sequence[int]) -> torch.Tensor:
        """Per-channel element counts from per-layer counts (one small host-to-device copy).

        A blocking host-to-device copy waits for the device's current stream (PyTorch
        synchronises the stream after a copy from pageable memory): build it once per
        shape and reuse it, as the matcher does.
        """
        c = torch.tensor(per_layer, dtype=self.running_mean.dtype).to(self.running_mean.device)
        return c[self.layer]


