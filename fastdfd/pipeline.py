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
from .settings import (DistillSettings, ExecutionSettings, LoopSettings, LossSettings, OptimizerSettings,
                       TurnsSettings)
from .data.class_names import class_names_for
from .train import Distiller, GeneratorTrainer, evaluate_accuracy
from .train.pool import ImagePool
from .train.stops import RunInterrupted
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


def _gathered(ensemble: GeneratorEnsemble, ctx: DistContext) -> GeneratorEnsemble | None:
    """The whole ensemble on rank 0 (on the CPU) from every rank's shard; None on the other ranks. A collective:
    every rank calls it."""
    shards = ctx.all_gather_object({k: v.detach().cpu() for k, v in ensemble.state_dict().items()})
    classes = [c for part in ctx.all_gather_object(ensemble.classes) for c in part]
    if not ctx.is_main:
        return None
    full = GeneratorEnsemble.from_config({**ensemble.config(), "num_generators": len(classes), "classes": classes})
    full.load_state_dict({k: torch.cat([s[k] for s in shards]) for k in shards[0]})
    return full


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
    final_checkpoint: bool = False,
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
    refused, naming both. ``final_checkpoint``: the last step is saved too, whatever ``checkpoint_every``, so
    that :func:`distill` with ``turns`` continues this very trainer (its Adam moments too).
    """
    input_space = InputSpace.parse(input_space)
    if (steps is None) == (updates_per_generator is None):
        raise ValueError("pass exactly one of steps and updates_per_generator")
    out = Path(out)
    with _owned(out, ctx, "generator run", resume, overwrite):
        return _train_generators(teacher, ensemble, out, ctx=ctx, device=device, steps=steps,
                                 updates_per_generator=updates_per_generator, resume=resume, input_space=input_space,
                                 quality_per_class=quality_per_class, verifier=verifier, class_names=class_names,
                                 final_checkpoint=final_checkpoint,
                                 settings=dict(loss=loss, optim=optim, execution=execution or ExecutionSettings(),
                                               loop=loop or LoopSettings()))


def _train_generators(teacher, ensemble, out: Path, *, ctx, device, steps, updates_per_generator, resume, input_space,
                      quality_per_class, verifier, class_names, final_checkpoint, settings: dict) -> dict:
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
    if final_checkpoint:
        trainer.checkpoint()
    full = _gathered(ensemble, ctx)
    summary = {"steps": trainer.step, "final": trainer.history[-1] if trainer.history else {},
               "generators": str(out / "generators.pt"), "processes": ctx.world,
               "placement": trainer.plan.describe(), "input_space": space_record(input_space)}
    if ctx.is_main:
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
    turns: TurnsSettings | None = None,
    generators: str | Path | None = None,
    generator_settings: dict | None = None,
) -> dict:
    """Distill ``student`` from ``teacher`` on images of the whole ``ensemble`` (each rank
    samples its shard; DDP student); rank 0 writes ``out/student.pt`` and scores it on
    ``eval_loader``, whose images must be in the teacher's ``input_space``. ``out`` is owned as in
    :func:`train_generators`; checkpoints record the teacher's and the generators' fingerprints. ``settings`` and
    ``loop`` are the distiller's (:class:`fastdfd.train.Distiller`), passed whole.

    With ``turns`` (:class:`fastdfd.settings.TurnsSettings`) the generators go on training while the student
    learns: ``ensemble`` is the output of :func:`train_generators` in the directory ``generators``, run with
    ``final_checkpoint=True``, and its trainer (``generator_settings``: the same ``loss``, ``optim``,
    ``execution`` and ``loop`` objects) continues from its last checkpoint there, Adam moments and step count
    included, logging to that directory's ``metrics.csv`` and checkpointing into its ``checkpoints/``. Each round
    is ``turns.generator_steps`` generator steps, whose images and teacher logits go into a pool of
    ``turns.pool`` images, then ``turns.student_steps`` distillation steps drawn from it (``pool = 0``: fresh
    images of the ensemble as it stands), until the student has made ``steps``. Rank 0 then writes the generators
    as they end in ``out/generators.pt`` (``generators/generators.pt`` stays the warm-up's: the student's
    checkpoints are keyed to it). The generators are saved whenever the student is, and on ``resume`` they go on
    from the checkpoint of the round in which the student's checkpoint was saved (the newest before it if that
    one is missing); their later checkpoints are dropped. The pool starts empty and refills with the first
    round's generator steps, so a resumed run is not bit-identical to an uninterrupted one.

    Raises ValueError when ``turns`` comes without ``generators`` or ``generator_settings`` (or they come without
    ``turns``), when their ``execution`` offloads the generators, or when the warm-up left no checkpoint of its
    last step to continue (run :func:`train_generators` with ``final_checkpoint``).
    """
    input_space = InputSpace.parse(input_space)
    out = Path(out)
    if turns is not None and (generators is None or generator_settings is None):
        raise ValueError("turns= continues the generators' trainer: pass generators= (the directory "
                         "train_generators wrote) and generator_settings= (its loss, optim, execution and loop)")
    if turns is None and (generators is not None or generator_settings is not None):
        raise ValueError("generators= and generator_settings= are for turns=: without it the generators are "
                         "frozen and only ensemble= is used")
    if turns is not None:
        generator_settings = {"loss": generator_settings.get("loss"), "optim": generator_settings.get("optim"),
                              "execution": generator_settings.get("execution") or ExecutionSettings(),
                              "loop": generator_settings.get("loop") or LoopSettings()}
        if generator_settings["execution"].offload:
            raise ValueError("turns= trains the generators beside the student on the device: their execution "
                             "settings must not offload them to host memory")
    with _owned(out, ctx, "distillation run", resume, overwrite):
        return _distill(teacher, student, ensemble, out, steps=steps, ctx=ctx, device=device,
                        eval_loader=eval_loader, resume=resume, input_space=input_space, settings=settings,
                        loop=loop or LoopSettings(), turns=turns,
                        generators=None if generators is None else Path(generators),
                        generator_settings=generator_settings)


def _generator_trainer(teacher, student, ensemble, pool, *, where: Path, ctx, input_space,
                       settings: dict) -> tuple[GeneratorTrainer, int]:
    """The warm-up's generator trainer, on ``ensemble``, filling ``pool`` (loaded from a checkpoint by
    :func:`_align`), and the warm-up's step count."""
    settings = {**settings, "loop": settings["loop"].replace(progress=False)}  # a bar per round: lines instead
    trainer = GeneratorTrainer(
        teacher, ensemble, student=student, pool=pool, log_path=where / "metrics.csv",
        checkpoint_dir=where / "checkpoints", sample_dir=where / "samples", distributed=ctx,
        input_space=input_space, **settings)
    return trainer, json.loads((where / "summary.json").read_text())["steps"]


