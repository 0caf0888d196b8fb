"""GeneratorTrainer: trains a GeneratorEnsemble from nothing but a teacher.

Per step, for the k generators of this step (all, or a chunk of ``generators_per_step``):

    x      = ensemble(z, y)                       one batched pass, [k*B, C, S, S]
    logits = teacher(x)                           BN layers tapped by a MomentMatcher
    L_k    = moment_weight * D_k + ce_weight * CE_k + tv_weight * TV_k + l2_weight * mean(x_k^2)
             - adversarial_weight * KL(T(x_k) || S(x_k)) [* agree] + diversity_weight * MS_k
    loss   = sum_k L_k                            (scope="generator": D_k from generator k's images)
             k * moment_weight * D + sum_k (...)  (scope="ensemble": one D over the whole batch)

Summing (not averaging) over generators keeps each generator's gradient what it would be
if it trained alone, and StackedAdam keeps one Adam per generator: with
scope="generator", K generators in one batched step are K independent trainings. With
scope="ensemble" every generator's loss carries the shared moment term, hence the k.

The loss values are read back to the host only every ``log_every`` steps (no device
sync per step); a NaN/Inf is then reported with the exact step and term, and no
checkpoint is written past it.

Under torch.distributed (``distributed=``, see :mod:`fastdfd.distributed`) the ensemble
given is this rank's shard; scope="ensemble" statistics are those of the global batch
(one all-reduce of the packed sums per step), and N processes reproduce the 1-process run.

With ``cuda_graph`` on, each step's work after the draws (gathering the chunk's parameters,
the ensemble forward, the tapped teacher forward, the loss, the backward, the StackedAdam
update and each generator's running teacher top-1) is captured once into a CUDA graph and
replayed (:mod:`fastdfd.train.graphed_step`).
The step reads its inputs from static buffers: the chunk's rows, latents and labels are drawn
exactly as in eager mode (same private RNG, same order, so runs and resumes are reproducible
and match eager ones) and copied into the buffers before each replay. Adam's step counts live
on the device, so the bias corrections advance inside the graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import check_config
from ..distributed import DistContext
from ..input_space import InputSpace, generator_pixels
from ..nn.ensemble import GeneratorEnsemble, ensemble_forward
from ..rundir import fingerprint
from ..nn.matcher import MomentMatcher
from ..settings import ExecutionSettings, LoopSettings, LossSettings, OptimizerSettings, split_settings
from .augment import draw_jitter_flip, jitter_flip
from .bf16 import warn_if_bf16_is_slow
from .generator_top1 import RunningTop1
from .graphed_step import GraphedStep, cuda_capture
from .images import grid, save_png
from .loop import StepLoop
from .memory import plan_generator_memory
from .losses import distillation_kl, mode_seeking, total_variation
from .modes import channels_last_weights, frozen
from .optim import StackedAdam
from .plan import ExecutionPlan, graph_obstacles, plan_chunk, resolve_graph
from .pool import ImagePool
from .schedule import ChunkSchedule
from .probe import as_logits, check_ensemble_classes, check_finite_weights, check_placement, probe_teacher
from .quality import QualityReport, generator_quality


class GeneratorTrainer(StepLoop):
    """Moment matching + cross-entropy (+ total variation) training of every generator.

    Settings, each a frozen dataclass passed whole (:mod:`fastdfd.settings`; every field's doc, choices and bounds
    are there, and the CLI flags and recipe keys are made from them):
        loss: :class:`~fastdfd.settings.LossSettings`: the moment distance (``kind``, ``scope``, ``normalization``,
            ``layer_weights``, ``first_layer_multiplier``) and the weights of every term. Default scope
            ``"ensemble"``: one set of statistics over every generator's images, the class mixture the running
            statistics describe. ``adversarial_weight`` needs ``student``; ``diversity_weight`` a batch of >= 2.
        optim: :class:`~fastdfd.settings.OptimizerSettings`: Adam's ``lr`` and ``betas`` (one Adam per generator)
            and ``batch_size``, the images per generator per step.
        execution: :class:`~fastdfd.settings.ExecutionSettings`: ``generators_per_step`` (an integer, None for
            all, or ``"auto"``: the largest chunk the memory planner fits; a configuration that cannot fit is
            refused before the first step, with the figures), ``offload``, ``autocast``, ``channels_last`` and
            ``cuda_graph`` (``"on"`` requires it and raises ValueError naming what prevents it; ``"auto"`` uses it
            where allowed). Decided once into :attr:`plan` (:class:`fastdfd.train.plan.ExecutionPlan`).
        loop: :class:`~fastdfd.settings.LoopSettings`: ``seed`` (this trainer's own RNG: latents, labels,
            chunks; the global RNG untouched), ``log_every`` (the host sync period), ``checkpoint_every`` and
            ``keep_checkpoints`` (used when ``checkpoint_dir`` is given), ``sample_every`` (needs ``sample_dir``),
            ``progress``, ``tensorboard``.
        **overrides: any field of those four by name (``lr=1e-3``, ``scope="generator"``), laid over them: the
            field names of the four classes are disjoint. An unknown name is a TypeError listing the known ones.

    What the run is wired to:
        input_space: the teacher's input normalisation (:class:`fastdfd.input_space.InputSpace`, a preset
            name such as ``"imagenet"`` or ``"minus_one_one"``, or None for ``identity``). The generators
            make pixels in [0, 1] (their tanh output g read as (g + 1) / 2); the teacher sees them normalised.
        teacher_outputs: ``"logits"`` (default) or ``"probabilities"`` for a teacher that ends in softmax
            (its log is used). Refused up front, with the figures: images whose channels or size the teacher
            cannot take, class ids beyond the teacher's outputs, and a softmax teacher declared as logits
            (one probe forward on two images, :mod:`fastdfd.train.probe`).
        student: the network whose disagreement the adversarial term maximises (frozen in eval mode inside
            each step; may be set or replaced between fits).
        pool: an :class:`fastdfd.train.pool.ImagePool` that every step fills with its images (in the teacher's
            input space, detached; jittered and flipped as the teacher saw them when ``jitter`` / ``flip`` are
            set) and the teacher's logits on them, for ``Distiller(..., pool=pool)``.
        log_path (``.csv`` or JSON lines), checkpoint_dir, sample_dir: where the loop writes.
        distributed: a :class:`fastdfd.distributed.DistContext`; the ensemble given is this rank's shard.

    The teacher leaves every fit as it came in: mode, ``requires_grad`` flags and memory format
    (:mod:`fastdfd.train.modes`). With ``cuda_graph``, the first ``GRAPH_WARMUP`` steps of each ``fit`` run
    eagerly on a side stream, then the step is captured once per chunk size; the graph keeps one step's
    activations in its own memory pool.
    """

    FORMAT = "fastdfd.generator_trainer"
    TERMS = ("loss", "moment", "ce", "tv", "teacher_acc")
    FINITE = ("moment", "ce", "tv", "loss")  # the culprit term is named before the total
    DESC = "generators"
    WHAT = "generator trainer"
    GRAPH_WARMUP = 3  # eager steps (real ones) before each fit's capture

    def __init__(
        self,
        teacher: nn.Module,
        ensemble: GeneratorEnsemble,
        *,
        loss: LossSettings | None = None,
        optim: OptimizerSettings | None = None,
        execution: ExecutionSettings | None = None,
        loop: LoopSettings | None = None,
        input_space: str | InputSpace | None = None,
        teacher_outputs: str = "logits",
        student: nn.Module | None = None,
        pool: ImagePool | None = None,
        log_path: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        sample_dir: str | os.PathLike | None = None,
        distributed: DistContext | None = None,
        **overrides,
    ):
        parts = split_settings(overrides, LossSettings, OptimizerSettings, ExecutionSettings, LoopSettings)
        self.loss = (loss or LossSettings()).replace(**parts[0])
        self.optim = (optim or OptimizerSettings()).replace(**parts[1])
        self.execution = (execution or ExecutionSettings()).replace(**parts[2])
        self.loop = (loop or LoopSettings()).replace(**parts[3])
        L, ex = self.loss, self.execution
        if L.adversarial_weight and student is None:
            raise ValueError("adversarial_weight > 0 needs the student whose disagreement the generators maximise")
        if L.jitter >= ensemble.spec.image_size:  # the shifts would wrap past a whole image: no longer uniform
            raise ValueError(f"jitter = {L.jitter} px must be smaller than the images ({ensemble.spec.image_size} px); "
                             "DeepInversion rolls by up to 30 px at 224 px")
        if L.diversity_weight and self.optim.batch_size < 2:
            raise ValueError("diversity_weight > 0 pairs a generator's images: batch_size must be at least 2")
        if student is not None and student is teacher:
            raise ValueError("the student given for the adversarial term is the teacher itself")
        if self.loop.sample_every and sample_dir is None:
            raise ValueError("sample_every needs a sample_dir")
        self.teacher, self.ensemble, self.student, self.pool = teacher, ensemble, student, pool
        self.input_space = InputSpace.parse(input_space)
        self.batch_size = self.optim.batch_size  # StepLoop's throughput reads it
        self.sample_dir = sample_dir
        # one probe forward: images, classes and output kind refused here, not mid-run
        spec = ensemble.spec
        check_finite_weights(teacher, "teacher")
        self._identity = {"teacher": fingerprint(teacher)}  # what a checkpoint of this run was trained against
        check_placement(ensemble, {"teacher": teacher, **({"student": student} if student is not None else {})},
                        check_device=not ex.offload)  # before the probe: its forward would fail on a mismatch, unnamed
        self.teacher_probe = probe_teacher(teacher, spec.channels, spec.image_size, self.input_space, teacher_outputs)
        check_ensemble_classes(ensemble, self.teacher_probe)
        device = ensemble.fc_z.device
        compute_device = next(teacher.parameters()).device if ex.offload else device  # where the step runs
        if ex.autocast:
            warn_if_bf16_is_slow(compute_device, "the generators' teacher forward")
        if compute_device != device and compute_device.type == "cuda" and device.type == "cpu":
            with torch.no_grad():
                for p in ensemble.parameters():
                    p.data = p.data.pin_memory()  # asynchronous host-to-device copies of each chunk
        self.optimizer = StackedAdam(dict(ensemble.named_parameters()), lr=self.optim.lr, betas=self.optim.betas,
                                     compute_device=compute_device)
        # what the run already holds where the step runs when the planner reads the free memory: the teacher, and
        # the ensemble with its Adam moments unless they stay on the host (offload)
        held = [*teacher.parameters(), *teacher.buffers()]
        if compute_device == device:
            held += self.optimizer.state_tensors()
        allocated = sum(t.numel() * t.element_size() for t in held if t.device.type == compute_device.type)
        chunk, memory = plan_chunk(teacher, ensemble, self.batch_size, ex.generators_per_step,
                                   compute_device=compute_device, allocated_bytes=allocated)
        self._init_loop(device=device, num_generators=ensemble.num_generators, generators_per_step=chunk,
                        settings=self.loop, log_path=log_path, checkpoint_dir=checkpoint_dir, distributed=distributed)
        sharded = self.dist.world > 1
        # Whole steps (no chunks): every rank draws the *global* step's latents and labels from
        # the same stream and keeps its rows, so N processes reproduce the 1-process run.
        # With chunks, each rank draws its own chunk from a stream of its own.
        self._global_draw = sharded and self.schedule.chunk == ensemble.num_generators
        if sharded and not self._global_draw:
            self._own_stream_per_rank()
        obstacles = graph_obstacles(compute_device=compute_device, device=device, offload=ex.offload,
                                    world=self.dist.world, scope=L.scope, pool=pool is not None,
                                    optimizer_obstacle=self.optimizer.graph_obstacle())
        graph, why = resolve_graph(ex.cuda_graph, obstacles)
        self.plan = ExecutionPlan(device=device, compute_device=compute_device, chunk=self.schedule.chunk,
                                  num_generators=ensemble.num_generators, memory=memory, cuda_graph=graph,
                                  graph_reason=why, settings=ex)
        self.running_top1 = RunningTop1(ensemble.num_generators, compute_device)  # which class generator fails
        self._capture = cuda_capture  # the seam tests replace (graphed_step.direct_capture on a CPU)
        self._graphs: dict[int, GraphedStep] = {}

    # the plan's decisions, under the names the rest of the library reads
    @property
    def cuda_graph(self) -> bool:
        return self.plan.cuda_graph

    @property
    def graph_refusal(self) -> str | None:
        return self.plan.graph_reason

    @property
    def compute_device(self) -> torch.device:
        return self.plan.compute_device

    @property
    def memory_plan(self):
        return self.plan.memory

    @property
    def placement(self) -> str:
        return self.plan.describe()

    def config(self) -> dict:
        """What must match for a checkpoint to resume this run exactly: the loss and optimiser settings
        (:meth:`fastdfd.settings.Settings.config`; a field at its ``absent`` value is left out, so checkpoints
        written before it existed still resume), the resolved chunk, the seed and a non-identity input space."""
        return {
            **self.loss.config(), **self.optim.config(), **self.loop.config(),
            "generators_per_step": self.schedule.chunk,
            **({"input_space": str(self.input_space)} if self.input_space.name != "identity" else {}),
        }

    @contextlib.contextmanager
    def _run(self) -> Iterator[MomentMatcher]:
        L = self.loss
        adversary = frozen(self.student) if L.adversarial_weight else contextlib.nullcontext()
        with frozen(self.teacher), channels_last_weights(self.teacher, self.execution.channels_last), adversary, \
                MomentMatcher(self.teacher, kind=L.kind, scope=L.scope, layer_weights=L.layer_weights,
                              first_layer_multiplier=L.first_layer_multiplier,
                              normalization=L.normalization) as matcher:
            matcher.distributed = self.dist
            try:
                yield matcher
            finally:
                # a graph reads this matcher's layout and tap tensors: it lives as long as the fit
                self._graphs = {}

    def objective(self, params, z, y, local, matcher: MomentMatcher, augment: torch.Tensor | None = None):
        """The summed loss of k generators on latents z [k, B, latent] and labels y [k, B]; ``augment`` (int64
        [k*B, 3], :meth:`_draw_augment`) jitters and flips the teacher's input.

        Returns (total, moment [k] or scalar, ce [k], tv [k], logits [k*B, classes], the teacher's input [k*B, C, S, S]).
        """
        k, b = z.shape[0], z.shape[1]
        L = self.loss
        x = ensemble_forward(params, self.ensemble.spec, z.to(params["fc_z"].dtype), local)
        seeking = mode_seeking(x, z) if L.diversity_weight else None  # [k], on the generators' own output
        k_global = k * self.dist.world  # scope="ensemble": every generator of the step carries the shared term
        x = self.input_space.from_generator(x.reshape(k * b, *x.shape[2:]))  # pixels, normalised for the teacher
        if augment is not None:  # after normalising: a roll and a flip commute with a per-channel affine map
            x = jitter_flip(x, augment)
        matcher.groups = k if L.scope == "generator" else None
        if self.execution.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.execution.autocast):
            logits = as_logits(self.teacher(x), self.teacher_probe.probabilities)
        moment = matcher.loss()
        ce = F.cross_entropy(logits.float(), y.reshape(-1), reduction="none").view(k, b).mean(1)
        tv = total_variation(x).view(k, b).mean(1) if L.tv_weight else ce.new_zeros(k)
        rest = L.ce_weight * ce + L.tv_weight * tv
        if L.l2_weight:
            rest = rest + L.l2_weight * x.float().pow(2).reshape(k, -1).mean(1)
        if L.adversarial_weight:
            student_logits = self.student(x)
            disagreement = distillation_kl(student_logits, logits, 1.0, reduction="none")
            if L.adversarial_mask:  # CMI / FastDFKD: no push on an image the student already gets wrong (bounded)
                agree = student_logits.argmax(1) == logits.argmax(1)
                disagreement = disagreement * agree.to(disagreement.dtype)
            disagreement = disagreement.view(k, b).mean(1)
            rest = rest - L.adversarial_weight * disagreement
        if seeking is not None:
            rest = rest + L.diversity_weight * seeking
        if L.scope == "generator":
            total = (L.moment_weight * moment + rest).sum()
        else:
            total = k_global * L.moment_weight * moment + rest.sum()
        return total, moment, ce, tv, logits, x

    def _rows(self, chunk: list[int] | None) -> torch.Tensor | None:
        """The chunk's generator indices on the device (from pinned memory on a GPU: no host sync)."""
        if chunk is None:
            return None
        rows = torch.tensor(chunk)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def _train_step(self, matcher: MomentMatcher, rows, z, y, local, augment=None) -> torch.Tensor:
        """One step on drawn inputs: forward, loss, backward, Adam; the loss terms as one tensor.

        Eager steps call it on fresh tensors; a graphed step on its static buffers (it is what
        is captured): no host sync and no step-dependent Python value in here.
        """
        params = self.ensemble.stacked(rows)
        k = self.ensemble.num_generators if rows is None else rows.numel()
        if self.compute_device != self.device:  # offload: only this chunk crosses to the device
            params = {n: t.detach().to(self.compute_device, non_blocking=True).requires_grad_(True)
                      for n, t in params.items()}
            z, y, local = (t.to(self.compute_device, non_blocking=True) for t in (z, y, local))
            if augment is not None:
                augment = augment.to(self.compute_device, non_blocking=True)
        total, moment, ce, tv, logits, x = self.objective(params, z, y, local, matcher, augment)
        if self.pool is not None:  # the images and the teacher's logits this step computed anyway
            self.pool.push(x, logits.float())
        grads = torch.autograd.grad(total, list(params.values()))
        self.optimizer.step(dict(zip(params, grads)), rows)
        hits = (logits.argmax(1) == y.reshape(-1)).float().view(k, -1).mean(1)  # each generator's top-1 this step
        self.running_top1.update(rows, hits)
        return torch.stack([total.detach() / k, moment.detach().mean(), ce.detach().mean(), tv.detach().mean(),
                            hits.mean()])

    def _step(self, matcher: MomentMatcher) -> torch.Tensor:
        rows = self._rows(self.schedule.next())
        z, y, local = self._draw(rows)
        augment = self._draw_augment(z.shape[0])
        if not self.cuda_graph:
            return self._train_step(matcher, rows, z, y, local, augment)
        k = z.shape[0]
        graphed = self._graphs.get(k)
        if graphed is None:  # one graph per chunk size (the schedule keeps it fixed)
            bufs = {"rows": None if rows is None else torch.empty_like(rows), "z": torch.empty_like(z),
                    "y": torch.empty_like(y), "local": torch.empty_like(local),
                    "augment": None if augment is None else torch.empty_like(augment)}
            graphed = self._graphs[k] = GraphedStep(
                lambda: self._train_step(matcher, bufs["rows"], bufs["z"], bufs["y"], bufs["local"],
                                         bufs["augment"]), bufs,
                state=[*self.optimizer.state_tensors(), *self.running_top1.tensors()], warmup=self.GRAPH_WARMUP,
                capture=self._capture)
        return graphed(rows=rows, z=z, y=y, local=local, augment=augment)

    def _draw_augment(self, k: int) -> torch.Tensor | None:
        """The step's jitter and flip draws for k generators' images (int64 [k*B, 3]), or None when both are
        off (nothing drawn: the latents' stream is the one of a run without them). Drawn outside the step,
        like the latents, so that a CUDA graph replays them fresh; whole steps under torch.distributed draw
        the global step's and keep this rank's rows, as :meth:`_draw` does."""
        L = self.loss
        if not (L.jitter or L.flip):
            return None
        n = self.batch_size
        if not self._global_draw:
            return draw_jitter_flip(k * n, L.jitter, L.flip, self.rng, self.device)
        world = draw_jitter_flip(k * self.dist.world * n, L.jitter, L.flip, self.rng, self.device)
        return world.view(k * self.dist.world, n, 3)[self.dist.rank * k:(self.dist.rank + 1) * k].reshape(-1, 3)

    def generator_top1(self) -> list[float]:
        """Each generator's running teacher top-1 on its own training images, in [0, 1]: a mean over about its last
        10 steps, bias-corrected (:mod:`fastdfd.train.generator_top1`); this rank's generators in order, 0 for one
        that has not trained yet. A host sync: call it between fits."""
        return self.running_top1.value().tolist()

    def _after_step(self) -> None:
        if self.loop.sample_every and self.step % self.loop.sample_every == 0 and self.dist.is_main:
            rows = list(range(min(16, self.ensemble.num_generators)))
            # a private RNG: writing samples must not change the training stream
            x, _ = self.ensemble.sample(8, rows, rng=torch.Generator(device=self.device).manual_seed(self.step))
            save_png(grid(generator_pixels(x), len(rows)), os.path.join(os.fspath(self.sample_dir), f"step_{self.step:08d}.png"))

    def _draw(self, rows):
        if not self._global_draw:
            return self.ensemble.draw(self.batch_size, rows, self.rng)
        k, n, ens = self.ensemble.num_generators, self.batch_size, self.ensemble
        z = torch.randn(k * self.dist.world, n, ens.spec.latent_dim, generator=self.rng, device=self.device)
        local = torch.randint(0, ens.classes_per_generator, (k * self.dist.world, n), generator=self.rng,
                              device=self.device)
        lo, hi = self.dist.rank * k, (self.dist.rank + 1) * k
        z, local = z[lo:hi], local[lo:hi]
        return z, ens.class_ids.gather(1, local), local

    def _model_state(self) -> dict:
        return {
            "ensemble_config": self.ensemble.config(),
            "ensemble": {k: v.detach().cpu().clone() for k, v in self.ensemble.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "running_top1": self.running_top1.state_dict(),
        }

    def _adopt_saved_choices(self, state: dict, path) -> None:
        """``generators_per_step="auto"`` chose its chunk from the memory free at this start, which need not be what
        was free when the checkpoint's run started: go on with the checkpoint's chunk (a resume is exact only with
        it) when the planner fits it here, instead of refusing the resume as another configuration."""
        saved = state.get("config", {}).get("generators_per_step")
        if (self.execution.generators_per_step != "auto" or not isinstance(saved, int) or saved == self.schedule.chunk
                or self.dist.world > 1 or not 1 <= saved <= self.ensemble.num_generators):
            return
        memory = plan_generator_memory(self.teacher, self.ensemble, self.batch_size, dtype=self.ensemble.fc_z.dtype,
                                       device=self.compute_device, offload=self.plan.offloaded, chunk=saved)
        self.schedule = ChunkSchedule(self.ensemble.num_generators, saved, self.seed)  # its state is loaded next
        self.plan = dataclasses.replace(self.plan, chunk=saved, memory=memory)

    def _check_models(self, state: dict, path) -> None:
        check_config(path, state["ensemble_config"], self.ensemble.config(), "generator ensemble")

    def _load_model_state(self, state: dict, path) -> None:
        with torch.no_grad():
            for name, p in self.ensemble.named_parameters():
                p.copy_(state["ensemble"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if "running_top1" in state:  # a checkpoint written before it existed: it starts anew, counting from 0
            self.running_top1.load_state_dict(state["running_top1"])

    def quality(self, n_per_class: int = 32, *, verifier: nn.Module | None = None,
                verifier_input_space: str | InputSpace | None = None, seed: int | None = None,
                class_names=None, log: bool = True) -> QualityReport:
        """The teacher's (and optionally a ``verifier``'s) top-1 on fresh images of the ensemble against
        their intended classes, per class and overall, and the per-layer moment distances of those images
        (:func:`fastdfd.train.quality.generator_quality`, this trainer's kind and input space).

        Sampling uses a private RNG (``seed``, default this trainer's seed): training's stream is untouched.
        With ``log``, one row (``step``, ``teacher_top1_on_generated`` and, with a verifier,
        ``verifier_top1_on_generated``) goes to the metrics log: the JSON-lines log itself, or
        ``<stem>_quality.csv`` beside a CSV log (whose columns are the step terms). Call it between fits.
        """
        report = generator_quality(
            self.teacher, self.ensemble, n_per_class=n_per_class, input_space=self.input_space, verifier=verifier,
            verifier_input_space=verifier_input_space, kind=self.loss.kind, seed=self.seed if seed is None else seed,
            class_names=class_names, teacher_outputs="probabilities" if self.teacher_probe.probabilities else "logits",
        )
        if log and self.dist.is_main and self.log.path is not None:
            row = {"step": self.step, "teacher_top1_on_generated": report.teacher_top1}
            if report.verifier_top1 is not None:
                row["verifier_top1_on_generated"] = report.verifier_top1
            path = self.log.path
            if path.suffix == ".csv":
                path = path.with_name(f"{path.stem}_quality.csv")
            from .metrics import MetricsLog

            qlog = MetricsLog(path, tensorboard=False)
            qlog.write([row])
            qlog.close()
        return report
