"""Each generator's running teacher top-1 on its own training images: which class generator has taken off, and when.

Why: on the pretrained EfficientNet-Lite0 (docs/generators.md) the ensemble's mean top-1 hides what fails. Per
generator, the teacher's top-1 sits near 0 for a stretch of its own steps (under 25 to several hundred) and then
climbs to 80-100%; the classes take off in a different order with each setting, and a generator that has not taken
off by the end of the budget leaves the ensemble's top-1 ten points short. This is the figure that shows it, per
class, during training, where the quality report (:mod:`fastdfd.train.quality`) shows it only at the end.

What is measured: per generator, the fraction of its step's images that the teacher assigns to their intended
class, averaged with decay ``BETA`` per step of that generator (about its last 10 steps) and bias-corrected by the
number of steps it has been averaged over, as Adam corrects its moments. Updated inside the step on the step's
device (part of a captured CUDA graph; no host sync where the ensemble lives on that device: under offload the
chunk's row indices cross from the host). Read on the host only when asked
(:meth:`fastdfd.train.GeneratorTrainer.generator_top1`).
"""

from __future__ import annotations

import torch

__all__ = ["RunningTop1"]


class RunningTop1:
    """The running teacher top-1 of each of ``num_generators`` generators (this rank's shard under
    torch.distributed), kept on ``device`` (where the step computes)."""

    BETA = 0.9  # decay per own step: a mean over about the last 10 steps

    def __init__(self, num_generators: int, device: torch.device):
        self.running = torch.zeros(num_generators, dtype=torch.float32, device=device)  # not bias-corrected
        # steps averaged, per generator: its own, not StackedAdam's per-row counts, which a checkpoint written before
        # this figure existed restores without a running mean to match (and which live on the host under offload)
        self.count = torch.zeros(num_generators, dtype=torch.float32, device=device)

    def tensors(self) -> list[torch.Tensor]:
        """What :meth:`update` writes in place (a CUDA-graph capture's persistent state)."""
        return [self.running, self.count]

    def update(self, rows: torch.Tensor | None, hits: torch.Tensor) -> None:
        """Fold one step's top-1 into the running mean: ``hits`` float32 [k], the top-1 of generators ``rows``
        (int64 [k], indices into the ensemble, any device; None: all K generators, in order)."""
        b = self.BETA
        if rows is None:
            self.running.mul_(b).add_(hits, alpha=1 - b)
            self.count.add_(1)
            return
        rows = rows.to(self.running.device, non_blocking=True)
        self.running.index_copy_(0, rows, self.running.index_select(0, rows) * b + hits * (1 - b))
        self.count.index_add_(0, rows, torch.ones_like(hits))

    def value(self) -> torch.Tensor:
        """Every generator's running top-1, float32 [K] in [0, 1] on the step's device, bias-corrected by its count;
        0 for a generator with no step counted yet."""
        correction = (1 - self.BETA ** self.count).clamp_min(1e-12)
        return torch.where(self.count > 0, self.running / correction, torch.zeros_like(self.running))

    def state_dict(self) -> dict:
        return {"running": self.running.detach().cpu().clone(), "count": self.count.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("running", "count"):
            if tuple(state[key].shape) != tuple(self.running.shape):
                raise ValueError(f"the running top-1's {key} holds {tuple(state[key].shape)} generators, expected "
                                 f"{tuple(self.running.shape)}")
        self.running.copy_(state["running"])
        self.count.copy_(state["count"])