def _round_step(turns: TurnsSettings, warm_up: int, student_step: int) -> int:
    """The generators' step at the end of the round in which the student made ``student_step``."""
    return warm_up + math.ceil(student_step / turns.student_steps) * turns.generator_steps


def _align(trainer: GeneratorTrainer, distiller: Distiller, turns: TurnsSettings, warm_up: int, where: Path,
           ctx: DistContext) -> None:
    """Load the generators' checkpoint that goes with the student's step: the one saved at the end of the same
    round, else the newest before it, never one before the warm-up's end; and drop the generators' checkpoints
    after it (another path's, which the rotation would keep over the new ones)."""
    target = _round_step(turns, warm_up, distiller.step)
    if not trainer.resume(set(range(warm_up, target + 1))):
        raise ValueError(f"{where / 'checkpoints'} holds no checkpoint of the generators between the warm-up's last "
                         f"step ({warm_up}) and step {target} to continue in turns with the student (train them "
                         f"with final_checkpoint=True, and keep_checkpoints above 1 if the rotation removed it)")
    trainer.discard_checkpoints_after(trainer.step)
    if ctx.is_main:
        print(f"generators: in turns with the student from step {trainer.step}"
              + (f" (the student's step {distiller.step})" if distiller.step else ""))


def _in_turns(trainer: GeneratorTrainer, distiller: Distiller, turns: TurnsSettings, steps: int,
              shown: bool) -> None:
    """Rounds of generator steps then student steps until the student has made ``steps``; every rank makes the
    same rounds. The generators are saved whenever the student is (at the end of that round), so a resume finds
    the pair; an interrupt (SIGINT, SIGTERM) saves both before it stops the run."""
    tenth = max(1, steps // 10)
    every = distiller.checkpoint_every
    for loop in (trainer, distiller):  # one TensorBoard event file per stage, not per round
        loop.close_log_after_fit = False
    try:
        while distiller.step < steps:
            before = distiller.step
            trainer.fit(turns.generator_steps)
            distiller.fit(min(turns.student_steps, steps - distiller.step))
            if every and distiller.step // every > before // every:
                trainer.checkpoint()
            if shown and (distiller.step // tenth > before // tenth or distiller.step == steps):
                kd = distiller.history[-1]["kd"] if distiller.history else float("nan")
                print(f"turns: student step {distiller.step}/{steps} (kd {kd:.4g}), generator step {trainer.step}",
                      flush=True)
    except RunInterrupted:
        trainer.checkpoint()
        distiller.checkpoint()
        raise
    finally:
        for loop in (trainer, distiller):
            loop.close_log_after_fit = True
            loop.log.close()
    trainer.checkpoint()


def _distill(teacher, student, ensemble, out: Path, *, steps, ctx, device, eval_loader, resume, input_space,
             settings, loop, turns, generators, generator_settings) -> dict:
    if ctx.world > 1:
        ensemble = ensemble.shard(*ctx.shard(ensemble.num_generators))
    ensemble = ensemble.to(device)
    teacher, student = teacher.to(device), student.to(device)
    pool = ImagePool(turns.pool) if turns is not None and turns.pool else None
    # made before the generator trainer loads newer weights into the ensemble: the student's checkpoints are
    # keyed to the warm-up's generators, which every resume loads first
    distiller = Distiller(
        teacher, student, ensemble, total_steps=steps, log_path=out / "metrics.csv",
        checkpoint_dir=out / "checkpoints", distributed=ctx, input_space=input_space, settings=settings,
        loop=loop.replace(progress=loop.progress and ctx.is_main and turns is None), pool=pool,
    )
    trainer = None
    if turns is not None:
        trainer, warm_up = _generator_trainer(teacher, student, ensemble, pool, where=generators, ctx=ctx,
                                              input_space=input_space, settings=generator_settings)
    if resume:
        _resume(distiller, "distill", out, ctx)
    if trainer is not None:  # after the student's resume: the generators' step goes with the student's
        _align(trainer, distiller, turns, warm_up, generators, ctx)
    if ctx.is_main:
        write_manifest(out, distiller)
    if trainer is None:
        distiller.fit(max(0, steps - distiller.step))
    else:
        _in_turns(trainer, distiller, turns, steps, shown=loop.progress and ctx.is_main)
    summary: dict[str, Any] = {"steps": distiller.step, "student": str(out / "student.pt"),
                               "input_space": space_record(input_space)}
    full = _gathered(ensemble, ctx) if trainer is not None else None
    if trainer is not None:
        summary.update(generator_steps=trainer.step, generators=str(out / "generators.pt"), turns=turns.as_dict())
    if ctx.is_main:  # the student is the same on every rank (DDP)
        if full is not None:
            save_ensemble(full, out / "generators.pt")
        torch.save(student.state_dict(), out / "student.pt")
        if eval_loader is not None:
            summary["student_accuracy"] = distiller.evaluate(eval_loader)
            summary["teacher_accuracy"] = evaluate_accuracy(teacher, eval_loader, device)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.barrier()
    return summary
