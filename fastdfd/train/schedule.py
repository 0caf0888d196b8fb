"""Which generators train in each step when the ensemble is larger than one step."""

from __future__ import annotations

import operator

import torch


class ChunkSchedule:
    """Fixed-size chunks of distinct generators that visit every generator evenly.

    Generators are drawn from a stream of random permutations; a chunk never holds a
    generator twice (one straddling two permutations defers the repeat), so after any
    number of steps the visit counts differ by at most one. ``chunk == K`` is the plain
    "all generators every step" schedule (``next()`` returns None: no gather needed).
    """

    def __init__(self, num_generators: int, chunk: int | None, seed: int = 0):
        if chunk is None:
            chunk = num_generators
        # a bool is an int to Python and 2.5 would truncate: neither is a generator count (numpy's ints are)
        try:
            count = None if isinstance(chunk, bool) else operator.index(chunk)
        except TypeError:
            count = None
        if count is None or not 1 <= count <= num_generators:
            hint = " ('auto', the memory planner's choice, is the GeneratorTrainer's alone)" if chunk == "auto" else ""
            raise ValueError(f"generators_per_step must be an integer in [1, {num_generators}] or None (all), "
                             f"got {chunk!r}{hint}")
        self.num_generators, self.chunk = num_generators, count
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
