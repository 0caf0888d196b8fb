"""Supervised teacher training: the field's CIFAR recipe as one settings object."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .field import Settings, setting

__all__ = ["DEFAULT_WORKERS", "TeacherSettings"]

# half the cores, at most 4: the loader shares the machine with the training step
DEFAULT_WORKERS = min(4, max(1, (os.cpu_count() or 1) // 2))


@dataclass(frozen=True)
class TeacherSettings(Settings):
    """One teacher-training recipe. Defaults: the standard CIFAR recipe (SGD with Nesterov
    momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, 200 epochs, cosine to 0 per step)."""

    epochs: int = setting(200, "epochs over the training split", kind="int", minimum=1)
    batch_size: int = setting(128, "images per SGD step", kind="int", minimum=1)
    lr: float = setting(0.1, "peak learning rate (cosine annealed to 0 per iteration)", kind="float", above=0)
    momentum: float = setting(0.9, "SGD momentum, in [0, 1)", kind="float", minimum=0)
    nesterov: bool = setting(True, "Nesterov momentum (needs momentum > 0)", kind="bool")
    weight_decay: float = setting(5e-4, "L2 weight decay", kind="float", minimum=0)
    warmup_epochs: int = setting(0, "linear warm-up epochs from ~0 to lr before the cosine (0: none)", kind="int",
                                 minimum=0)
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing, in [0, 1)", kind="float", minimum=0)
    workers: int = setting(DEFAULT_WORKERS, "DataLoader worker processes (0 loads in the training process); "
                                            "default half this machine's cores, at most 4", kind="int", minimum=0)

    def _check(self) -> None:
        checks = [
            # "TeacherSettings.<field>": a recipe's loader names its key in their place (teacher_training.<field>)
            (self.momentum < 1, f"TeacherSettings.momentum must be in [0, 1), got {self.momentum}"),
            (not self.nesterov or self.momentum > 0, "TeacherSettings.nesterov needs momentum > 0"),
            (self.warmup_epochs < self.epochs,
             f"TeacherSettings.warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}"),
            (self.label_smoothing < 1,
             f"TeacherSettings.label_smoothing must be in [0, 1), got {self.label_smoothing}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
