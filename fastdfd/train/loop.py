"""StepLoop: what the generator trainer and the distiller share.

A run is ``fit(steps)`` over a ``_step`` that returns a small tensor of loss terms. The
terms are collected on the device and read back once per ``log_every`` steps (no host
sync per step); each window is checked for NaN/Inf *before* any checkpoint is written,
so the newest checkpoint on disk is always a good one. Checkpoints carry the step, the
private RNG and the generator schedule, so ``resume`` continues bit-for-bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import ContextManager

import torch
from tqdm.auto import tqdm

from ..checkpoint import (CheckpointError, CheckpointRotation, CorruptCheckpointError, atomic_save, check_config,
                          load_file)
from ..distributed import DistContext
from ..settings import LoopSettings
from .metrics import MetricsLog, check_finite
from .schedule import ChunkSchedule
from .stops import RunInterrupted, StopOnSignal


class StepLoop:
    FORMAT: str = ""
    TERMS: tuple[str, ...] = ()
    FINITE: tuple[str, ...] = ()  # terms that must stay finite
    DESC: str = ""
    WHAT: str = ""  # configuration name used in error messages

    def _init_loop(
        self,
        *,
        device: torch.device,
        num_generators: int,
        generators_per_step: int | None,
        settings: LoopSettings,
        log_path: str | os.PathLike | None,
        checkpoint_dir: str | os.PathLike | None,
        distributed: DistContext | None = None,
    ) -> None:
        # Under torch.distributed: logs and the progress bar on rank 0 only; one checkpoint
        # rotation per rank (each holds its own generators or RNG stream); resume agrees on a step.
        self.dist = distributed if distributed is not None else DistContext()
        progress = settings.progress
        if self.dist.world > 1:
            log_path = log_path if self.dist.is_main else None
            progress = progress and self.dist.is_main
            if checkpoint_dir is not None:
                checkpoint_dir = os.path.join(os.fspath(checkpoint_dir), f"rank_{self.dist.rank:05d}")
        self.device, self.seed = device, settings.seed
        self.schedule = ChunkSchedule(num_generators, generators_per_step, settings.seed)
        self.rng = torch.Generator(device=device).manual_seed(self.seed)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.log = MetricsLog(log_path, tensorboard=settings.tensorboard)  # + TensorBoard when installed (metrics.py)
        self.log_every, self.progress = settings.log_every, progress
        # checkpoints are written where there is a directory for them (checkpoint_every is the period then)
        self.checkpoint_every = settings.checkpoint_every if checkpoint_dir is not None else 0
        self.rotation = (CheckpointRotation(checkpoint_dir, settings.keep_checkpoints)
                         if checkpoint_dir is not None else None)
        self._saved_step: int | None = None  # the step of the last checkpoint this loop saved or loaded
        # True: each fit closes the log (its TensorBoard events are on disk when fit returns); a caller that
        # calls fit once a round sets False and closes the log itself, else every round opens a new event file
        self.close_log_after_fit = True

    def _own_stream_per_rank(self) -> None:
        """Give this rank a random stream of its own (different images on every rank)."""
        self.rng.manual_seed(self.seed + 1_000_003 * self.dist.rank)

    def _full_config(self) -> dict:
        """The subclass's configuration, plus the world size of a multi-process run (shards differ)."""
        return {**self.config(), **({"world": self.dist.world} if self.dist.world > 1 else {})}

    # ---------------------------------------------------- for subclasses
    def config(self) -> dict:
        raise NotImplementedError

    def _run(self) -> ContextManager:
        """Set-up and tear-down around a fit; its value is passed to every ``_step``."""
        return contextlib.nullcontext()

    def _step(self, ctx) -> torch.Tensor:
        raise NotImplementedError

    def _after_step(self) -> None:
        """Per-step side work of a subclass (sample grids); nothing by default."""

    @property
    def images_per_step(self) -> int:
        """Images generated per step (for the logged throughput)."""
        return self.schedule.chunk * self.batch_size

    def _model_state(self) -> dict:
        raise NotImplementedError

    def _load_model_state(self, state: dict, path) -> None:
        raise NotImplementedError

    def _adopt_saved_choices(self, state: dict, path) -> None:
        """Before the configurations are compared: take over what the run chose for itself at its start (and may
        choose otherwise now) from the checkpoint. Nothing by default."""

    def _check_models(self, state: dict, path) -> None:
        """Refuse a checkpoint of other models (checked before the hyperparameters)."""

    def identity(self) -> dict[str, str]:
        """What this run trains against, as :func:`fastdfd.rundir.fingerprint` digests ({"teacher": ...}); saved in
        every checkpoint and checked on load. Subclasses set ``self._identity`` at construction (before any fit
        installs taps in the teacher)."""
        return dict(getattr(self, "_identity", {}))

    def _check_identity(self, state: dict, path) -> None:
        saved, current = state.get("identity") or {}, self.identity()
        for key in sorted(set(saved) & set(current)):  # checkpoints written before identities existed still load
            if saved[key] != current[key]:
                raise CheckpointError(f"checkpoint {path} was trained against another {key} (fingerprint "
                                      f"{saved[key]} in the checkpoint, {current[key]} now): resume it with the "
                                      f"{key} it was written for, or start a new run")

    # ------------------------------------------------------------- loop
    def fit(self, steps: int) -> list[dict[str, float]]:
        """Train ``steps`` more steps; returns the metrics rows of these steps."""
        if steps < 0:
            raise ValueError("steps must be >= 0")
        start = len(self.history)
        pending: list[tuple[int, torch.Tensor]] = []
        self._window_start = time.perf_counter()
        bar = tqdm(total=steps, disable=not self.progress, desc=self.DESC, leave=False)
        try:
            with self._run() as ctx, StopOnSignal(enabled=self.dist.world == 1) as stop:
                for i in range(steps):
                    pending.append((self.step + 1, self._step(ctx)))
                    self.step += 1
                    self._after_step()
                    due = self.checkpoint_every and self.step % self.checkpoint_every == 0
                    stopping = stop.signum is not None  # SIGINT/SIGTERM: end here, with this step saved
                    if len(pending) >= self.log_every or due or stopping or i == steps - 1:
                        self._flush(pending, bar)
                        pending = []
                    if due or (stopping and self.rotation is not None):
                        self._save_checkpoint()
                    if stopping:
                        raise RunInterrupted(self.step, stop.signum,
                                             self.rotation.latest() if self.rotation is not None else None)
        finally:
            bar.close()
            if self.close_log_after_fit:
                self.log.close()  # flush the TensorBoard events of this fit
            else:
                self.log.flush()
        return self.history[start:]

    def checkpoint(self) -> bool:
        """Save a checkpoint of this step now, outside ``checkpoint_every``'s period (a stage's final state, which
        a later stage continues from); nothing when there is no checkpoint directory or this step is saved
        already. True when one was written. Under torch.distributed every rank must call it (a collective)."""
        if self.rotation is None or self._saved_step == self.step:  # the same on every rank: no file is read
            return False
        self._save_checkpoint()
        return True

    def discard_checkpoints_after(self, step: int) -> None:
        """Delete this run's checkpoints of the steps after ``step``: a run that goes on from ``step`` along
        another path (a resume from an earlier checkpoint than the newest) would otherwise keep them, and the
        rotation, which keeps the highest steps, would drop the new ones instead. Every rank calls it; rank 0
        deletes the manifests."""
        if self.rotation is None:
            return
        self.rotation.discard_after(step)
        if self.dist.world > 1 and self.dist.is_main:
            for later in (s for s in self._manifested_steps() if s > step):
                self._manifest_path(later).unlink(missing_ok=True)

    def _save_checkpoint(self) -> None:
        """This rank's file; under torch.distributed, then rank 0's manifest, written last.

        The manifest (``manifest_step_N.json`` beside the rank folders, atomic) is written
        only after every rank has written its shard: a step without one is incomplete and is
        never resumed from, whatever files exist.
        """
        path = self.rotation.save(self.state_dict(), self.step)
        self._saved_step = self.step
        if self.dist.world == 1:
            return
        names = self.dist.all_gather_object(f"{path.parent.name}/{path.name}")  # also a barrier
        if self.dist.is_main:
            root = path.parent.parent
            manifest = {"step": self.step, "world": self.dist.world, "format": self.FORMAT, "shards": names}
            tmp = root / f".manifest_step_{self.step:08d}.json.tmp"
            tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, self._manifest_path(self.step))
            for old in sorted(root.glob("manifest_step_*.json"))[: -self.rotation.keep]:
                old.unlink(missing_ok=True)

    def _manifest_path(self, step: int) -> Path:
        return self.rotation.directory.parent / f"manifest_step_{step:08d}.json"

    def _manifested_steps(self) -> set[int]:
        root = self.rotation.directory.parent
        return {int(p.stem.split("_")[-1]) for p in root.glob("manifest_step_*.json")}

    def _flush(self, pending: list[tuple[int, torch.Tensor]], bar) -> None:
        values = torch.stack([v for _, v in pending]).tolist()  # the one host sync per window
        # throughput over the window (the read-back above is the window's only sync point)
        now = time.perf_counter()
        rate = len(pending) * self.images_per_step / max(now - self._window_start, 1e-9)
        self._window_start = now
        extra = {"images_per_s": rate}
        if self.device.type == "cuda":
            extra["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        rows = [{"step": s, **dict(zip(self.TERMS, v)), **extra} for (s, _), v in zip(pending, values)]
        check_finite(rows, self.FINITE, self.rotation.latest() if self.rotation is not None else None)
        self.history.extend(rows)
        self.log.write(rows)
        bar.update(len(rows))
        bar.set_postfix({t: f"{rows[-1][t]:.4g}" for t in self.TERMS[:3]})

    # ------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": self.FORMAT,
            "version": 1,
            "config": self._full_config(),
            "step": self.step,
            "schedule": self.schedule.state_dict(),
            "rng": self.rng.get_state(),
            "history": list(self.history),
            "identity": self.identity(),
            **self._model_state(),
        }

    def save(self, path: str | os.PathLike) -> None:
        atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint of the same configuration; training then continues exactly."""
        state = load_file(path, self.FORMAT)
        self._check_identity(state, path)
        self._check_models(state, path)
        self._adopt_saved_choices(state, path)
        check_config(path, state["config"], self._full_config(), self.WHAT)
        self._load_model_state(state, path)
        self.schedule.load_state_dict(state["schedule"])
        self.rng.set_state(state["rng"])
        self.step = int(state["step"])
        self._saved_step = self.step
        self.history = list(state["history"])
        self.log.truncate_after(self.step)  # the steps after the checkpoint will be logged again

    def resume(self, steps: set[int] | None = None) -> bool:
        """Load the newest readable checkpoint of ``checkpoint_dir`` (among ``steps`` if given).

        A file that cannot be read back (a disk that filled up, a copy cut short) is skipped
        with a warning and the one before it is used; a checkpoint of another configuration
        is an error, not something to skip. Under torch.distributed every rank loads the
        newest step that all ranks can read.
        """
        if self.rotation is None:
            return False
        if self.dist.world > 1:  # only steps every rank can read, among ``steps`` when they are given
            mine = self.rotation.readable_steps(self.FORMAT)
            if self.dist.is_main:  # only steps whose manifest was written (every shard was saved)
                mine &= self._manifested_steps()
            agreed = None
            for theirs in self.dist.all_gather_object(sorted(mine)):
                agreed = set(theirs) if agreed is None else agreed & set(theirs)
            steps = agreed if steps is None else set(steps) & agreed
            if not steps:
                return False
        for path in reversed(self.rotation.paths()):
            if steps is not None and self.rotation.step_of(path) not in steps:
                continue
            try:
                self.load(path)
                return True
            except CorruptCheckpointError as e:
                warnings.warn(f"{e}; trying the previous checkpoint", RuntimeWarning, stacklevel=2)
        return False
