"""The restart of a generator that fails whole: each generator's running teacher top-1, and a fresh start for one
whose top-1 stays below a floor.

Why: on the pretrained EfficientNet-Lite0 (docs/generators.md) nine of ten class generators climb to 84-100%
teacher top-1 in 14 CPU-minutes, and one stays at 0% to the end: golden retriever with one cross-entropy weight,
tabby with another, from the same initial weights. The failure belongs to the path a generator took, not to its
class, so a fresh start of that generator alone (new weights, a fresh Adam) is a second draw of the path. The
ensemble's mean top-1 cannot reach 90% while any generator sits at 0.

What is measured: per generator, the fraction of its step's images that the teacher assigns to their intended
class, averaged with decay ``BETA`` per step of that generator (about its last 10 steps) and bias-corrected by its
step count, as Adam's moments are. Updated inside the step on the device (no host sync; it is part of a captured
CUDA graph); judged on the host only every ``log_every`` steps, where the loop reads its metrics anyway.

A restart draws the new weights from a generator of its own, seeded by the run's seed, the generator's global index
and the step: the run's random stream (latents, labels, chunks) is the one of a run without restarts up to that
point, every rank of a sharded run draws the same weights for the same generator, and a resumed run redraws them
exactly.
"""

from __future__ import annotations

import torch

from ..nn.ensemble import GeneratorEnsemble
from .optim import StackedAdam

__all__ = ["GeneratorRestarts"]


class GeneratorRestarts:
    """Running per-generator teacher top-1 of one trainer's ensemble, and the restarts it decides.

    Args:
        ensemble: the trainer's ensemble (this rank's shard under torch.distributed).
        optimizer: its :class:`StackedAdam`; the per-row step counts are the generators' ages.
        below: restart a generator whose running top-1 is below this (0: never). In [0, 1].
        after: the steps of its own a generator trains before it is judged (again after each restart).
        seed: the run's seed; offset: the global index of this shard's first generator.
        device: where the step computes (the running top-1 lives there).
    """

    BETA = 0.9  # decay per own step of the running top-1: a mean over about the last 10 steps

    def __init__(self, ensemble: GeneratorEnsemble, optimizer: StackedAdam, *, below: float, after: int, seed: int,
                 offset: int, device: torch.device):
        if not 0 <= below <= 1 or after < 1:
            raise ValueError(f"restart below = {below} (a top-1 in [0, 1]) after = {after} steps (>= 1)")
        self.ensemble, self.optimizer = ensemble, optimizer
        self.below, self.after, self.seed, self.offset = below, after, seed, offset
        self.running = torch.zeros(ensemble.num_generators, dtype=torch.float32, device=device)  # not bias-corrected
        self.events: list[dict] = []  # {"step", "generator" (global index), "top1" (the running top-1 judged)}

    def update(self, rows: torch.Tensor | None, hits: torch.Tensor) -> None:
        """Fold one step's top-1 of generators ``rows`` (all when None), ``hits`` float [k], into the running mean.
        No host sync: it runs inside the (possibly captured) step."""
        b = self.BETA
        if rows is None:
            self.running.mul_(b).add_(hits, alpha=1 - b)
            return
        rows = rows.to(self.running.device)
        self.running.index_copy_(0, rows, self.running.index_select(0, rows) * b + hits * (1 - b))

    def top1(self) -> torch.Tensor:
        """The running top-1 of every generator (float32 [K] on the step's device), bias-corrected by its age; 0 for
        a generator that has not trained since its start."""
        age = self.optimizer.steps.to(self.running.device)
        return torch.where(age > 0, self.running / (1 - self.BETA ** age).clamp_min(1e-12).float(),
                           torch.zeros_like(self.running))

    def check(self, step: int) -> list[int]:
        """Restart each generator of at least ``after`` own steps whose running top-1 is below ``below``; returns
        their indices in this ensemble. A host sync (call it where the loop syncs anyway)."""
        if not self.below:
            return []
        top1 = self.top1()
        age = self.optimizer.steps.to(top1.device)
        failed = ((age >= self.after) & (top1 < self.below)).nonzero().flatten().tolist()
        for row in failed:
            self.events.append({"step": step, "generator": self.offset + row, "top1": float(top1[row])})
            rng = torch.Generator(device=self.ensemble.fc_z.device)
            rng.manual_seed((self.seed * 1_000_003 + (self.offset + row) * 7_919 + step) % 2**63)
            self.ensemble.reset_rows([row], rng)
        if failed:
            self.optimizer.reset_rows(failed)
            self.running.index_fill_(0, torch.tensor(failed, device=self.running.device), 0)
        return failed

    def state_dict(self) -> dict:
        return {"running": self.running.detach().cpu().clone(), "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["running"].shape) != tuple(self.running.shape):
            raise ValueError(f"restart state holds {tuple(state['running'].shape)} generators, expected "
                             f"{tuple(self.running.shape)}")
        self.running.copy_(state["running"])
        self.events = [dict(e) for e in state["events"]]
