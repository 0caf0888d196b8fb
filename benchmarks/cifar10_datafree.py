"""CIFAR-10 end to end: a student distilled from a pretrained CIFAR ResNet with no training data, scored on
the real test images, within a wall-time budget.

    python -m benchmarks.cifar10_datafree --data ../shared/data/cifar10 --teacher resnet56 --student resnet20 \\
        --minutes 60 --out runs/c10 [--seed N] [--preset default|paper]

``--data`` holds ``test.tar`` (the CIFAR-10 test set as JPEG, :class:`fastdfd.data.CIFAR10JPEG`) and the
pretrained ``resnet{20,32,44,56}.th`` (option-A CIFAR ResNets, trained on ImageNet mean/std inputs). Only
the teacher's weights reach training: its BN running statistics and its predictions. The tune half
(files 0000-0499 of each class) scores the time-to-accuracy curve; the held-out half (0500-0999) the final
figures, once.

The schedule (every setting is a field of :class:`Settings` and a flag; the student's are one
:class:`fastdfd.settings.DistillSettings` held whole, ``DISTILL`` by default, each of its fields a flag but
``generators_per_step`` (pinned) and ``student_bn``; the generators' are the preset's with ``KEPT``'s
overrides and then ``--generator``'s laid over them; the defaults are what the studies in docs/cifar10.md kept):

1. warm-up: ``warmup_fraction`` of the budget (at least 5 steps unless it is 0) trains the class generators
   alone (``generators_per_class`` of them for each of the 10 classes; the preset's loss, with per-generator BN
   statistics by default: each generator's batch must carry the whole data's spread);
2. then rounds until the budget ends, at least one (``turns``, one :class:`fastdfd.settings.TurnsSettings` held
   whole, as a recipe's ``[turns]`` table: flags ``--gen-steps``, ``--student-steps``, ``--pool``):
   ``generator_steps`` generator steps (with the adversarial and mode-seeking terms when their weights are set:
   ``--generator adversarial_weight=...,diversity_weight=...``), then ``student_steps`` distillation steps.
   With ``pool`` > 0 the student learns from a pool of the generator
   steps' own images and the teacher's logits on them (:class:`fastdfd.train.pool.ImagePool`: no teacher
   pass of its own); with ``pool = 0`` from fresh images of the ensemble as it is. Either way the images get
   a random crop and flip (``distill.augment``), with ``distill.mix`` they are mixed in pairs and the teacher
   labels the mixes, and the student's rate follows a cosine in *time* over the budget (from ``--lr``; not
   over steps, whatever ``--lr``'s help says: the step count is not known in advance).

The budget clock counts everything but the curve's evaluations and the final scoring (their seconds are
reported apart). Writes ``OUT/result.json``, ``OUT/student.pt`` (a state_dict of
``create_model("cifar_<student>", num_classes=10)``, inputs in ImageNet mean/std), ``OUT/curve.png``, and
the generators' quality report in ``OUT/quality/`` (teacher top-1 on fresh images, per-class diversity beside
real tune images, sample grid).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from benchmarks.clock import BudgetClock
from benchmarks.machine import machine
from fastdfd.data import CIFAR10_CLASSES, CIFAR10JPEG, make_eval_loader
from fastdfd.models import create_model
from fastdfd.models.weights import load_weights
from fastdfd.nn import GeneratorEnsemble
from fastdfd.ops import extensions
from fastdfd.train import Distiller, GeneratorTrainer
from fastdfd.train.bf16 import cpu_computes_bf16
from fastdfd.train.evaluate import evaluate_accuracy
from fastdfd.train.pool import ImagePool
from fastdfd.train.quality import generator_quality, write_quality
from fastdfd.settings import DistillSettings, GeneratorSettings, LoopSettings, TurnsSettings, preset
from fastdfd.settings.cli import add_flags, flags_to_settings

INPUT_SPACE = "imagenet"  # what the field's pretrained CIFAR ResNets were trained on
MILESTONES = (0.5, 0.75, 0.9)  # fractions of the teacher's top-1 whose minutes are reported


# the student's settings the studies in docs/cifar10.md kept. Each field is a flag (--temperature, --mix, ...;
# the batch is --distill-batch) but generators_per_step, pinned here, and student_bn: the pool's draws are not
# grouped by generator, so per-generator statistics would mean nothing. A step takes 10 generators' worth of
# images (10 x 13 = 130) however many generators share a class, so its cost is the same whatever
# generators_per_class.
DISTILL = DistillSettings(
    batch_size=13,
    generators_per_step=10,
    lr=0.05,  # peak; a cosine in *time* over the budget (run), not over steps
    weight_decay=5e-4,
    temperature=20.0,  # CMI's and FastDFKD's; over 3 seeds at 20 minutes +2.31 points against 4
    augment="crop_flip",
    mix="cutmix",  # over 3 seeds at 20 minutes +8.37 points against none
    channels_last=True,  # the student's step 1.09x faster on the 2-core CPU (benchmarks.distill_step); the
    #                      teacher's labels come from its BN-folded copy by the library's default (1.07x more)
    # the teacher's labels in bf16 where the CPU computes in bf16: there the step is 1.24x faster (AVX-512) and over
    # 3 seeds at 20 minutes +2.35 points (more student steps in the same minutes); on a CPU without bf16
    # instructions (AVX2) the step is 4.6x *slower* (fastdfd.train.bf16), so there the labels stay fp32.
    # --label-autocast / --no-label-autocast choose either way; result.json's settings say which ran
    autocast=cpu_computes_bf16(),
)
# beside --gen-batch; autocast is the teacher's labelling forward only (the generators' step stays fp32 here);
# the rest keep DistillSettings' names
DISTILL_FLAG_NAMES = {"batch_size": "--distill-batch", "autocast": "--label-autocast"}
DISTILL_NOT_FLAGS = ("generators_per_step", "student_bn")
TURNS_FLAG_NAMES = {"generator_steps": "--gen-steps"}  # beside --gen-batch, as the studies' commands name it
# the generators' overrides of each preset that the studies kept, laid over it before --generator's (so
# "--generator jitter=2" keeps them): over the library's default preset, per-generator BN statistics (no class
# collapses), 16 images per generator a step, a weight of 30 on the teacher's first BN layer (docs/cifar10.md:
# DeepInversion's 10 against 1, the eleventh knob, +5.15 points over 3 seeds at 20 minutes; then 30 against 10,
# the fifteenth, +2.23 against 10, every seed up) and DeepInversion's L2 image prior at weight 1 (the twelfth knob:
# +2.51 points over 3 seeds at 20 minutes, every seed up); the paper's preset runs as the paper has it (64 images)
KEPT = {"default": "scope=generator,batch_size=16,first_layer_multiplier=30,l2_weight=1", "paper": ""}


@dataclass(frozen=True)
class Settings:
    """One run of the benchmark; the generator loss and optimizer come from ``preset`` (fastdfd.settings)."""

    data: str = "../shared/data/cifar10"
    teacher: str = "resnet56"
    student: str = "resnet20"
    minutes: float = 60.0
    seed: int = 0
    preset: str = "default"
    generator: str = ""  # overrides of the preset's fields over KEPT's, "ce_weight=1.0" (one knob at a time;
    #                      the adversarial and mode-seeking weights too; the batch is --gen-batch)
    # generators
    generators_per_class: int = 1  # > 1: several generators share each class (more modes of it); generator k
    #                                serves class k % 10
    gen_batch: int = 0  # images per generator per generator step; 0: the preset's with KEPT's (default 16, paper 64)
    warmup_fraction: float = 0.1  # of the budget, generators alone before the student starts
    # the rounds after it: a pool of 5,000, 1 generator step to 8 student steps (TurnsSettings' defaults, which are
    # these studies'; 8 against 4 steps: +3.13 points over 3 seeds at 20 minutes, docs/cifar10.md)
    turns: TurnsSettings = TurnsSettings()
    # student
    distill: DistillSettings = DISTILL  # the student's loss, optimiser and batches, whole (its fields are flags)
    # measurement
    curve_points: int = 12  # evaluations of the student on the tune half over the budget
    quality_per_class: int = 64
    threads: int = 0  # 0: torch's default


def _teacher(s: Settings) -> torch.nn.Module:
    model = create_model(f"cifar_{s.teacher}", num_classes=10)
    return load_weights(model, Path(s.data) / f"{s.teacher}.th", "teacher").eval()


def _loader(s: Settings, split: str):
    return make_eval_loader(f"cifar10-jpeg-{split}:{s.data}", input_space=INPUT_SPACE, batch_size=500)[0]


# the kinds of field whose value is a comma-separated list on the command line (fastdfd.settings.field)
LIST_KINDS = ("ints", "floats", "layer_weights")


def overrides(spec: str) -> dict:
    """``"key=value,..."`` -> generator settings fields (:class:`fastdfd.settings.GeneratorSettings`), each value
    parsed and checked by its field's spec. A list-valued field keeps its commas: a part that does not start a
    field's ``key=`` continues the list before it (``"widths=64,32,lr=0.01"``,
    ``"layer_weights=conv1.bn=10,layer1.0.bn1=2"``). ValueError names a key that is not a field, a part that is
    not ``key=value`` where no list is open, and a key given twice."""
    classes = GeneratorSettings.CLASSES
    owners = {name: cls for cls in classes for name in cls.field_names()}
    items: list[list[str]] = []  # [key, value text] in the order given
    for part in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = (t.strip() for t in part.partition("="))
        if sep and key in owners:
            if any(k == key for k, _ in items):
                raise ValueError(f"--generator {spec!r}: {key!r} is given twice")
            items.append([key, value])
        elif items and owners[items[-1][0]].spec(items[-1][0]).kind in LIST_KINDS:
            items[-1][1] += "," + part
        elif sep:
            known = ", ".join(owners)
            raise ValueError(f"--generator {part!r}: {key!r} is not a generator setting ({known})")
        else:
            raise ValueError(f"--generator {spec!r}: {part!r} is not key=value")
    out = {}
    for key, value in items:
        spec_ = owners[key].spec(key)
        out[key] = spec_.check(spec_.parse(value), f"--generator {key}")
    return out


def generator_settings(s: Settings) -> GeneratorSettings:
    """The preset's settings with KEPT's overrides for it, then ``s.generator``'s, then ``--gen-batch`` where it is
    given; ValueError names a bad key or value (a check across fields too, from the settings' own checks)."""
    given = overrides(s.generator)
    if "batch_size" in given:
        raise ValueError("--generator batch_size: the generators' batch is --gen-batch")
    g = preset(s.preset).replace(**{**overrides(KEPT[s.preset]), **given})
    return g.replace(batch_size=s.gen_batch) if s.gen_batch else g


def run(s: Settings, out: Path, verbose: bool = True) -> dict:
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    out.mkdir(parents=True, exist_ok=True)
    # the C++ extension is built (or found in its cache) before the clock: a first build takes a minute or
    # more of the budget, and whether it happens depends on the cache, not on the method
    extensions.load("cpu")
    started = time.perf_counter()
    budget = s.minutes * 60.0
    clock = BudgetClock()
    teacher = _teacher(s)
    student = create_model(f"cifar_{s.student}", num_classes=10)
    g = generator_settings(s)
    a = g.architecture
    # generator k serves class k % 10. A distillation step takes 10 generators' worth of images (130 at
    # DISTILL.batch_size 13) however many share a class, so the student's step costs the same; from the pool the
    # draw is uniform over what every generator pushed, fresh it is 10 generators visited evenly
    k = 10 * s.generators_per_class
    ensemble = GeneratorEnsemble(k, 10, image_size=32, channels=3, latent_dim=a.latent_dim, widths=a.widths,
                                 output_bn=a.output_bn, classes=[[g % 10] for g in range(k)])
    pool = ImagePool(s.turns.pool) if s.turns.pool else None
    loop = LoopSettings(seed=s.seed, progress=False, log_every=5)
    trainer = GeneratorTrainer(teacher, ensemble, loss=g.loss, optim=g.optimizer, loop=loop, student=student,
                               pool=pool, input_space=INPUT_SPACE)
    distiller = Distiller(teacher, student, ensemble, settings=s.distill, loop=loop, pool=pool,
                          input_space=INPUT_SPACE)
    tune = _loader(s, "tune")
    curve, measure_s = [], 0.0
    next_eval = budget / s.curve_points

    def evaluate_point() -> None:
        nonlocal measure_s, next_eval
        clock.pause()
        t0 = time.perf_counter()
        top1 = evaluate_accuracy(student, tune, "cpu")
        measure_s += time.perf_counter() - t0
        curve.append({"seconds": round(clock.seconds(), 1), "student_top1_tune": top1,
                      "generator_steps": trainer.step, "distill_steps": distiller.step})
        if verbose:
            print(f"[{clock.seconds():7.1f} s] student tune top-1 {top1:.4f} (gen {trainer.step}, "
                  f"distill {distiller.step})", flush=True)
        next_eval += budget / s.curve_points
        clock.resume()

    # 1. generators alone (the student is untrained: no adversarial term yet). Each phase takes steps at least
    # once (the warm-up one fit of 5 unless warmup_fraction is 0, then one round; the budget checked after, not
    # before), so that a budget shorter than the setup (the teacher, the tars) still trains something; the
    # student's rate is by then at the cosine's end, 0 after its first step. At 20 or 60 minutes nothing changes
    trainer.loss = g.loss.replace(adversarial_weight=0.0, adversarial_mask=False)
    if s.warmup_fraction > 0:
        trainer.fit(5)
    while clock.seconds() < s.warmup_fraction * budget:
        trainer.fit(5)
    # 2. rounds: generators against the student, then the student on the generators' images
    trainer.loss = g.loss
    start_distill = clock.seconds()
    while True:
        if s.turns.generator_steps:
            trainer.fit(s.turns.generator_steps)
        # cosine in time over what the budget leaves the student (the step count is not known in advance)
        frac = min(1.0, (clock.seconds() - start_distill) / max(1e-9, budget - start_distill))
        distiller.scheduler.base_lrs = [s.distill.lr * 0.5 * (1 + math.cos(math.pi * frac))]
        distiller.fit(s.turns.student_steps)
        if clock.seconds() >= next_eval:
            evaluate_point()
        if clock.seconds() >= budget:
            break
    if not curve or curve[-1]["distill_steps"] != distiller.step:
        evaluate_point()
    clock.pause()

    # final figures: the held-out half, once
    t0 = time.perf_counter()
    held = _loader(s, "heldout")
    teacher_top1, student_top1 = evaluate_accuracy(teacher, held, "cpu"), evaluate_accuracy(student, held, "cpu")
    teacher_tune = evaluate_accuracy(teacher, tune, "cpu")
    real = CIFAR10JPEG(s.data, split="tune", normalize=False)
    labels = torch.from_numpy(real.labels)
    keep = torch.cat([torch.nonzero(labels == c)[: s.quality_per_class, 0] for c in range(10)])
    report = generator_quality(teacher, ensemble, n_per_class=s.quality_per_class, input_space=INPUT_SPACE,
                               seed=s.seed, class_names=list(CIFAR10_CLASSES),
                               reference=(real.pixels()[keep], labels[keep]))
    write_quality(report, out / "quality", {"generator_steps": trainer.step})
    torch.save(student.state_dict(), out / "student.pt")
    final_s = time.perf_counter() - t0
    minutes_to = {}
    for m in MILESTONES:
        hit = next((p["seconds"] for p in curve if p["student_top1_tune"] >= m * teacher_tune), None)
        minutes_to[f"{int(m * 100)}%"] = None if hit is None else round(hit / 60, 2)
    result = {
        "teacher_top1_heldout": teacher_top1, "student_top1_heldout": student_top1,
        "ratio": student_top1 / teacher_top1, "teacher_top1_tune": teacher_tune,
        "student_top1_tune_final": curve[-1]["student_top1_tune"],
        "seconds": round(clock.seconds(), 1), "seconds_measuring": round(measure_s + final_s, 1),
        "seconds_wall": round(time.perf_counter() - started, 1),
        "generator_steps": trainer.step, "distill_steps": distiller.step,
        "pool_images_pushed": None if pool is None else pool.pushed,
        "minutes_to_fraction_of_teacher_tune": minutes_to,
        "curve": curve,
        "generated_teacher_top1": report.teacher_top1,
        "generated_effective_images_mean": report.to_dict()["diversity"]["effective_images_mean"],
        "real_effective_images_mean": report.to_dict()["diversity"]["reference"]["effective_images_mean"],
        "collapsed_classes": report.collapsed_classes,
        "settings": asdict(s), "generator_settings": asdict(g), "seed": s.seed,
        "machine": machine(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    plot_curve(result, out / "curve.png")
    if verbose:
        print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "settings", "generator_settings")},
                         indent=1), flush=True)
    return result


