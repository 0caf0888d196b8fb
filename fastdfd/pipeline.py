"""The two data-free stages as functions, shared by ``fastdfd train-generators`` / ``distill``
and by ``fastdfd run RECIPE``: build, shard, train, gather, write.

Under torchrun every process calls them with its own DistContext; each trains or samples
its shard of the ensemble, and rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import DistContext
from .input_space import InputSpace
from .nn import GeneratorEnsemble, save_ensemble
from .rundir import RunLock, claim, write_manifest
from .settings import DistillSettings, ExecutionSettings, LoopSettings, LossSettings, OptimizerSettings
from .data.class_names import class_names_for
from .train import Distiller, GeneratorTrainer, evaluate_accuracy
from .train.quality import generator_quality, write_quality


def space_record(space: str | InputSpace | None) -> dict:
    """An input space as the run's summaries record it: name, a spec that parses back, mean, std."""
    space = InputSpace.parse(space)
    spec = space.name if space.name != "custom" else (
        f"mean={','.join(map(repr, space.mean))};std={','.join(map(repr, space.std))}")
    return {"name": space.name, "spec": spec, "mean": list(space.mean), "std": list(space.std)}


@contextlib.contextmanager
def _owned(out: Path, ctx: DistContext, what: str, resume: bool, overwrite: bool) -> Iterator[None]:
    """Rank 0 claims ``out`` for this run (a fresh run refuses another run's files unless ``overwrite``) and holds
    its lock while the stage writes (a second writer is refused, naming the first)."""
    if not ctx.is_main:
        yield
        return
    claim(out, resume=resume, overwrite=overwrite)
    with RunLock(out, what):
        yield


def _resume(loop, what: str, out: Path, ctx: DistContext) -> None:
    """Resume ``loop`` from its newest usable checkpoint, and say where it starts either way (a resume that
    finds nothing, under a mistyped ``out`` for one, must not restart from step 0 without a word)."""
    if loop.resume():
        if ctx.is_main:
            print(f"{what}: resumed at step {loop.step}")
    elif ctx.is_main:
        where = out / "checkpoints"
        why = "no such directory" if not where.is_dir() else "no usable checkpoint in it"
        print(f"{what}: --resume found nothing to resume in {where} ({why}); starting at step 0")


def train_generators(
    teacher: nn.Module,
    ensemble: GeneratorEnsemble,
    out: str | Path,
    *,
    ctx: DistContext,
    device: torch.device,
    steps: int | None = None,
    updates_per_generator: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    input_space: str | InputSpace | None = None,
    quality_per_class: int = 32,
    verifier: nn.Module | None = None,
    class_names: list[str] | None = None,
    loss: LossSettings | None = None,
    optim: OptimizerSettings | None = None,
    execution: ExecutionSettings | None = None,
    loop: LoopSettings | None = None,
) -> dict:
    """Train the full ``ensemble`` (this rank keeps its shard); rank 0 writes ``out/generators.pt``
    and ``out/summary.json``, which records the teacher's ``input_space`` (the one ``distill``
    must use with these generators).

    The length is ``steps`` optimizer steps in all, or ``updates_per_generator``: the steps
    that give each generator that many updates whatever the chunk and the number of
    processes. Logs, checkpoints and sample grids go under ``out``. ``loss``, ``optim``, ``execution`` and
    ``loop`` are the trainer's settings (:class:`fastdfd.train.GeneratorTrainer`), passed whole.

    After training, rank 0 measures the quality of the whole ensemble's images
    (:mod:`fastdfd.train.quality`: ``quality_per_class`` fresh images per class, the teacher's top-1
    against the intended class per class and overall, a ``verifier``'s when given, per-layer moment
    distances) and writes ``out/quality.json``, ``out/quality_moments.png`` (needs matplotlib) and
    ``out/quality_samples.png`` (one row per class, labelled with ``class_names``, by default the
    ImageNet names for a 1000-class teacher); the overall figures go in ``summary.json`` and in
    ``out/metrics_quality.csv``. ``quality_per_class=0`` skips it.

    ``out`` belongs to one run (:mod:`fastdfd.rundir`): a fresh run refuses a directory holding another
    run's files unless ``overwrite`` (which empties it), and a second writer is refused while this one holds
    the directory's lock. Checkpoints record the teacher's fingerprint: a resume against another teacher is
    refused, naming both.
    """
    input_space = InputSpace.parse(input_space)
    if (steps is None) == (updates_per_generator is None):
        raise ValueError("pass exactly one of steps and updates_per_generator")
    out = Path(out)
    with _owned(out, ctx, "generator run", resume, overwrite):
        return _train_generators(teacher, ensemble, out, ctx=ctx, device=device, steps=steps,
                                 updates_per_generator=updates_per_generator, resume=resume, input_space=input_space,
                                 quality_per_class=quality_per_class, verifier=verifier, class_names=class_names,
                                 settings=dict(loss=loss, optim=optim, execution=execution or ExecutionSettings(),
                                               loop=loop or LoopSettings()))


