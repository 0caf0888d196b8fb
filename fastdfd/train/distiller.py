"""Distiller: trains a student on images freshly sampled from a generator ensemble.

    images, _ = ensemble.sample(batch_size, chunk)      no gradients, generators as trained
    loss = KL(softmax(T(x)/tau) || softmax(S(x)/tau)) * tau^2

The teacher runs frozen in eval mode; the student in train mode (its BN layers learn
statistics of the generated images). Losses are read back every ``log_every`` steps.

How the student's BN layers see a step's images (``student_bn``):
- ``"mixed"`` (default): one forward over the whole batch; batch statistics (and the
  running-statistics update) over all generators' images together, a class mixture
  like the real data the student is evaluated on.
- ``"per_generator"``: one forward per generator's block of ``batch_size`` images, so the
  batch statistics are those of one generator's images (one class for one-class
  generators) and the running statistics are updated once per block, in generator
  order: exactly what a Python loop over separate generators feeding the student gives.

Under torch.distributed (``distributed=``) the student is wrapped in
DistributedDataParallel and each rank samples from its own shard of the generators with
its own random stream: the global batch is the union of the ranks' batches.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable, Iterator

import torch
from torch import nn

from ..distributed import DistContext
from ..input_space import InputSpace
from ..nn.ensemble import GeneratorEnsemble
from ..rundir import fingerprint
from .evaluate import evaluate_accuracy
from .generator_trainer import frozen_eval
from .loop import StepLoop
from .augment import AUGMENTS, random_crop_flip
from .losses import distillation_kl
from .pool import ImagePool
from .probe import (as_logits, check_ensemble_classes, check_finite_weights, check_placement, check_student,
                    probe_teacher)

OPTIMIZERS = ("sgd", "adam")
STUDENT_BN = ("mixed", "per_generator")


class Distiller(StepLoop):
    """KL distillation of ``student`` from ``teacher`` on images sampled from ``ensemble``.

    Args (beyond the three networks):
        temperature: softening tau of both distributions (loss scaled by tau^2).
        batch_size: images per generator per step; generators_per_step: how many
            generators are sampled per step (default all), visited evenly.
        optimizer ("sgd" with Nesterov momentum, or "adam"), lr, momentum, weight_decay.
        total_steps: cosine decay of the rate to zero over this many steps (else constant).
        student_bn: ``"mixed"`` (default) or ``"per_generator"``: the batch the student's BN
            statistics are computed over (see the module docstring); single process only.
        input_space, teacher_outputs: as for :class:`GeneratorTrainer`; the student sees the same normalised
            images as the teacher, so it is evaluated on real data in the teacher's input space.
        augment: ``"none"`` (default) or ``"crop_flip"``: each step's images get a random crop (black padding
            of ``image_size // 8`` pixels, 4 at 32 px) and a horizontal flip
            (:func:`fastdfd.train.augment.random_crop_flip`) before the teacher and the student see them.
        pool: an :class:`fastdfd.train.pool.ImagePool` filled by a :class:`GeneratorTrainer`: each step draws
            ``batch_size * generators_per_step`` (image, teacher logits) pairs from it instead of sampling the
            ensemble, and runs no teacher forward (the student alone: about a third of a fresh step's cost with
            a CIFAR ResNet-56 teacher). With ``augment``, the student sees the augmented image against the
            teacher's logits on the stored one: crops and flips that the teacher is nearly invariant to.

    Refused up front (ValueError naming both figures or objects): the student being the teacher or
    sharing its parameters, a student whose output width is not the teacher's, images the teacher or
    student cannot take, and class ids beyond the teacher's outputs.
        seed, log_path, log_every, checkpoint_*: as for :class:`GeneratorTrainer`.
    """

    FORMAT = "fastdfd.distiller"
    TERMS = ("kd", "agreement")
    FINITE = ("kd",)
    DESC = "distill"
    WHAT = "distiller"

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        ensemble: GeneratorEnsemble,
        *,
        temperature: float = 4.0,
        batch_size: int = 32,
        generators_per_step: int | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        total_steps: int | None = None,
        seed: int = 0,
        log_path: str | os.PathLike | None = None,
        log_every: int = 10,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        keep_checkpoints: int = 3,
        distributed: DistContext | None = None,
        student_bn: str = "mixed",
        input_space: str | InputSpace | None = None,
        teacher_outputs: str = "logits",
        augment: str = "none",
        pool: ImagePool | None = None,
    ):
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")
        self.augment = augment
        self.pool = pool
        if student_bn not in STUDENT_BN:
            raise ValueError(f"unknown student_bn {student_bn!r}; expected one of {STUDENT_BN}")
        self.student_bn = student_bn
        if temperature <= 0 or batch_size < 1 or lr <= 0:
            raise ValueError("temperature, batch_size and lr must be positive")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
        self.teacher, self.student, self.ensemble = teacher, student, ensemble
        self.input_space = InputSpace.parse(input_space)
        spec = ensemble.spec
        check_finite_weights(teacher, "teacher")
        self._identity = {"teacher": fingerprint(teacher), "generators": fingerprint(ensemble)}
        check_placement(ensemble, {"teacher": teacher, "student": student})  # named, before the probes' forwards
        self.teacher_probe = probe_teacher(teacher, spec.channels, spec.image_size, self.input_space, teacher_outputs)
        check_ensemble_classes(ensemble, self.teacher_probe)
        check_student(teacher, student, self.teacher_probe, spec.channels, spec.image_size, self.input_space)
        self.temperature, self.batch_size = float(temperature), int(batch_size)
        self.optimizer_name, self.lr = optimizer, float(lr)
        params = [p for p in student.parameters() if p.requires_grad]
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
        else:
            self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        self.total_steps = total_steps
        # cosine decay to zero over total_steps when given, else a constant rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))) if total_steps else (lambda s: 1.0),
        )
        self.hparams = {"momentum": momentum, "weight_decay": weight_decay}
        self._init_loop(
            device=ensemble.fc_z.device, num_generators=ensemble.num_generators,
            generators_per_step=generators_per_step, seed=seed, log_path=log_path, log_every=log_every,
            progress=progress, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, distributed=distributed,
        )
        self.model = student
        if self.dist.world > 1:
            if student_bn != "mixed":  # DDP expects one forward per backward
                raise ValueError("student_bn='per_generator' runs one student forward per generator: "
                                 "single process only")
            from torch.nn.parallel import DistributedDataParallel

            self._own_stream_per_rank()
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(student, device_ids=ids, process_group=self.dist.group)

    def config(self) -> dict:
        return {
            "temperature": self.temperature, "batch_size": self.batch_size, "generators_per_step": self.schedule.chunk,
            "optimizer": self.optimizer_name, "lr": self.lr, "total_steps": self.total_steps, "seed": self.seed,
            **self.hparams, **({"student_bn": self.student_bn} if self.student_bn != "mixed" else {}),
            **({"augment": self.augment} if self.augment != "none" else {}),
            **({"pool": self.pool.capacity} if self.pool is not None else {}),
        }

    @contextlib.contextmanager
    def _run(self) -> Iterator[None]:
        was_training = self.student.training
        self.student.train()
        try:
            with frozen_eval(self.teacher):
                yield None
        finally:
            self.student.train(was_training)

    def _step(self, _ctx) -> torch.Tensor:
        if self.pool is not None:
            return self._pool_step()
        chunk = self.schedule.next()
        x, _ = self.ensemble.sample(self.batch_size, chunk, rng=self.rng)
        if self.augment == "crop_flip":  # on g + 1 = 2 * pixels: the padding is black, as the field's CIFAR loaders pad
            x = random_crop_flip(x + 1, max(1, x.shape[-1] // 8), self.rng) - 1
        x = self.input_space.from_generator(x)  # pixels, normalised as the teacher (and so the student) expects
        with torch.no_grad():
            t_logits = as_logits(self.teacher(x), self.teacher_probe.probabilities)
        return self._learn(x, t_logits)

    def _pool_step(self) -> torch.Tensor:
        x, t_logits = self.pool.draw(self.batch_size * self.schedule.chunk, self.rng)
        if self.augment == "crop_flip":  # on pixels, so that the padding is black
            pixels = self.input_space.denormalize(x)
            x = self.input_space.normalize(random_crop_flip(pixels, max(1, x.shape[-1] // 8), self.rng))
        return self._learn(x, t_logits)

    def _learn(self, x: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        """One student update towards the teacher's logits on x; the (kd, agreement) terms."""
        s_logits = self.student_logits(x)
        loss = distillation_kl(s_logits, t_logits, self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        agree = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()
        return torch.stack([loss.detach(), agree])

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits on a step's generator-major images, BN statistics per ``student_bn``."""
        if self.student_bn == "mixed":
            return self.model(x)
        return torch.cat([self.model(block) for block in x.split(self.batch_size)])

    def evaluate(self, loader: Iterable) -> float:
        """The student's top-1 accuracy on ``loader``."""
        return evaluate_accuracy(self.student, loader, self.device)

    def _model_state(self) -> dict:
        return {
            "student": {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def _load_model_state(self, state: dict, path) -> None:
        try:
            self.student.load_state_dict(state["student"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} holds another student architecture: {e}") from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
