"""GeneratorTrainer: trains a GeneratorEnsemble from nothing but a teacher.

Per step, for the k generators of this step (all, or a chunk of ``generators_per_step``):

    x      = ensemble(z, y)                       one batched pass, [k*B, C, S, S]
    logits = teacher(x)                           BN layers tapped by a MomentMatcher
    L_k    = moment_weight * D_k + ce_weight * CE_k + tv_weight * TV_k + l2_weight * mean(x_k^2)
             - adversarial_weight * KL(T(x_k) || S(x_k)) + diversity_weight * MS_k
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
the ensemble forward, the tapped teacher forward, the loss, the backward and the StackedAdam
update) is captured once into a CUDA graph and replayed (:mod:`fastdfd.train.graphed_step`).
The step reads its inputs from static buffers: the chunk's rows, latents and labels are drawn
exactly as in eager mode (same private RNG, same order, so runs and resumes are reproducible
and match eager ones) and copied into the buffers before each replay. Adam's step counts live
on the device, so the bias corrections advance inside the graph.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import check_config
from ..distributed import DistContext
from ..input_space import InputSpace, generator_pixels
from ..nn.ensemble import GeneratorEnsemble, ensemble_forward
from ..rundir import fingerprint
from ..nn.matcher import NORMALIZATIONS, SCOPES, MomentMatcher
from ..ops import check_kind
from .graphed_step import GraphedStep, cuda_capture
from .images import grid, save_png
from .loop import StepLoop
from .losses import distillation_kl, mode_seeking, total_variation
from .memory import plan_generator_memory
from .optim import StackedAdam
from .pool import ImagePool
from .probe import as_logits, check_ensemble_classes, check_finite_weights, check_placement, probe_teacher
from .quality import QualityReport, generator_quality


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside; the model's flags restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class GeneratorTrainer(StepLoop):
    """Moment matching + cross-entropy (+ total variation) training of every generator.

    Args (beyond teacher and ensemble):
        kind, scope, layer_weights, first_layer_multiplier, normalization: the MomentMatcher's settings
            (``normalization="mean"``, the default: each layer's distance averaged over its channels and the
            layers averaged, a scale that does not grow with the teacher's width or depth; ``"sum"``: the
            paper's summed form). Default scope ``"ensemble"``: one set of statistics over every generator's
            images, the class mixture the running statistics describe.
        moment_weight, ce_weight, tv_weight: loss weights (default 10 / 0.1 / 0: the moment term 100 times
            the cross-entropy, measured on the digits CNN and the pretrained EfficientNet-Lite0 in
            docs/generators.md; the paper's 10 / 1 is ``preset("paper")``).
        l2_weight: an L2 image prior, the mean square of the teacher's input (DeepInversion's); folded into
            ``loss`` (not a logged term of its own).
        adversarial_weight, student: the generators also *maximise* the disagreement of ``student`` with the
            teacher on their images, ``KL(softmax(T(x)) || softmax(S(x)))`` per image (the adversarial term of
            DFAD, Fang et al. 2019, and CMI, Fang et al. 2021): they seek what the student has not yet learned.
            The student runs frozen in eval mode inside the step (its weights and BN statistics untouched);
            ``student`` may be set or replaced between fits. Default 0: off.
        diversity_weight: a mode-seeking term (Mao et al., "Mode Seeking Generative Adversarial Networks",
            2019) against collapse of a generator onto one image: per generator, the step's images are paired
            (first half against second half) and ``mean|z_i - z_j| / (mean|x_i - x_j| + 1e-5)`` is minimised,
            so images move apart as their latents do. Default 0: off. Both fold into ``loss``.
        pool: an :class:`fastdfd.train.pool.ImagePool` that every step fills with its images (in the teacher's
            input space, detached) and the teacher's logits on them, for ``Distiller(..., pool=pool)``.
        batch_size: images per generator per step.
        offload: keep every generator's parameters and Adam moments in (pinned) host memory
            and move only the step's chunk to the teacher's device; for ensembles larger than
            the GPU. Off by default: states live with the ensemble.
        sample_every, sample_dir: every ``sample_every`` steps write ``sample_dir/step_N.png``,
            one row of 8 images per generator (the first 16 of this process).
        autocast: run the teacher under bf16 autocast; channels_last: convert the teacher
            (and feed it) channels_last. The moment sums stay fp32 either way.
        generators_per_step: generators trained per step (default all); chunks visit
            every generator evenly and each keeps its own Adam state. ``"auto"``: the
            largest chunk the memory planner (:mod:`fastdfd.train.memory`) fits in the
            device's free memory; a configuration that cannot fit is refused before the
            first step, with the figures.
            every generator evenly and each keeps its own Adam state.
        lr, betas: Adam's (per generator); default 1e-2, (0.5, 0.999).
        seed: seeds this trainer's own RNG (latents, labels, chunks); global RNG untouched.
        log_path: per-step metrics, ``.csv`` or JSON lines; ``log_every``: host sync period.
        tensorboard: also write the metrics to ``<log dir>/tensorboard/<log stem>/``: None (default)
            when the tensorboard package is installed, False never, True required.
        checkpoint_dir, checkpoint_every, keep_checkpoints: periodic rotating checkpoints.
        cuda_graph: capture the fixed-shape step in a CUDA graph and replay it (less launch
            overhead: it matters for small generators and teachers). ``True`` requires it and
            raises ValueError naming what prevents it; ``"auto"`` uses it where allowed and
            otherwise trains eagerly, saying why in ``placement``. Allowed when the step runs on
            a CUDA device, without offload (streaming chunks to and from host memory copies on
            the host's schedule), and with one process or ``scope="generator"`` (scope="ensemble"
            over several processes all-reduces inside the step). The first ``GRAPH_WARMUP``
            steps of each ``fit`` run eagerly on a side stream, then the step is captured once
            per chunk size; the graph keeps one step's activations in its own memory pool.
            ``cuda_graph`` (after construction) says whether it is on, ``graph_refusal`` why not.
        input_space: the teacher's input normalisation (:class:`fastdfd.input_space.InputSpace`, a preset
            name such as ``"imagenet"`` or ``"minus_one_one"``, or None for ``identity``). The generators
            make pixels in [0, 1] (their tanh output g read as (g + 1) / 2); the teacher sees them normalised.
        teacher_outputs: ``"logits"`` (default) or ``"probabilities"`` for a teacher that ends in softmax
            (its log is used). Refused up front, with the figures: images whose channels or size the teacher
            cannot take, class ids beyond the teacher's outputs, and a softmax teacher declared as logits
            (one probe forward on two images, :mod:`fastdfd.train.probe`).
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
        kind: str = "kl",
        scope: str = "ensemble",
        layer_weights: Sequence[float] | Mapping[str, float] | None = None,
        first_layer_multiplier: float = 1.0,
        normalization: str = "mean",
        moment_weight: float = 10.0,
        ce_weight: float = 0.1,
        tv_weight: float = 0.0,
        l2_weight: float = 0.0,
        adversarial_weight: float = 0.0,
        diversity_weight: float = 0.0,
        student: nn.Module | None = None,
        pool: ImagePool | None = None,
        batch_size: int = 32,
        generators_per_step: int | str | None = None,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.5, 0.999),
        seed: int = 0,
        log_path: str | os.PathLike | None = None,
        log_every: int = 10,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        keep_checkpoints: int = 3,
        distributed: DistContext | None = None,
        autocast: bool = False,
        channels_last: bool = False,
        sample_every: int = 0,
        sample_dir: str | os.PathLike | None = None,
        offload: bool = False,
        cuda_graph: bool | str = False,  # also "off" / "on"
        tensorboard: bool | None = None,
        input_space: str | InputSpace | None = None,
        teacher_outputs: str = "logits",
    ):
        check_kind(kind)
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
        if min(moment_weight, ce_weight, tv_weight, l2_weight, adversarial_weight, diversity_weight) < 0:
            raise ValueError("loss weights must be non-negative")
        if adversarial_weight and student is None:
            raise ValueError("adversarial_weight > 0 needs the student whose disagreement the generators maximise")
        if diversity_weight and batch_size < 2:
            raise ValueError("diversity_weight > 0 pairs a generator's images: batch_size must be at least 2")
        if student is not None and student is teacher:
            raise ValueError("the student given for the adversarial term is the teacher itself")
        self.teacher, self.ensemble = teacher, ensemble
        self.input_space = InputSpace.parse(input_space)
        # one probe forward: images, classes and output kind refused here, not mid-run
        spec = ensemble.spec
        check_finite_weights(teacher, "teacher")
        self._identity = {"teacher": fingerprint(teacher)}  # what a checkpoint of this run was trained against
        check_placement(ensemble, {"teacher": teacher, **({"student": student} if student is not None else {})},
                        check_device=not offload)  # before the probe: its forward would fail on a mismatch, unnamed
        self.teacher_probe = probe_teacher(teacher, spec.channels, spec.image_size, self.input_space, teacher_outputs)
        check_ensemble_classes(ensemble, self.teacher_probe)
        self.kind, self.scope = kind, scope
        self.layer_weights, self.first_layer_multiplier = layer_weights, float(first_layer_multiplier)
        self.moment_weight, self.ce_weight, self.tv_weight = float(moment_weight), float(ce_weight), float(tv_weight)
        self.normalization, self.l2_weight = normalization, float(l2_weight)
        self.adversarial_weight, self.diversity_weight = float(adversarial_weight), float(diversity_weight)
        self.student = student
        self.pool = pool
        self.batch_size = int(batch_size)
        self.lr, self.betas = float(lr), tuple(betas)
        # bf16 autocast of the teacher's forward (generators keep their own dtype) and a
        # channels_last teacher: the fast path on tensor-core GPUs; both off by default
        self.autocast, self.channels_last = bool(autocast), bool(channels_last)
        if self.channels_last:
            teacher.to(memory_format=torch.channels_last)
        self.offload = bool(offload)
        teacher_device = next(teacher.parameters()).device
        # where the step runs; the ensemble (and so the draws) stays on its own device
        self.compute_device = teacher_device if self.offload else ensemble.fc_z.device
        if self.offload and teacher_device.type == "cuda" and ensemble.fc_z.device.type == "cpu":
            with torch.no_grad():
                for p in ensemble.parameters():
                    p.data = p.data.pin_memory()  # asynchronous host-to-device copies of each chunk
        self.optimizer = StackedAdam(dict(ensemble.named_parameters()), lr=lr, betas=self.betas,
                                     compute_device=self.compute_device)
        self.placement = (f"generator parameters and Adam moments in host memory, each step's chunk streamed to "
                          f"{self.compute_device}" if self.compute_device != ensemble.fc_z.device else
                          f"generator parameters and Adam moments on {ensemble.fc_z.device}")
        if sample_every < 0 or (sample_every and sample_dir is None):
            raise ValueError("sample_every must be >= 0 and needs a sample_dir")
        self.sample_every, self.sample_dir = int(sample_every), sample_dir
        self.memory_plan = None
        if generators_per_step == "auto":  # on a CPU (no budget) that is every generator
            self.memory_plan = plan_generator_memory(teacher, ensemble, self.batch_size, dtype=ensemble.fc_z.dtype)
            generators_per_step = self.memory_plan.chunk
        elif ensemble.fc_z.device.type == "cuda":
            self.memory_plan = self._check_memory(teacher, ensemble, generators_per_step)
        self._init_loop(
            device=ensemble.fc_z.device, num_generators=ensemble.num_generators,
            generators_per_step=generators_per_step, seed=seed, log_path=log_path, log_every=log_every,
            progress=progress, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, distributed=distributed, tensorboard=tensorboard,
        )
        sharded = self.dist.world > 1
        # Whole steps (no chunks): every rank draws the *global* step's latents and labels from
        # the same stream and keeps its rows, so N processes reproduce the 1-process run.
        # With chunks, each rank draws its own chunk from a stream of its own.
        self._global_draw = sharded and self.schedule.chunk == ensemble.num_generators
        if sharded and not self._global_draw:
            self._own_stream_per_rank()
        self.cuda_graph, self.graph_refusal = self._resolve_cuda_graph(cuda_graph)
        self._capture = cuda_capture  # the seam tests replace (graphed_step.direct_capture on a CPU)
        self._graphs: dict[int, GraphedStep] = {}
        if self.cuda_graph:
            self.placement += f"; step captured in a CUDA graph (after {self.GRAPH_WARMUP} eager warm-up steps)"
        elif cuda_graph == "auto":
            self.placement += f"; CUDA graph off: {self.graph_refusal}"

    def _graph_obstacles(self) -> list[str]:
        """Why this configuration's step cannot be captured in a CUDA graph (empty: it can)."""
        reasons = []
        if self.compute_device.type != "cuda":
            reasons.append(f"the step runs on {self.compute_device}, not on a CUDA device")
        offloaded = self.offload or self.compute_device != self.device
        if offloaded:
            reasons.append("offload=True streams each chunk between host and device memory (host-side copies "
                           "and syncs every step)")
        if self.dist.world > 1 and self.scope == "ensemble":
            reasons.append(f"scope='ensemble' over {self.dist.world} processes all-reduces the moment sums "
                           "inside the step (no collectives in a captured graph here; use scope='generator')")
        if self.pool is not None:
            reasons.append("a pool is filled at a position that moves every step (a graph replays one copy)")
        why = None if offloaded else self.optimizer.graph_obstacle()
        if why is not None:
            reasons.append(why)
        return reasons

    def _resolve_cuda_graph(self, cuda_graph) -> tuple[bool, str | None]:
        cuda_graph = {"off": False, "on": True}.get(cuda_graph, cuda_graph)  # the CLI's and recipes' spelling
        if cuda_graph not in (False, True, "auto"):
            raise ValueError(f"cuda_graph must be False, True or 'auto' (or 'off'/'on'), got {cuda_graph!r}")
        if not cuda_graph:
            return False, "cuda_graph=False"
        reasons = self._graph_obstacles()
        if not reasons:
            return True, None
        why = "; ".join(reasons)
        if cuda_graph != "auto":
            raise ValueError(f"cuda_graph=True, but the step cannot be captured in a CUDA graph: {why}")
        return False, why

    def config(self) -> dict:
        """Hyperparameters that must match for a checkpoint to resume this run exactly."""
        lw = self.layer_weights
        return {
            "kind": self.kind, "scope": self.scope, "batch_size": self.batch_size,
            "generators_per_step": self.schedule.chunk, "moment_weight": self.moment_weight,
            "ce_weight": self.ce_weight, "tv_weight": self.tv_weight, "lr": self.lr, "betas": list(self.betas),
            "first_layer_multiplier": self.first_layer_multiplier, "seed": self.seed,
            "layer_weights": dict(lw) if isinstance(lw, Mapping) else (None if lw is None else list(lw)),
            # only when set: checkpoints written before these settings existed still resume
            **({"normalization": self.normalization} if self.normalization != "sum" else {}),
            **({"l2_weight": self.l2_weight} if self.l2_weight else {}),
            **({"adversarial_weight": self.adversarial_weight} if self.adversarial_weight else {}),
            **({"diversity_weight": self.diversity_weight} if self.diversity_weight else {}),
            **({"input_space": str(self.input_space)} if self.input_space.name != "identity" else {}),
        }

    @contextlib.contextmanager
    def _run(self) -> Iterator[MomentMatcher]:
        adversary = frozen_eval(self.student) if self.adversarial_weight else contextlib.nullcontext()
        with frozen_eval(self.teacher), adversary, MomentMatcher(
            self.teacher, kind=self.kind, scope=self.scope, layer_weights=self.layer_weights,
            first_layer_multiplier=self.first_layer_multiplier, normalization=self.normalization,
        ) as matcher:
            matcher.distributed = self.dist
            try:
                yield matcher
            finally:
                # a graph reads this matcher's layout and tap tensors: it lives as long as the fit
                self._graphs = {}

    def objective(self, params, z, y, local, matcher: MomentMatcher):
        """The summed loss of k generators on latents z [k, B, latent] and labels y [k, B].

        Returns (total, moment [k] or scalar, ce [k], tv [k], logits [k*B, classes], the teacher's input [k*B, C, S, S]).
        """
        k, b = z.shape[0], z.shape[1]
        x = ensemble_forward(params, self.ensemble.spec, z.to(params["fc_z"].dtype), local)
        seeking = mode_seeking(x, z) if self.diversity_weight else None  # [k], on the generators' own output
        k_global = k * self.dist.world  # scope="ensemble": every generator of the step carries the shared term
        x = self.input_space.from_generator(x.reshape(k * b, *x.shape[2:]))  # pixels, normalised for the teacher
        matcher.groups = k if self.scope == "generator" else None
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.autocast):
            logits = as_logits(self.teacher(x), self.teacher_probe.probabilities)
        moment = matcher.loss()
        ce = F.cross_entropy(logits.float(), y.reshape(-1), reduction="none").view(k, b).mean(1)
        tv = total_variation(x).view(k, b).mean(1) if self.tv_weight else ce.new_zeros(k)
        rest = self.ce_weight * ce + self.tv_weight * tv
        if self.l2_weight:
            rest = rest + self.l2_weight * x.float().pow(2).reshape(k, -1).mean(1)
        if self.adversarial_weight:
            disagreement = distillation_kl(self.student(x), logits, 1.0, reduction="none").view(k, b).mean(1)
            rest = rest - self.adversarial_weight * disagreement
        if seeking is not None:
            rest = rest + self.diversity_weight * seeking
        if self.scope == "generator":
            total = (self.moment_weight * moment + rest).sum()
        else:
            total = k_global * self.moment_weight * moment + rest.sum()
        return total, moment, ce, tv, logits, x

    def _rows(self, chunk: list[int] | None) -> torch.Tensor | None:
        """The chunk's generator indices on the device (from pinned memory on a GPU: no host sync)."""
        if chunk is None:
            return None
        rows = torch.tensor(chunk)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def _train_step(self, matcher: MomentMatcher, rows, z, y, local) -> torch.Tensor:
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
        total, moment, ce, tv, logits, x = self.objective(params, z, y, local, matcher)
        if self.pool is not None:  # the images and the teacher's logits this step computed anyway
            self.pool.push(x, logits.float())
        grads = torch.autograd.grad(total, list(params.values()))
        self.optimizer.step(dict(zip(params, grads)), rows)
        acc = (logits.argmax(1) == y.reshape(-1)).float().mean()
        return torch.stack([total.detach() / k, moment.detach().mean(), ce.detach().mean(), tv.detach().mean(), acc])

    def _step(self, matcher: MomentMatcher) -> torch.Tensor:
        rows = self._rows(self.schedule.next())
        z, y, local = self._draw(rows)
        if not self.cuda_graph:
            return self._train_step(matcher, rows, z, y, local)
        k = z.shape[0]
        graphed = self._graphs.get(k)
        if graphed is None:  # one graph per chunk size (the schedule keeps it fixed)
            bufs = {"rows": None if rows is None else torch.empty_like(rows), "z": torch.empty_like(z),
                    "y": torch.empty_like(y), "local": torch.empty_like(local)}
            graphed = self._graphs[k] = GraphedStep(
                lambda: self._train_step(matcher, bufs["rows"], bufs["z"], bufs["y"], bufs["local"]), bufs,
                state=self.optimizer.state_tensors(), warmup=self.GRAPH_WARMUP, capture=self._capture)
        return graphed(rows=rows, z=z, y=y, local=local)

    def _after_step(self) -> None:
        if self.sample_every and self.step % self.sample_every == 0 and self.dist.is_main:
            rows = list(range(min(16, self.ensemble.num_generators)))
            # a private RNG: writing samples must not change the training stream
            x, _ = self.ensemble.sample(8, rows, rng=torch.Generator(device=self.device).manual_seed(self.step))
            save_png(grid(generator_pixels(x), len(rows)), os.path.join(os.fspath(self.sample_dir), f"step_{self.step:08d}.png"))

    def _check_memory(self, teacher, ensemble, generators_per_step):
        """An explicit chunk on a GPU: refused only if one generator cannot fit; warned if the chunk may not."""
        plan = plan_generator_memory(teacher, ensemble, self.batch_size, dtype=ensemble.fc_z.dtype)  # raises if none fits
        wanted = ensemble.num_generators if generators_per_step is None else int(generators_per_step)
        if wanted > plan.chunk:
            warnings.warn(f"fastdfd: {wanted} generators per step may not fit: the planner estimates that "
                          f"{plan.describe()}; pass generators_per_step='auto' to use that", RuntimeWarning,
                          stacklevel=3)
        return plan

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
        }

    def _check_models(self, state: dict, path) -> None:
        check_config(path, state["ensemble_config"], self.ensemble.config(), "generator ensemble")

    def _load_model_state(self, state: dict, path) -> None:
        with torch.no_grad():
            for name, p in self.ensemble.named_parameters():
                p.copy_(state["ensemble"][name])
        self.optimizer.load_state_dict(state["optimizer"])

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
            verifier_input_space=verifier_input_space, kind=self.kind, seed=self.seed if seed is None else seed,
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
