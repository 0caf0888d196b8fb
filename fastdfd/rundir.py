"""A run directory with one owner and one identity.

- :func:`fingerprint`: a digest of a network's architecture and weights, so that a checkpoint can say
  what it was trained against (a resume against another teacher or other generators is refused,
  naming both digests).
- :class:`RunLock`: held while a run writes into its directory (``OUT/.lock``, an advisory
  ``flock`` that the kernel drops when the process dies, SIGKILL included); a second writer is
  refused, naming the first (its pid, host and command).
- :func:`claim`: a fresh run refuses a directory that already holds a run, unless told to overwrite
  it; ``--resume`` continues one.
- :func:`write_manifest`: ``run.json``, the run's identity, settings and software versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
from torch import nn

LOCK_NAME = ".lock"


def fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex, first 16 characters) of ``module``'s class and its state_dict: every key, dtype, shape and
    byte. Two networks share it exactly when they would compute the same function with the same buffers."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r}".encode())
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.device.type != "meta":
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class RunLock:
    """Context manager: an exclusive ``flock`` on ``directory/.lock`` (created with the directory).

    ValueError when another process holds it, naming that process. POSIX only (elsewhere the lock is
    not taken and a warning-free no-op stands in).
    """

    def __init__(self, directory: str | os.PathLike, what: str = "run") -> None:
        self.directory, self.what = Path(directory), what
        self._file = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_NAME
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"{self.directory} is in use by another {self.what} ({owner}); wait for it to end or "
                             "choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def claim(directory: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a directory that already holds files (they would mix with the new run's:
    some checkpoints overwritten, newer old ones kept, metrics appended) unless ``overwrite``, which empties it
    first; ``resume`` continues what is there. ValueError names the directory and both ways out."""
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite discards it: pass one of them")
    directory = Path(directory)
    if resume or not directory.is_dir():
        return
    held = [p for p in directory.iterdir() if p.name != LOCK_NAME]
    if not held:
        return
    if not overwrite:
        names = ", ".join(sorted(p.name for p in held)[:4])
        raise ValueError(f"{directory} already holds a run ({names}{', ...' if len(held) > 4 else ''}); pass --resume "
                         "to continue it, --overwrite to discard it, or choose another --out")
    for p in held:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def software() -> dict[str, str | None]:
    """The versions a run's results depend on: fastdfd, torch (and its CUDA), Python."""
    from .version import __version__

    return {"fastdfd": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}


def write_manifest(directory: str | os.PathLike, loop) -> Path:
    """``directory/run.json``: the run's identity (``loop.identity()``: what it trains against), its settings
    (``loop.config()``) and :func:`software`, written atomically; a resumed run rewrites it unchanged but for
    the versions."""
    path = Path(directory) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".run.json.tmp")
    tmp.write_text(json.dumps({"identity": loop.identity(), "settings": loop.config(), "software": software()},
                              indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


__all__ = ["LOCK_NAME", "RunLock", "claim", "fingerprint", "software", "write_manifest"]
