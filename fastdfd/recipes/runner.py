"""``fastdfd run RECIPE``: teacher training (optional), generator training, distillation.

Every value comes from the recipe (see :mod:`fastdfd.recipes.schema`); the teacher's input
space (``teacher.input_space``) reaches every stage: the teacher's training data, the
generator trainer, the distiller and the evaluation data. The only things
not in it are where to write (``out``), which device, and whether to resume. All checks
that can fail run before the first stage (:func:`fastdfd.recipes.preflight.preflight`).
Stages that finished are skipped by ``--resume``; an interrupted one resumes from its
own checkpoints. Under torchrun the generator and distillation stages run sharded.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import pipeline
from ..distributed import init_from_env, local_device
from ..models.weights import load_weights
from ..nn import GeneratorEnsemble, load_ensemble
from .loader import Recipe
from .preflight import Prepared, ensemble_from_recipe, preflight
from .rundir import environment, open_run_dir, write_json, write_run_header

STAGES = ("teacher", "generators", "distill")


def _chunk(value):
    return None if value == "all" else value


def _generator_kwargs(recipe: Recipe) -> dict:
    g = recipe["generators"]
    return dict(
        kind=g["kind"], scope=g["scope"], normalization=g["normalization"], moment_weight=g["moment_weight"], ce_weight=g["ce_weight"],
        tv_weight=g["tv_weight"], first_layer_multiplier=g["first_layer_multiplier"], batch_size=g["batch_size"],
        generators_per_step=_chunk(g["generators_per_step"]), lr=g["lr"], betas=(g["beta1"], g["beta2"]),
        seed=recipe["seed"] + 1, checkpoint_every=g["checkpoint_every"], sample_every=g["sample_every"],
        autocast=g["bf16"], channels_last=g["bf16"], offload=g["offload"],
        cuda_graph=g["cuda_graph"], input_space=recipe["teacher"]["input_space"],
    )


def _distill_chunk(recipe: Recipe, world: int) -> int | None:
    """The recipe's chunk is global: each of ``world`` processes samples its share of it."""
    chunk = _chunk(recipe["distill"]["generators_per_step"])
    if chunk is None or world == 1:
        return chunk
    if chunk % world:
        raise ValueError(f"distill.generators_per_step = {chunk} cannot be split evenly over {world} processes")
    return chunk // world


def _distill_kwargs(recipe: Recipe, world: int) -> dict:
    d = recipe["distill"]
    return dict(
        temperature=d["temperature"], batch_size=d["batch_size"], generators_per_step=_distill_chunk(recipe, world),
        optimizer=d["optimizer"], lr=d["lr"], momentum=d["momentum"], weight_decay=d["weight_decay"],
        seed=recipe["seed"] + 2, checkpoint_every=d["checkpoint_every"],
        input_space=recipe["teacher"]["input_space"],
    )


def _train_teacher(recipe: Recipe, prep: Prepared, out: Path, device: torch.device, progress: bool) -> dict:
    from ..train.teacher import TeacherSettings, train_teacher

    settings = TeacherSettings(**{k: v for k, v in recipe["teacher_training"].items() if k != "augment"})
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe["seed"])
    result = train_teacher(prep.teacher, prep.train_set, settings, eval_loader=prep.eval_loader, device=device,
                           seed=recipe["seed"], log_path=out / "metrics.csv", progress=progress,
                           checkpoint_path=out / "teacher.pt")
    return {"accuracy": result["accuracy"], "epochs": settings.epochs}


def _ensemble(recipe: Recipe) -> GeneratorEnsemble:
    torch.manual_seed(recipe["seed"] + 1)  # every process builds the same initial ensemble, then keeps its shard
    return ensemble_from_recipe(recipe)


def run_recipe(recipe: Recipe, out: str | Path | None = None, *, device: str | torch.device | None = None,
               resume: bool = False, progress: bool = True) -> dict:
    """Run every stage of ``recipe`` into ``out`` (default runs/<name>); return results.json's content."""
    device = local_device(device)
    ctx = init_from_env(device)
    out = Path(out) if out is not None else Path("runs") / recipe.name
    prep = preflight(recipe, ctx.world)  # every refusal happens here, before the run directory is touched
    _distill_chunk(recipe, ctx.world)
    ctx.shard(recipe["generators"]["num_generators"])  # refuses an ensemble that does not split evenly
    failure, status = None, {}
    if ctx.is_main:  # rank 0 owns the directory; every rank learns whether it may go on
        try:
            status = open_run_dir(out, recipe, resume)
        except ValueError as e:
            failure = str(e)
    failure, status = ctx.all_gather_object((failure, status))[0]
    if failure:
        raise ValueError(failure)
    if ctx.is_main:
        write_run_header(out, recipe, environment(ctx.world, device))

    def finish(stage: str, started: float, **info) -> None:
        status[stage] = {"done": True, "seconds": status.get(stage, {}).get("seconds", 0.0)
                         + time.perf_counter() - started, **info}
        if ctx.is_main:
            write_json(out / "status.json", status)

    if not prep.teacher_trained:
        teacher_file = out / "teacher" / "teacher.pt"
        if not status.get("teacher", {}).get("done"):
            t = time.perf_counter()
            finish("teacher", t, **_train_teacher(recipe, prep, out / "teacher", device, progress))
        else:
            load_weights(prep.teacher, teacher_file, "teacher")
    teacher = prep.teacher.to(device).eval()

    g = recipe["generators"]
    if not status.get("generators", {}).get("done"):
        t = time.perf_counter()
        summary = pipeline.train_generators(
            teacher, _ensemble(recipe), out / "generators", updates_per_generator=g["updates_per_generator"],
            ctx=ctx, device=device,
            resume=resume, progress=progress, **_generator_kwargs(recipe))
        finish("generators", t, final=summary["final"], placement=summary["placement"])

    if not status.get("distill", {}).get("done"):
        t = time.perf_counter()
        summary = pipeline.distill(
            teacher, prep.student, load_ensemble(out / "generators" / "generators.pt"), out / "distill",
            steps=recipe["distill"]["steps"], ctx=ctx, device=device, eval_loader=prep.eval_loader,
            resume=resume, progress=progress, **_distill_kwargs(recipe, ctx.world))
        finish("distill", t, **{k: v for k, v in summary.items() if k.endswith("accuracy")})

    results = {
        "recipe": recipe.name, "paper": recipe["paper"],
        "teacher_accuracy": status["distill"].get("teacher_accuracy"),
        "student_accuracy": status["distill"].get("student_accuracy"),
        **{f"{stage}_seconds": status[stage]["seconds"] for stage in STAGES if stage in status},
        "processes": ctx.world,
    }
    if ctx.is_main:
        write_json(out / "results.json", results)
    ctx.barrier()
    return results
