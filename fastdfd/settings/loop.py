"""What every training loop shares: its seed, its logs, its checkpoints and its progress bar."""

from __future__ import annotations

from dataclasses import dataclass

from .field import Settings, setting

__all__ = ["LoopSettings"]


@dataclass(frozen=True)
class LoopSettings(Settings):
    seed: int = setting(0, "seeds the loop's own RNG (latents, labels, chunks, augmentation); the global RNG is "
                           "untouched", kind="int", minimum=0, recipe=False)
    log_every: int = setting(10, "steps between metric rows (the only host syncs of the loss)", kind="int",
                             minimum=1, recipe=False, config=False)
    checkpoint_every: int = setting(500, "steps between checkpoints when the run has a checkpoint directory "
                                         "(0: none)", kind="int", minimum=0, config=False)
    keep_checkpoints: int = setting(3, "newest checkpoints kept", kind="int", minimum=1, absent=3, config=False)
    sample_every: int = setting(0, "steps between sample grids written by the generator trainer (0: none; needs "
                                   "a sample directory)", kind="int", minimum=0, absent=0, config=False)
    progress: bool = setting(True, "a progress bar", kind="bool", cli=False, recipe=False, config=False)
    tensorboard: bool | None = setting(None, "also write the metrics as TensorBoard events: unset when the "
                                             "package is installed, false never, true required",
                                       kind="optional_bool", cli=False, recipe=False, config=False)
