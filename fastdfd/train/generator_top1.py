"""Each generator's running teacher top-1 on its own training images: which class generator has taken off, and when.

Why: on the pretrained EfficientNet-Lite0 (docs/generators.md) the ensemble's mean top-1 hides what fails. Per
generator, the teacher's top-1 sits at 0 for a stretch of its own steps (from 25 to more than 685) and then climbs to
80-100% within about 100 steps; the classes take off in a different order with each setting, and a generator that
has not taken off by the end of the budget leaves the ensemble's top-1 ten points short. This is the figure that
shows it, per class, during training, where the quality report (:mod:`fastdfd.train.quality`) shows it only at the
end.

What is measured: per generator, the fraction of its step's images that the teacher assigns to their intended
class, averaged with decay ``BETA`` per step of that generator (about its last 10 steps) and bias-corrected by its
own step count (the optimiser's per-generator count), as Adam corrects its moments. Updated inside the step on the
device: no host sync, and part of a captured CUDA graph. Read on the host only when asked
(:meth:`fastdfd.train.GeneratorTrainer.generator_top1`).
"""

from __future__ import annotations

import torch

from .optim import StackedAdam

__all__ = ["RunningTop1"]


class RunningTop1:
    """The running teacher top-1 of each generator of one trainer's ensemble (this rank's shard).

    Args:
        num_generators: K, the generators of the ensemble (of this rank's shard under torch.distributed).
        optimizer: the trainer's :class:`StackedAdam`: its per-row step counts are the generators' ages.
        device: where the step computes (the running figure lives there).
    """

    BETA = 0.9  # decay per own step: a mean over about the last 10 steps

    def __init__(self, num_generators: int, optimizer: StackedAdam, device: torch.device):
        self.optimizer = optimizer
        self.running = torch.zeros(num_generators, dtype=torch.float32, device=device)  # not bias-corrected

    def update(self, rows: torch.Tensor | None, hits: torch.Tensor) -> None:
        """Fold one step's top-1 of generators ``rows`` (all when None), ``hits`` float32 [k], into the running mean.
        No host sync: it runs inside the (possibly captured) step."""
        b = self.BETA
        if rows is None:
            self.running.mul_(b).add_(hits, alpha=1 - b)
            return
        rows = rows.to(self.running.device)
        self.running.index_copy_(0, rows, self.running.index_select(0, rows) * b + hits * (1 - b))

    def value(self) -> torch.Tensor:
        """Every generator's running top-1, float32 [K] in [0, 1] on the step's device, bias-corrected by its age;
        0 for a generator that has not trained yet."""
        age = self.optimizer.steps.to(self.running.device)
        correction = (1 - self.BETA ** age).clamp_min(1e-12).float()
        return torch.where(age > 0, self.running / correction, torch.zeros_like(self.running))

    def state_dict(self) -> dict:
        return {"running": self.running.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["running"].shape) != tuple(self.running.shape):
            raise ValueError(f"the running top-1 holds {tuple(state['running'].shape)} generators, expected "
                             f"{tuple(self.running.shape)}")
        self.running.copy_(state["running"])
