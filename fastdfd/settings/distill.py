"""What the student learns from and how: the distillation loss, its optimiser and its batches."""

from __future__ import annotations

from dataclasses import dataclass

from .field import Settings, setting

__all__ = ["AUGMENTS", "DISTILL_OPTIMIZERS", "MIXES", "STUDENT_BN", "DistillSettings"]

DISTILL_OPTIMIZERS = ("sgd", "adam")
STUDENT_BN = ("mixed", "per_generator")
AUGMENTS = ("none", "crop_flip")
MIXES = ("none", "mixup", "cutmix")


@dataclass(frozen=True)
class DistillSettings(Settings):
    """``KL(softmax(T(x)/tau) || softmax(S(x)/tau)) * tau^2`` on generated images (docs/method.md section 7)."""

    temperature: float = setting(4.0, "softening tau of both distributions (the loss is scaled by tau^2)",
                                 kind="float", above=0)
    batch_size: int = setting(32, "images per generator per step", kind="int", minimum=1)
    generators_per_step: int | None = setting(None, "generators sampled per step (all when unset), visited evenly",
                                              kind="count", config=False)  # the loop records the resolved chunk
    optimizer: str = setting("sgd", "the student's optimiser (sgd: with Nesterov momentum)", kind="str",
                             choices=DISTILL_OPTIMIZERS)
    lr: float = setting(0.05, "peak learning rate, cosine annealed to 0 over the run's steps", kind="float", above=0)
    momentum: float = setting(0.9, "SGD momentum", kind="float", minimum=0)
    weight_decay: float = setting(5e-4, "L2 weight decay", kind="float", minimum=0)
    student_bn: str = setting("mixed", "the batch the student's BN statistics are taken over: mixed (every "
                                       "generator's images together) or per_generator (single process only)",
                              kind="str", choices=STUDENT_BN, absent="mixed")
    augment: str = setting("none", "random crop (padding side/8) and horizontal flip of each step's images",
                           kind="str", choices=AUGMENTS, absent="none")
    mix: str = setting("none", "after augment, each image mixed with another of its step (mixup: a blend, cutmix: a "
                               "pasted box) and labelled by the teacher on the mixed image: one teacher forward a "
                               "step, from a pool too", kind="str", choices=MIXES, absent="none")
    fold_teacher: bool = setting(True, "on the CPU, label with a traced copy of the teacher whose eval BatchNorms "
                                       "are folded into their convolutions (channels_last weights); its logits "
                                       "match the teacher's to fp32 rounding, and the teacher answers as it is "
                                       "(with a warning) where it cannot be traced", kind="bool", absent=True,
                                 config=False)
    autocast: bool = setting(False, "the teacher's labelling forward under bf16 autocast, its logits returned as "
                                    "fp32 (the student's step stays fp32; a speed-up where the CPU computes in "
                                    "bf16, AVX-512 BF16 or AMX)", kind="bool", absent=False, config=False)
    channels_last: bool = setting(False, "the student's weights and each step's images channels_last inside a fit "
                                         "(the weights' values kept, their format restored after; single process "
                                         "only)", kind="bool", absent=False, config=False)

    def _check(self) -> None:
        if self.momentum >= 1:
            raise ValueError(f"DistillSettings.momentum = {self.momentum}: must be below 1")
