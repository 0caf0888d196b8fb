"""The distillation stage at ImageNet scale: a small student from a 1000-class generator ensemble.

    python -m benchmarks.imagenet_distill --ensemble runs/in1k/k1000/ensemble.pt --minutes 10 --out OUT \\
        [--teacher efficientnet-lite0] [--student cifar_resnet20] [--seed 0]

No ImageNet images are here, so the student is scored two ways (``OUT/distill.json``):

- its top-1 agreement with the teacher on fresh images from held-out latents (a private RNG the training
  never drew from), and its top-1 against the classes those images were generated for;
- its top-1 on the 20 real ImageNet validation images the ``foolbox`` wheel ships (``foolbox/data/``, label in
  the file name), beside the teacher's on the same images at the ensemble's size and at 224 px. Twenty images
  are a sanity check, not a measurement: one image is five points.

The student is :class:`fastdfd.train.Distiller`'s (KL at temperature 4, SGD, cosine schedule over the steps the
budget allows, measured on a probe of a copy of the student before the run).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.efficientnet_lite import INPUT_SPACE, NAMES, load_efficientnet_lite
from benchmarks.machine import machine
from fastdfd.input_space import InputSpace
from fastdfd.models import create_model
from fastdfd.nn import GeneratorEnsemble
from fastdfd.nn.ensemble import ensemble_forward, load_ensemble
from fastdfd.settings import DistillSettings, LoopSettings
from fastdfd.train import Distiller
from fastdfd.train.modes import in_mode

# the fresh images' RNG: no stream of a run is seeded with it (training takes the run's seed, per-rank streams
# seed + 1_000_003 * rank, the curve and the quality report seed + 1 and seed + 2)
HELD_OUT_SEED = 2**31 - 1


def foolbox_images(size: int = 224) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The 20 ImageNet validation images of the ``foolbox`` wheel as evaluated in the field (shorter side resized
    to ``size / 0.875``, bilinear with antialiasing, then the central ``size`` square): pixels [20, 3, size, size]
    in [0, 1] (float32) and labels [20]; None without foolbox (or Pillow)."""
    try:
        import foolbox
        import numpy as np
        from PIL import Image
    except ImportError:
        return None
    files = sorted((Path(foolbox.__file__).parent / "data").glob("imagenet_*_*.jpg"))
    if not files:
        return None
    resize = round(size / 0.875)
    pixels = []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        scale = resize / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
        pixels.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    labels = torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])
    return torch.stack(pixels), labels


