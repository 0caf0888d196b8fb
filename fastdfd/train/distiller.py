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
from ..settings import DistillSettings, LoopSettings, split_settings
from .evaluate import evaluate_accuracy
from .modes import channels_last_params, frozen, in_mode
from .loop import StepLoop
from .augment import mix_pairs, random_crop_flip
from .labeller import TeacherLabeller
from .losses import distillation_kl
from .pool import ImagePool
from .probe import (as_logits, check_ensemble_classes, check_finite_weights, check_placement, check_student,
                    probe_teacher)



class Distiller(StepLoop):
    """KL distillation of ``student`` from ``teacher`` on images sampled from ``ensemble``.

    Settings, each a frozen dataclass passed whole (:mod:`fastdfd.settings`):
        settings: :class:`~fastdfd.settings.DistillSettings`: ``temperature``, ``batch_size`` (images per generator
            per step), ``generators_per_step`` (None: all, visited evenly), ``optimizer`` (``"sgd"`` with Nesterov
            momentum, or ``"adam"``), ``lr``, ``momentum``, ``weight_decay``, ``student_bn`` (``"mixed"`` or
            ``"per_generator"``: the batch the student's BN statistics are computed over, see the module
            docstring; single process only) and ``augment`` (``"none"`` or ``"crop_flip"``: each step's images get
            a random crop, black padding of ``image_size // 8`` pixels, and a horizontal flip before the teacher
            and the student see them, :func:`fastdfd.train.augment.random_crop_flip`) and ``mix`` (``"none"``,
            ``"mixup"`` or ``"cutmix"``: after ``augment``, each image is mixed with another of its step, and the
            teacher labels the mixed image, :func:`fastdfd.train.augment.mix_pairs`) and ``fold_teacher``
            (True: on the CPU the teacher's labels come from a traced copy with its eval BatchNorms folded into
            their convolutions, :class:`fastdfd.train.labeller.TeacherLabeller`, checked against the teacher once
            a fit; ``self.labeller.reason`` says why the teacher answered as it is where no copy could be made)
            and ``autocast`` (True: that labelling forward, folded copy or teacher, under bf16 autocast, its
            logits returned as fp32; the student's forward and backward stay fp32) and ``channels_last`` (the student's 4-D weights and each step's images channels_last inside each
            fit, the values kept and the format restored after: a faster layout for oneDNN's convolutions; single
            process only).
        loop: :class:`~fastdfd.settings.LoopSettings`, as for :class:`GeneratorTrainer` (``sample_every`` must be 0).
        **overrides: any field of those two by name, laid over them.

    What the run is wired to:
        total_steps: cosine decay of the rate to zero over this many steps (else constant).
        input_space, teacher_outputs: as for :class:`GeneratorTrainer`; the student sees the same normalised
            images as the teacher, so it is evaluated on real data in the teacher's input space.
        pool: an :class:`fastdfd.train.pool.ImagePool` filled by a :class:`GeneratorTrainer`: each step draws
            ``batch_size * generators_per_step`` (image, teacher logits) pairs from it instead of sampling the
            ensemble, and runs no teacher forward (the student alone: about a third of a fresh step's cost with
            a CIFAR ResNet-56 teacher). With ``augment``, the student sees the augmented image against the
            teacher's logits on the stored one: crops and flips that the teacher is nearly invariant to. With
            ``mix`` the stored logits fit no mixed image, so the teacher runs on the step's mixed images.
        log_path, checkpoint_dir, distributed: as for :class:`GeneratorTrainer`.

    Refused up front (ValueError naming both figures or objects): the student being the teacher or
    sharing its parameters, a student whose output width is not the teacher's, images the teacher or
    student cannot take, and class ids beyond the teacher's outputs.
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
        settings: DistillSettings | None = None,
        loop: LoopSettings | None = None,
        total_steps: int | None = None,
        input_space: str | InputSpace | None = None,
        teacher_outputs: str = "logits",
        pool: ImagePool | None = None,
        log_path: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        distributed: DistContext | None = None,
        **overrides,
    ):
        parts = split_settings(overrides, DistillSettings, LoopSettings)
        self.settings = (settings or DistillSettings()).replace(**parts[0])
        self.loop = (loop or LoopSettings()).replace(**parts[1])
        if self.loop.sample_every:
            raise ValueError("sample_every is the generator trainer's (the distiller writes no sample grids)")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        d = self.settings
        self.pool = pool
        self.augment, self.mix, self.student_bn = d.augment, d.mix, d.student_bn
        self.teacher, self.student, self.ensemble = teacher, student, ensemble
        self.input_space = InputSpace.parse(input_space)
        spec = ensemble.spec
        check_finite_weights(teacher, "teacher")
        self._identity = {"teacher": fingerprint(teacher), "generators": fingerprint(ensemble)}
        check_placement(ensemble, {"teacher": teacher, "student": student})  # named, before the probes' forwards
        self.teacher_probe = probe_teacher(teacher, spec.channels, spec.image_size, self.input_space, teacher_outputs)
        check_ensemble_classes(ensemble, self.teacher_probe)
        check_student(teacher, student, self.teacher_probe, spec.channels, spec.image_size, self.input_space)
        self.temperature, self.batch_size = d.temperature, d.batch_size
        # the step's labels: the teacher's logits from its BN-folded copy on the CPU (the CIFAR-10 step 1.07x,
        # docs/cifar10.md), the teacher itself where no copy can be made (labeller.reason); checked once a fit
        self.labeller = TeacherLabeller(teacher, d.fold_teacher, autocast=d.autocast)
        params = [p for p in student.parameters() if p.requires_grad]
        if d.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=d.lr, momentum=d.momentum, weight_decay=d.weight_decay,
                                             nesterov=d.momentum > 0)
        else:
            self.optimizer = torch.optim.Adam(params, lr=d.lr, weight_decay=d.weight_decay)
        self.total_steps = total_steps
        # cosine decay to zero over total_steps when given, else a constant rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))) if total_steps else (lambda s: 1.0),
        )
        self._init_loop(device=ensemble.fc_z.device, num_generators=ensemble.num_generators,
                        generators_per_step=d.generators_per_step, settings=self.loop, log_path=log_path,
                        checkpoint_dir=checkpoint_dir, distributed=distributed)
        self.model = student
        if self.dist.world > 1:
            if d.student_bn != "mixed":  # DDP expects one forward per backward
                raise ValueError("student_bn='per_generator' runs one student forward per generator: "
                                 "single process only")
            if d.channels_last:  # DDP's gradient buckets view the parameters as they were wrapped
                raise ValueError("channels_last converts the student's weights for each fit: single process only")
            from torch.nn.parallel import DistributedDataParallel

            self._own_stream_per_rank()
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(student, device_ids=ids, process_group=self.dist.group)

    def config(self) -> dict:
        """What must match for a checkpoint to resume this run (:meth:`fastdfd.settings.Settings.config`), with
        the resolved chunk, the schedule's length and the pool's capacity."""
        return {
            **self.settings.config(), **self.loop.config(), "generators_per_step": self.schedule.chunk,
            "total_steps": self.total_steps, **({"pool": self.pool.capacity} if self.pool is not None else {}),
        }

    @contextlib.contextmanager
    def _run(self) -> Iterator[None]:
        with in_mode(self.student, True), frozen(self.teacher), self.labeller.held(), \
                channels_last_params(self.student, self.settings.channels_last):
            yield None

    def _step(self, _ctx) -> torch.Tensor:
        if self.pool is not None:
            return self._pool_step()
        chunk = self.schedule.next()
        x, _ = self.ensemble.sample(self.batch_size, chunk, rng=self.rng)
        if self.augment == "crop_flip":  # on g + 1 = 2 * pixels: the padding is black, as the field's CIFAR loaders pad
            x = random_crop_flip(x + 1, max(1, x.shape[-1] // 8), self.rng) - 1
        x = mix_pairs(x, self.mix, self.rng)  # before the teacher: it labels what the student sees
        x = self.input_space.from_generator(x)  # pixels, normalised as the teacher (and so the student) expects
        with torch.no_grad():
            t_logits = as_logits(self.labeller(x), self.teacher_probe.probabilities)
        return self._learn(x, t_logits)

    def _pool_step(self) -> torch.Tensor:
        x, t_logits = self.pool.draw(self.batch_size * self.schedule.chunk, self.rng)
        if self.augment == "crop_flip":  # on pixels, so that the padding is black
            pixels = self.input_space.denormalize(x)
            x = self.input_space.normalize(random_crop_flip(pixels, max(1, x.shape[-1] // 8), self.rng))
        if self.mix != "none":  # no stored logits fit a mixed image: the teacher labels it
            x = mix_pairs(x, self.mix, self.rng)
            with torch.no_grad():
                t_logits = as_logits(self.labeller(x), self.teacher_probe.probabilities)
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
        if self.settings.channels_last:  # the student's weights are, inside a fit (_run)
            x = x.contiguous(memory_format=torch.channels_last)
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
