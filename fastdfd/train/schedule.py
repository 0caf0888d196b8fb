"""Which generators train in each step when the ensemble is larger than one step."""

from __future__ import annotations

import torch


class ChunkSchedule:
    """Fixed-size chunks of distinct generators that visit every generator evenly.

    Generators are drawn from a stream of random permutations; a chunk never holds a
    generator twice (one straddling two permutations defers the repeat), so after any
    number of steps the visit counts differ by at most one. ``chunk == K`` is the plain
    "all generators every step" schedule (``next()`` returns None: no gather needed).
    """

    def __init__(self, num_generators: int, chunk: int | None, seed: int = 0):
        chunk = num_generators if chunk is None else int(chunk)
        if not 1 <= chunk <= num_generators:
            raise ValueError(f"generators_per_step must be in [1, {num_generators}], got {chunk}")
        self.num_generators, self.chunk = num_generators, chunk
        self.rng = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next(self) -> list[int] | None:
        if self.chunk == self.num_generators:
            return None
        out: list[int] = []
        deferred: list[int] = []
        while len(out) < self.chunk:
            if not self.queue:
                self.queue = torch.randperm(self.num_generators, generator=self.rng).tolist()
            g = self.queue.pop(0)
            (deferred if g in out else out).append(g)
        self.queue = deferred + self.queue
        return sorted(out)

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.queue = list(state["queue"])
