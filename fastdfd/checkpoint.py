"""Checkpoint files: atomic writes with a digest, format/configuration checks, a bounded rotation.

Every file :func:`atomic_save` writes gets a sidecar ``<name>.sha256`` holding the SHA-256 of the bytes
on disk (read back after the fsync), and :func:`load_file` verifies it before unpickling: a file
overwritten in place, same size or not, is refused as corrupt (and a resume falls back to the
previous checkpoint) instead of feeding garbage into the optimizer's state. Files written before the
digests existed (no sidecar) still load.
"""

from __future__ import annotations

import hashlib
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


DIGEST_SUFFIX = ".sha256"


def digest_path(path: str | os.PathLike) -> Path:
    """Where the SHA-256 of ``path`` is kept: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> str:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over it; the SHA-256 of the bytes
    on disk (read back before the rename). Nothing is left behind on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        digest = file_digest(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the mode open() would give it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``; then the
    SHA-256 of what is on disk into ``<path>.sha256`` (:func:`digest_path`), written the same way.

    A crash mid-write leaves the previous file intact, never a truncated one; a crash between the
    two renames leaves a file whose digest does not match, which :func:`load_file` refuses as corrupt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = _atomic_write(path, lambda f: torch.save(obj, f))
    _atomic_write(digest_path(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))  # sha256sum's format
    return path


def verify_digest(path: str | os.PathLike) -> None:
    """CorruptCheckpointError when ``path``'s bytes do not match its ``.sha256`` sidecar (none: nothing to check)."""
    path = Path(path)
    sidecar = digest_path(path)
    if not sidecar.is_file():
        return
    try:
        expected = sidecar.read_text().split()[0]
    except (OSError, IndexError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: its digest file {sidecar} is unreadable ({e})") from e
    actual = file_digest(path)
    if actual != expected:
        raise CorruptCheckpointError(f"checkpoint {path} does not match its SHA-256 ({sidecar.name}: "
                                     f"{expected[:16]}..., file: {actual[:16]}...): it was changed after it "
                                     "was written")


def load_file(path: str | os.PathLike, expected_format: str, mmap: bool = False) -> dict:
    """Load a checkpoint written by :func:`atomic_save` and check what it holds.

    ``mmap``: map the file instead of reading it (tensors are read lazily), for checking a
    checkpoint without paying for its memory. The file's SHA-256 is verified first where it has a
    ``.sha256`` sidecar (:func:`verify_digest`): CorruptCheckpointError on a mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    verify_digest(path)
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
            digest_path(old).unlink(missing_ok=True)
        return path

    def step_of(self, path: Path) -> int:
        return int(self.PATTERN.match(Path(path).name).group(1))

    def discard_after(self, step: int) -> None:
        """Delete the files of steps after ``step`` (and their digests)."""
        for path in self.paths():
            if self.step_of(path) > step:
                path.unlink(missing_ok=True)
                digest_path(path).unlink(missing_ok=True)

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
