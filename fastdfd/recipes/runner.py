"""``fastdfd run RECIPE``: teacher training (optional), generator training, distillation.

Every value comes from the recipe (see :mod:`fastdfd.recipes.schema`); the teacher's input
space (``teacher.input_space``) reaches every stage: the teacher's training data, the
generator trainer, the distiller and the evaluation data. The only things
not in it are where to write (``out``), which device, and whether to resume. All checks
that can fail run before the first stage (:func:`fastdfd.recipes.preflight.preflight`).
Stages that finished are skipped by ``--resume``; an interrupted one resumes from its
own checkpoints. Under torchrun the generator and distillation stages run sharded. With a
``[turns]`` table the generator stage is the generators' warm-up, and they go on training in
rounds with the student during the distillation stage (:func:`fastdfd.pipeline.distill`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import pipeline
from ..distributed import init_from_env, local_device
from ..models.weights import load_weights
from ..nn import GeneratorEnsemble, load_ensemble
from ..settings import (DistillSettings, ExecutionSettings, LoopSettings, LossSettings, OptimizerSettings, Settings,
                        TurnsSettings)
from .loader import Recipe
from .preflight import Prepared, ensemble_from_recipe, preflight
from .rundir import environment, open_run_dir, write_json, write_run_header

STAGES = ("teacher", "generators", "distill")


def generator_settings(recipe: Recipe, progress: bool = True) -> dict[str, Settings]:
    """The ``[generators]`` table as the trainer's settings objects (each built from its own fields), the loop
    seeded with the recipe's seed + 1."""
    g = recipe["generators"]
    loop = LoopSettings.from_mapping({**g, "seed": recipe["seed"] + 1, "progress": progress}, "generators")
    return {"loss": LossSettings.from_mapping(g, "generators"), "optim": OptimizerSettings.from_mapping(g, "generators"),
            "execution": ExecutionSettings.from_mapping(g, "generators"), "loop": loop}


def _distill_chunk(recipe: Recipe, world: int) -> int | None:
    """The recipe's chunk is global: each of ``world`` processes samples its share of it."""
    chunk = recipe["distill"]["generators_per_step"]
    if chunk is None or world == 1:
        return chunk
    if chunk % world:
        raise ValueError(f"distill.generators_per_step = {chunk} cannot be split evenly over {world} processes")
    return chunk // world


def _check_turns(recipe: Recipe, world: int) -> None:
    """Under torchrun, [turns] needs a chunk the recipe names: "auto" plans it again when the turns start, with less
    memory free (the student's), and the warm-up's checkpoint of another chunk would be refused only then."""
    if recipe.has("turns") and world > 1 and recipe["generators"]["generators_per_step"] == "auto":
        raise ValueError("[turns] under torchrun with generators.generators_per_step = \"auto\": name the chunk "
                         "(the turns continue the warm-up's trainer, which must make the same chunk)")


def distill_settings(recipe: Recipe, world: int, progress: bool = True) -> dict[str, Settings]:
    """The ``[distill]`` table as the distiller's settings (this process's share of the chunk), the loop seeded
    with the recipe's seed + 2."""
    d = {**recipe["distill"], "generators_per_step": _distill_chunk(recipe, world)}
    return {"settings": DistillSettings.from_mapping(d, "distill"),
            "loop": LoopSettings.from_mapping({**d, "seed": recipe["seed"] + 2, "progress": progress}, "distill")}


def _train_teacher(recipe: Recipe, prep: Prepared, out: Path, device: torch.device, progress: bool) -> dict:
    from ..settings import TeacherSettings
    from ..train.teacher import train_teacher

    settings = TeacherSettings.from_mapping(recipe["teacher_training"], "teacher_training")
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
    _check_turns(recipe, ctx.world)
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
    turns = TurnsSettings.from_mapping(recipe["turns"], "turns") if recipe.has("turns") else None
    generator = generator_settings(recipe, progress)  # the warm-up's, and the turns' that continue it
    if not status.get("generators", {}).get("done"):
        t = time.perf_counter()
        summary = pipeline.train_generators(
            teacher, _ensemble(recipe), out / "generators", updates_per_generator=g["updates_per_generator"],
            ctx=ctx, device=device, resume=resume, input_space=recipe["teacher"]["input_space"],
            final_checkpoint=turns is not None, **generator)
        finish("generators", t, final=summary["final"], placement=summary["placement"])

    if not status.get("distill", {}).get("done"):
        t = time.perf_counter()
        in_turns = {} if turns is None else {"turns": turns, "generators": out / "generators",
                                             "generator_settings": generator}
        summary = pipeline.distill(
            teacher, prep.student, load_ensemble(out / "generators" / "generators.pt"), out / "distill",
            steps=recipe["distill"]["steps"], ctx=ctx, device=device, eval_loader=prep.eval_loader,
            resume=resume, input_space=recipe["teacher"]["input_space"],
            **distill_settings(recipe, ctx.world, progress), **in_turns)
        finish("distill", t, **{k: v for k, v in summary.items() if k.endswith("accuracy") or k == "generator_steps"})

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
