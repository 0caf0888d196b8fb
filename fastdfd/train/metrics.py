"""Metrics: a per-step log file (CSV or JSON lines) and the non-finite-loss check."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf: raised with the step and the loss term that went bad."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(
            f"non-finite {term} loss ({value}) at step {step}; stopped. The last checkpoint written "
            "before this step is intact; lower the learning rate or the loss weights and resume from it."
        )
        self.step, self.term, self.value = step, term, value


def check_finite(rows: Sequence[Mapping[str, float]], terms: Sequence[str]) -> None:
    """Raise on the first row (step) with a non-finite value among ``terms``."""
    for row in rows:
        for term in terms:
            v = row[term]
            if not math.isfinite(v):
                raise NonFiniteLossError(int(row["step"]), term, v)


class MetricsLog:
    """Append rows of scalars to ``path``: ``.csv`` writes CSV, anything else JSON lines."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._fields: list[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: Sequence[Mapping[str, float]]) -> None:
        if self.path is None or not rows:
            return
        if self.path.suffix == ".csv":
            if self._fields is None:
                self._fields = list(rows[0])
            new = not self.path.exists() or self.path.stat().st_size == 0
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerows(rows)
        else:
            with open(self.path, "a") as f:
                for row in rows:
                    f.write(json.dumps(dict(row)) + "\n")
