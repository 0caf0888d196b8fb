"""The student's budget spent on real images: how much of the CIFAR-10 benchmark's gap is the generated images.

    python -m benchmarks.cifar10_real_pool --data ../shared/data/cifar10 --steps 1350 --out runs/real-pool [--seed N]
        [--per-class K]

A diagnostic, not a data-free method: the benchmark's student (``benchmarks.cifar10_datafree``'s ``DISTILL``:
the same loss, rate, crop and flip, CutMix labelled by the teacher, 130 images a step) learns from a pool of the
5,000 real images of the **tune** half, labelled by the teacher (their true labels are never read), for the number
of student steps a data-free run makes (on the 2-core CPU a 20-minute run of the benchmark's defaults made
1,300-1,400 and a 60-minute one 3,300-3,900 on the AVX2 machine of 2026-12-06; 1,584-2,264 and 5,376-7,472 on
the AVX-512 one of 2026-12-07). ``DISTILL`` is taken whole, so since the thirteenth knob of docs/cifar10.md the
teacher labels in bf16 here too; the records of 2026-12-06 labelled in fp32. Its rate decays by a cosine over
those steps, as the data-free run's decays over its time. The held-out half scores it, as it scores the
data-free student. The images are test images, of the distribution the
student is scored on: an optimistic bound on what any generated pool of 5,000 could teach in as many steps.

``--per-class K`` keeps K of the 500 tune images of each class (drawn by ``--seed``; the true labels choose the
subset only, the teacher still labels it): a pool of 10 x K real images, to ask whether the generated pool lacks
realism or variety. Where a few real images per class teach nearly as well as 500, variety is not what the
generated images lack.

Where this run's student ends far above the data-free one at the same step count, the generated images are what
holds the data-free student back; where it ends near it, the student's steps are (a faster step or a longer
budget would pay, better images would not). Writes ``OUT/result.json`` (held-out and tune top-1, steps, seconds,
the pool's size and ``per_class``, the student's settings, machine). The tune top-1 covers the whole tune half,
also with ``--per-class``, where the student learned from only part of it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.cifar10_datafree import DISTILL, INPUT_SPACE, Settings, _loader, _teacher
from benchmarks.machine import machine
from fastdfd.data import CIFAR10JPEG
from fastdfd.input_space import InputSpace
from fastdfd.models import create_model
from fastdfd.nn import GeneratorEnsemble
from fastdfd.ops import extensions
from fastdfd.settings import LoopSettings
from fastdfd.train import Distiller
from fastdfd.train.evaluate import evaluate_accuracy
from fastdfd.train.modes import in_mode
from fastdfd.train.pool import ImagePool


def real_pool(s: Settings, teacher: torch.nn.Module, per_class: int = 0) -> ImagePool:
    """The tune half of ``s.data``'s ``test.tar`` as an :class:`ImagePool`: its images float32 [N, 3, 32, 32]
    (N = 5000 on the real tar), normalised as the teacher expects (``INPUT_SPACE``), beside the teacher's logits
    on them, float32 [N, 10] (``teacher`` run in eval mode, its mode restored after). The distiller's pool step
    uses the stored logits only without ``mix``; with ``DISTILL``'s CutMix the teacher labels each step's mixes.

    ``per_class`` > 0 keeps that many images of each class, drawn without replacement by a generator seeded with
    ``s.seed`` (in the tar's class-major order; the true labels pick the subset and are not stored).
    ValueError where ``per_class`` is negative or more than a class holds; FileNotFoundError / ValueError as
    :class:`fastdfd.data.CIFAR10JPEG` (no tar, a tar of another layout)."""
    data = CIFAR10JPEG(s.data, split="tune", normalize=False)
    pixels = data.pixels()
    if per_class:
        pixels = pixels[_per_class_subset(torch.as_tensor(data.labels), per_class, s.seed)]
    x = InputSpace.parse(INPUT_SPACE).normalize(pixels)
    with torch.no_grad(), in_mode(teacher, False):  # its running statistics, as the distiller labels
        logits = torch.cat([teacher(b) for b in x.split(500)])
    pool = ImagePool(len(x))
    pool.push(x, logits)
    return pool


def _per_class_subset(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices (int64 [C * k], sorted, so the tar's class-major order stays) of ``k`` items of each of the C classes
    present in ``labels`` (int64 [N]), drawn without replacement by a generator seeded with ``seed`` (the global
    RNG is not touched). ``k = 0`` gives no index. ValueError where ``k`` < 0 or a class holds fewer than ``k``."""
    if k < 0:
        raise ValueError(f"per_class must be >= 0, got {k}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        if k > len(members):
            raise ValueError(f"per_class={k}, but class {int(c)} holds {len(members)} tune images")
        keep.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(keep).sort().values


def run(s: Settings, steps: int, out: Path, per_class: int = 0) -> dict:
    """``steps`` student steps on the real pool (``per_class`` > 0: that many tune images a class, as
    :func:`real_pool`), then the held-out scoring; writes and returns the result."""
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    out.mkdir(parents=True, exist_ok=True)
    extensions.load("cpu")
    teacher = _teacher(s)
    student = create_model(f"cifar_{s.student}", num_classes=10)
    pool = real_pool(s, teacher, per_class)
    # the distiller takes its images' shape and the teacher's classes from an ensemble, none of which is sampled
    # here; 10 generators because a step draws DISTILL.batch_size x generators_per_step (13 x 10 = 130) images,
    # as the data-free run's step does
    ensemble = GeneratorEnsemble(10, 10, image_size=32, channels=3)
    distiller = Distiller(teacher, student, ensemble, settings=s.distill, total_steps=steps, pool=pool,
                          loop=LoopSettings(seed=s.seed, progress=False, log_every=50), input_space=INPUT_SPACE)
    t0 = time.perf_counter()
    distiller.fit(steps)
    seconds = time.perf_counter() - t0
    held, tune = _loader(s, "heldout"), _loader(s, "tune")
    result = {
        "student_top1_heldout": evaluate_accuracy(student, held, "cpu"),
        "student_top1_tune_trained_on": evaluate_accuracy(student, tune, "cpu"),
        "teacher_top1_heldout": evaluate_accuracy(teacher, held, "cpu"),
        "distill_steps": distiller.step, "seconds": round(seconds, 1), "pool_images": len(pool),
        "per_class": per_class or None,
        "teacher": s.teacher, "student": s.student, "distill": asdict(s.distill), "seed": s.seed,
        "machine": machine(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "distill"}, indent=1), flush=True)
    return result


def main(argv=None) -> dict:
    """The command line (module docstring); a non-positive ``--steps`` is refused before any work."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=Settings.data)
    p.add_argument("--teacher", default=Settings.teacher)
    p.add_argument("--student", default=Settings.student)
    p.add_argument("--steps", type=int, default=1350, help="student steps (a 20-minute data-free run's count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=0,
                   help="keep this many tune images of each class (0: all 500)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps must be positive, got {a.steps}")
    if a.per_class < 0:
        p.error(f"--per-class must be >= 0, got {a.per_class}")
    s = Settings(data=a.data, teacher=a.teacher, student=a.student, seed=a.seed, threads=a.threads, distill=DISTILL)
    return run(s, a.steps, a.out, a.per_class)


if __name__ == "__main__":
    main()
