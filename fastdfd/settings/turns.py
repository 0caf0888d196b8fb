"""Turns: the generators keep training while the student learns, from a pool of their recent images.

The schedule the CIFAR-10 studies kept (docs/cifar10.md): after the generators' warm-up, rounds of
``generator_steps`` generator steps (each pushing its images and the teacher's logits on them into a pool of
``pool`` images, :class:`fastdfd.train.pool.ImagePool`) then ``student_steps`` distillation steps drawn from the
pool. Against generators trained first and then frozen, the student meets images from the generators' whole recent
trajectory, at about a third of a fresh step's cost where the teacher dominates it (FastDFKD, Fang et al. 2022,
and CMI, Fang et al. 2021, keep such a memory of synthesised images).
"""

from __future__ import annotations

from dataclasses import dataclass

from .field import Settings, setting

__all__ = ["TurnsSettings"]


@dataclass(frozen=True)
class TurnsSettings(Settings):
    """Rounds of generator steps and student steps sharing a pool of generated images.

    The defaults are the CIFAR-10 benchmark's (docs/cifar10.md): a pool of 5,000 images (about 31 generator steps
    of 10 generators x 16 images), 1 generator step to 8 student steps (+3.13 points over 3 seeds against 4).
    """

    pool: int = setting(5000, "images (and the teacher's logits on them) the student draws from: the newest of "
                              "every generator step's; 0: fresh images of the ensemble as it stands (a generator "
                              "and a teacher forward in each student step)", kind="int", minimum=0)
    generator_steps: int = setting(1, "generator steps at the start of each round (0: the generators stop after "
                                      "their warm-up)", kind="int", minimum=0)
    student_steps: int = setting(8, "distillation steps at the end of each round, drawn from the pool", kind="int",
                                 minimum=1)

    def _check(self) -> None:
        if self.pool and not self.generator_steps:
            raise ValueError(f"TurnsSettings.pool = {self.pool} needs generator_steps >= 1: the rounds' generator "
                             "steps fill the pool (with generator_steps = 0 set pool = 0: fresh images)")