def _train_generators(teacher, ensemble, out: Path, *, ctx, device, steps, updates_per_generator, resume, input_space,
                      quality_per_class, verifier, class_names, settings: dict) -> dict:
    if ctx.world > 1:
        ensemble = ensemble.shard(*ctx.shard(ensemble.num_generators))
    if not settings["execution"].offload:
        ensemble = ensemble.to(device)
    settings["loop"] = settings["loop"].replace(progress=settings["loop"].progress and ctx.is_main)
    trainer = GeneratorTrainer(
        teacher.to(device), ensemble, log_path=out / "metrics.csv", checkpoint_dir=out / "checkpoints",
        sample_dir=out / "samples", distributed=ctx, input_space=input_space, **settings,
    )
    if ctx.is_main:
        print(f"plan: {trainer.plan.describe()}")
    if steps is None:  # the schedule visits this shard's generators evenly, chunk at a time
        steps = math.ceil(updates_per_generator * ensemble.num_generators / trainer.schedule.chunk)
    if resume:
        _resume(trainer, "generators", out, ctx)
    if ctx.is_main:
        write_manifest(out, trainer)
    trainer.fit(max(0, steps - trainer.step))
    # collectives on every rank; rank 0 puts the shards back together and writes the ensemble
    shards = ctx.all_gather_object({k: v.detach().cpu() for k, v in ensemble.state_dict().items()})
    classes = [c for part in ctx.all_gather_object(ensemble.classes) for c in part]
    summary = {"steps": trainer.step, "final": trainer.history[-1] if trainer.history else {},
               "generators": str(out / "generators.pt"), "processes": ctx.world,
               "placement": trainer.plan.describe(), "input_space": space_record(input_space)}
    if ctx.is_main:
        full = GeneratorEnsemble.from_config({**ensemble.config(), "num_generators": len(classes), "classes": classes})
        full.load_state_dict({k: torch.cat([s[k] for s in shards]) for k in shards[0]})
        save_ensemble(full, out / "generators.pt")
        if quality_per_class:
            names = class_names if class_names is not None else class_names_for(trainer.teacher_probe.num_classes)
            report = generator_quality(
                trainer.teacher, full.to(device), n_per_class=quality_per_class, input_space=input_space,
                verifier=verifier, kind=trainer.loss.kind, seed=trainer.seed, class_names=names,
                teacher_outputs="probabilities" if trainer.teacher_probe.probabilities else "logits")
            summary["quality"] = {"teacher_top1_on_generated": report.teacher_top1, "n_per_class": quality_per_class,
                                  **({"verifier_top1_on_generated": report.verifier_top1} if verifier is not None
                                     else {}),
                                  "files": write_quality(report, out, {"step": trainer.step})}
            from .train.metrics import MetricsLog

            qlog = MetricsLog(out / "metrics_quality.csv", tensorboard=False)
            qlog.write([{"step": trainer.step, "teacher_top1_on_generated": report.teacher_top1,
                         **({"verifier_top1_on_generated": report.verifier_top1} if verifier is not None else {})}])
            qlog.close()
            print(f"quality: the teacher's top-1 on generated images {report.teacher_top1 * 100:.1f}% "
                  f"({quality_per_class} per class; {out / 'quality.json'})")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    ctx.barrier()
    return summary


def distill(
    teacher: nn.Module,
    student: nn.Module,
    ensemble: GeneratorEnsemble,
    out: str | Path,
    *,
    steps: int,
    ctx: DistContext,
    device: torch.device,
    eval_loader: Iterable | None = None,
    resume: bool = False,
    overwrite: bool = False,
    input_space: str | InputSpace | None = None,
    settings: DistillSettings | None = None,
    loop: LoopSettings | None = None,
) -> dict:
    """Distill ``student`` from ``teacher`` on images of the whole ``ensemble`` (each rank
    samples its shard; DDP student); rank 0 writes ``out/student.pt`` and scores it on
    ``eval_loader``, whose images must be in the teacher's ``input_space``. ``out`` is owned as in
    :func:`train_generators`; checkpoints record the teacher's and the generators' fingerprints. ``settings`` and
    ``loop`` are the distiller's (:class:`fastdfd.train.Distiller`), passed whole."""
    input_space = InputSpace.parse(input_space)
    out = Path(out)
    with _owned(out, ctx, "distillation run", resume, overwrite):
        return _distill(teacher, student, ensemble, out, steps=steps, ctx=ctx, device=device,
                        eval_loader=eval_loader, resume=resume, input_space=input_space, settings=settings,
                        loop=loop or LoopSettings())


def _distill(teacher, student, ensemble, out: Path, *, steps, ctx, device, eval_loader, resume, input_space,
             settings, loop) -> dict:
    if ctx.world > 1:
        ensemble = ensemble.shard(*ctx.shard(ensemble.num_generators))
    ensemble = ensemble.to(device)
    teacher, student = teacher.to(device), student.to(device)
    distiller = Distiller(
        teacher, student, ensemble, total_steps=steps, log_path=out / "metrics.csv",
        checkpoint_dir=out / "checkpoints", distributed=ctx, input_space=input_space, settings=settings,
        loop=loop.replace(progress=loop.progress and ctx.is_main),
    )
    if resume:
        _resume(distiller, "distill", out, ctx)
    if ctx.is_main:
        write_manifest(out, distiller)
    distiller.fit(max(0, steps - distiller.step))
    summary: dict[str, Any] = {"steps": distiller.step, "student": str(out / "student.pt"),
                               "input_space": space_record(input_space)}
    if ctx.is_main:  # the student is the same on every rank (DDP)
        torch.save(student.state_dict(), out / "student.pt")
        if eval_loader is not None:
            summary["student_accuracy"] = distiller.evaluate(eval_loader)
            summary["teacher_accuracy"] = evaluate_accuracy(teacher, eval_loader, device)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.barrier()
    return summary
