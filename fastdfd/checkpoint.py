"""Checkpoint files: atomic writes, format/configuration checks, a bounded rotation."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: wrong kind, other configuration, unreadable."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read back (truncated, overwritten, not a torch file)."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_file(path: str | os.PathLike, expected_format: str, mmap: bool = False) -> dict:
    """Load a checkpoint written by :func:`atomic_save` and check what it holds.

    ``mmap``: map the file instead of reading it (tensors are read lazily), for checking a
    checkpoint without paying for its size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, corrupted or not a torch file
        raise CorruptCheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a {expected_format} checkpoint (found {found!r})")
    return state


def check_config(path: str | os.PathLike, saved: Mapping, current: Mapping, what: str) -> None:
    """Refuse a checkpoint whose configuration differs from the current object's, naming the keys."""
    keys = sorted(set(saved) | set(current))
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs current {current.get(k)!r}" for k in diff[:6])
        raise CheckpointError(f"checkpoint {path} was written for another {what} configuration ({detail})")


class CheckpointRotation:
    """``dir/step_00000123.pt`` files, newest ``keep`` kept."""

    PATTERN = re.compile(r"^step_(\d+)\.pt$")

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.directory, self.keep = Path(directory), keep

    def paths(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self.PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, obj: Any, step: int) -> Path:
        path = atomic_save(obj, self.directory / f"step_{step:08d}.pt")
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def step_of(self, path: Path) -> int:
        return int(self.PATTERN.match(Path(path).name).group(1))

    def readable_steps(self, expected_format: str) -> set[int]:
        """Steps whose file loads and holds a ``expected_format`` checkpoint."""
        steps = set()
        for path in self.paths():
            try:
                load_file(path, expected_format, mmap=True)
                steps.add(self.step_of(path))
            except CheckpointError:
                continue
        return steps

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None
