"""Metrics: a per-step log file (CSV or JSON lines), its TensorBoard copy, and the non-finite-loss check.

Every row written to the log file (loss terms, images/s, GPU memory) is also written to
TensorBoard when the ``tensorboard`` package is installed (``pip install tensorboard``):
``<log dir>/tensorboard/<log file stem>/``, one scalar per column, the row's ``step`` (or
``epoch``) as the global step. The rows are host floats already (the loop reads the device back once per
window), so this adds no device sync.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

STEP_KEYS = ("step", "epoch")  # the first present is a row's TensorBoard global step (else its index)
TENSORBOARD_PIP = "pip install tensorboard  (or: pip install 'fastdfd[tensorboard]')"


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a package hidden or half-removed from sys.modules
        return False


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf: raised with the step and the loss term that went bad."""

    def __init__(self, step: int, term: str, value: float, last_checkpoint: str | os.PathLike | None = None):
        if last_checkpoint is not None:
            where = (f"The last checkpoint, {last_checkpoint}, was written before this step and is intact; lower the "
                     "learning rate or the loss weights and resume from it.")
        else:
            where = ("No checkpoint was written before this step; lower the learning rate or the loss weights and "
                     "start again (checkpoint_every keeps a run to resume from).")
        super().__init__(f"non-finite {term} loss ({value}) at step {step}; stopped. {where}")
        self.step, self.term, self.value = step, term, value
        self.last_checkpoint = last_checkpoint


def check_finite(rows: Sequence[Mapping[str, float]], terms: Sequence[str],
                 last_checkpoint: str | os.PathLike | None = None) -> None:
    """Raise on the first row (step) with a non-finite value among ``terms``, naming ``last_checkpoint``
    (the newest one written, None when there is none)."""
    for row in rows:
        for term in terms:
            v = row[term]
            if not math.isfinite(v):
                raise NonFiniteLossError(int(row["step"]), term, v, last_checkpoint)


class MetricsLog:
    """Append rows of scalars to ``path``: ``.csv`` writes CSV, anything else JSON lines.

    ``tensorboard``: also write every scalar of every row to TensorBoard, in
    ``path.parent / "tensorboard" / path.stem``; None (default) when the package is installed,
    False never, True always (ImportError with the pip command when it is missing). Nothing
    is written without a ``path`` (the loop passes none on ranks other than 0). The writer is
    opened on the first write and closed by :meth:`close` (the loop calls it at the end of
    every ``fit``; a later write opens a new event file in the same directory).
    """

    def __init__(self, path: str | os.PathLike | None, tensorboard: bool | None = None):
        if tensorboard not in (None, True, False):
            raise ValueError(f"tensorboard must be None, True or False, got {tensorboard!r}")
        self.path = Path(path) if path is not None else None
        self._fields: list[str] | None = None
        self._writer = None
        self._rows_written = 0
        self._purge_step: int | None = None
        if tensorboard and not tensorboard_available():
            raise ImportError(f"tensorboard=True needs the tensorboard package: {TENSORBOARD_PIP}")
        use_tb = tensorboard if tensorboard is not None else tensorboard_available()
        self.tensorboard_dir = self.path.parent / "tensorboard" / self.path.stem if use_tb and self.path else None
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
                f.writelines(json.dumps(dict(row)) + "\n" for row in rows)
        if self.tensorboard_dir is not None:
            self._write_tensorboard(rows)

    def truncate_after(self, step: int) -> None:
        """Drop the rows logged past ``step`` (a run resumed from a checkpoint of that step logs them again):
        the file is rewritten atomically, and TensorBoard's next writer purges its events from ``step + 1``."""
        self._purge_step = int(step) + 1
        if self.path is None or not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        if self.path.suffix == ".csv":
            if not lines:
                return
            header, rows = lines[:1], lines[1:]
            keep = header + [ln for ln in rows if not ln.strip() or int(float(ln.split(",", 1)[0])) <= step]
        else:
            keep = [ln for ln in lines if not ln.strip() or int(json.loads(ln).get("step", 0)) <= step]
        if len(keep) == len(lines):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def _write_tensorboard(self, rows: Sequence[Mapping[str, float]]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.fspath(self.tensorboard_dir), purge_step=self._purge_step)
            self._purge_step = None  # once: later writers of this run append
        for row in rows:
            axis = next((k for k in STEP_KEYS if k in row), None)
            step = int(row[axis]) if axis is not None else self._rows_written
            self._rows_written += 1
            for key, value in row.items():
                if key != axis and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, float(value), global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer (idempotent; the next write opens a new one)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may already be gone
            self.close()
