"""A wall clock of training time only: benchmarks pause it around their own measurements."""

from __future__ import annotations

import time


class BudgetClock:
    """Wall seconds of training only: paused around measurements (curves, quality reports)."""

    def __init__(self) -> None:
        self.spent, self._since = 0.0, time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.spent += time.perf_counter() - self._since
        self._since = None

    def resume(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def seconds(self) -> float:
        return self.spent + (time.perf_counter() - self._since if self._since is not None else 0.0)