@torch.no_grad()
def agreement(teacher, student, ensemble: GeneratorEnsemble, per_class: int, seed: int = HELD_OUT_SEED,
              batch: int = 256) -> dict:
    """Top-1 agreement of student and teacher on fresh images from held-out latents, and the student's and the
    teacher's top-1 against the generated-for class."""
    space = InputSpace.parse(INPUT_SPACE)
    rng = torch.Generator().manual_seed(seed)
    k, per = ensemble.num_generators, ensemble.classes_per_generator
    n = per_class * per
    chunk = max(1, batch // n)
    device = ensemble.fc_z.device
    agree = s_ok = t_ok = total = 0
    with in_mode(teacher, False), in_mode(student, False):
        for lo in range(0, k, chunk):
            rows = torch.arange(lo, min(k, lo + chunk), device=device)
            local = torch.arange(per, device=device).repeat_interleave(per_class).expand(len(rows), n)
            y = ensemble.class_ids.index_select(0, rows).gather(1, local).reshape(-1)
            z = torch.randn(len(rows), n, ensemble.spec.latent_dim, generator=rng).to(device)  # CPU stream: any device
            x = space.from_generator(ensemble_forward(ensemble.stacked(rows), ensemble.spec, z, local).flatten(0, 1))
            t, s = teacher(x).argmax(1), student(x).argmax(1)
            agree += int((t == s).sum())
            s_ok += int((s == y).sum())
            t_ok += int((t == y).sum())
            total += len(y)
    return {"images": total, "student_teacher_agreement": agree / total, "student_top1_generated_class": s_ok / total,
            "teacher_top1_generated_class": t_ok / total, "seed": seed}


@torch.no_grad()
def real_sanity(teacher, student, size: int) -> dict | None:
    """Top-1 of teacher and student on the foolbox wheel's 20 ImageNet validation images."""
    small, full = foolbox_images(size), foolbox_images()
    if small is None:
        return None
    space = InputSpace.parse(INPUT_SPACE)
    device = next(teacher.parameters()).device
    (x, y), (x224, _) = small, full
    x, y, x224 = x.to(device), y.to(device), x224.to(device)
    with in_mode(teacher, False), in_mode(student, False):
        t = teacher(space.normalize(x)).argmax(1)
        s = student(space.normalize(x)).argmax(1)
        t224 = teacher(space.normalize(x224)).argmax(1)
    return {"images": len(y), "image_size": size, "teacher_top1": float((t == y).float().mean()),
            "student_top1": float((s == y).float().mean()), "teacher_top1_224px": float((t224 == y).float().mean()),
            "student_teacher_agreement": float((t == s).float().mean()),
            "note": "20 images: a sanity check only (one image is 5 points)"}


def distill(teacher, ensemble: GeneratorEnsemble, args, out: Path, verbose: bool = True) -> dict:
    """Distill ``args.student`` from ``ensemble`` for ``args.distill_minutes``; write and return the record."""
    torch.manual_seed(args.seed)
    student = create_model(args.student, num_classes=1000).to(ensemble.fc_z.device)
    settings = DistillSettings(batch_size=args.distill_batch, generators_per_step=min(args.distill_generators,
                                                                                       ensemble.num_generators))
    loop = LoopSettings(seed=args.seed, progress=False, log_every=10)

    # the step's cost, on a copy: the cosine schedule needs the run's step count before it starts
    probe = Distiller(teacher, copy.deepcopy(student), ensemble, settings=settings, loop=loop, total_steps=10,
                      input_space=INPUT_SPACE)
    probe.fit(1)
    t0 = time.perf_counter()
    probe.fit(3)
    step_s = (time.perf_counter() - t0) / 3
    del probe
    budget = args.distill_minutes * 60.0
    total = max(1, int(budget / step_s))
    distiller = Distiller(teacher, student, ensemble, settings=settings, loop=loop, total_steps=total,
                          input_space=INPUT_SPACE)
    start = time.perf_counter()
    while distiller.step < total and time.perf_counter() - start < budget:
        rows = distiller.fit(min(20, total - distiller.step))
        if verbose and rows:
            print(f"[distill {time.perf_counter() - start:6.0f} s] step {distiller.step}/{total}: "
                  f"kd {rows[-1]['kd']:.4g}, agreement {rows[-1]['agreement']:.3f}", flush=True)
    seconds = time.perf_counter() - start
    record = {
        "student": f"{args.student} (1000 classes, from scratch)", "settings": settings.as_dict(),
        "steps": distiller.step, "planned_steps": total, "probe_step_seconds": round(step_s, 3),
        "seconds": round(seconds, 1),
        "images_seen": distiller.step * settings.batch_size * distiller.schedule.chunk,
        "held_out": agreement(teacher, student, ensemble, per_class=args.distill_eval_per_class),
        "foolbox_real_images": real_sanity(teacher, student, ensemble.spec.image_size),
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(student.state_dict(), out / "student.pt")
    (out / "distill.json").write_text(json.dumps(record, indent=1))
    if verbose:
        h, r = record["held_out"], record["foolbox_real_images"]
        print(f"student {args.student}: {record['steps']} steps in {seconds:.0f} s; agreement with the teacher on "
              f"held-out latents {h['student_teacher_agreement']:.4f}"
              + (f"; foolbox 20 images: student {r['student_top1']:.2f}, teacher {r['teacher_top1']:.2f} "
                 f"({r['image_size']} px), {r['teacher_top1_224px']:.2f} (224 px)" if r else ""), flush=True)
    return record


def add_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", default="cifar_resnet20", help="a registry or zoo name; 1000 outputs")
    p.add_argument("--distill-batch", type=int, default=4, help="images per generator per student step")
    p.add_argument("--distill-generators", type=int, default=64, help="generators per student step")
    p.add_argument("--distill-eval-per-class", type=int, default=4, help="held-out images per class")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", type=Path, required=True, help="a save_ensemble file (or a trainer checkpoint)")
    p.add_argument("--teacher", default="efficientnet-lite0", choices=NAMES)
    p.add_argument("--minutes", dest="distill_minutes", type=float, default=10.0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_distill_flags(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = distill(load_efficientnet_lite(args.teacher).to(args.device),
                     load_ensemble(args.ensemble, map_location=args.device), args, args.out)
    record.update({"ensemble": str(args.ensemble), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "machine": machine()})
    (args.out / "distill.json").write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