def plot_curve(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping curve.png")
        return
    c = result["curve"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot([p["seconds"] / 60 for p in c], [100 * p["student_top1_tune"] for p in c], marker="o", ms=3,
            label="student (data-free)")
    ax.axhline(100 * result["teacher_top1_tune"], ls="--", c="grey", lw=0.8, label="teacher")
    ax.axhline(90 * result["teacher_top1_tune"], ls=":", c="grey", lw=0.8, label="0.9 x teacher")
    ax.set_xlabel("minutes of training (2-core CPU)")
    ax.set_ylabel("top-1 on the tune half (%)")
    s = result["settings"]
    ax.set_title(f"{s['teacher']} -> {s['student']}, seed {s['seed']}, preset {s['preset']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    held_whole = ("distill", "turns")  # settings objects: their fields are the flags
    for f in fields(Settings):
        if f.name in held_whole:
            continue
        default = getattr(Settings, f.name)
        p.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default,
                       **({"choices": ("default", "paper")} if f.name == "preset" else {}))
    # the student's and the rounds': one flag per field, parsed and checked by the field's own spec (a bad value
    # is refused here, before any work); DISTILL_NOT_FLAGS are pinned (see DISTILL)
    add_flags(p, DistillSettings, base={DistillSettings: DISTILL}, skip=DISTILL_NOT_FLAGS, names=DISTILL_FLAG_NAMES)
    add_flags(p, TurnsSettings, names=TURNS_FLAG_NAMES)
    a = p.parse_args(argv)
    out = a.out
    try:  # a check across fields (DistillSettings._check, TurnsSettings._check)
        distill = flags_to_settings(a, DistillSettings, base=DISTILL)
        turns = flags_to_settings(a, TurnsSettings)
    except ValueError as e:
        p.error(str(e))
    s = Settings(**{f.name: getattr(a, f.name) for f in fields(Settings) if f.name not in held_whole},
                 distill=distill, turns=turns)
    if not (Path(s.data) / "test.tar").is_file():
        p.error(f"--data {s.data} holds no test.tar (the CIFAR-10 JPEG test set)")
    if s.minutes <= 0 or not 0 <= s.warmup_fraction < 1 or min(s.curve_points, s.generators_per_class) < 1 \
            or s.gen_batch < 0:
        p.error("--minutes must be positive, --warmup-fraction in [0, 1), --curve-points and "
                "--generators-per-class >= 1, --gen-batch >= 0 (0: the preset's)")
    try:  # the generators' settings, before any work
        generator_settings(s)
    except ValueError as e:
        p.error(str(e))
    return s, out


def main(argv=None) -> dict:
    s, out = parse(argv)
    return run(s, out)


if __name__ == "__main__":
    main()
