"""The GPU suite's ImageNet section (step 5): images/s of generator training per GPU, and the
GPU-hours that implies for an ImageNet synthesis run.

Teacher: torchvision's ResNet-50 architecture at 224 px, random weights, BN running
statistics set to plausible values (a trained teacher's stand-in: speed does not depend on
the values). 1000 one-class generators; a step trains ``chunk`` of them x ``batch`` images.

- ``hooks+loop``: what public code does: DeepInversion's forward hooks for the moment loss,
  and a Python loop over standalone generator modules (NCHW teacher, bf16 autocast);
- ``fastdfd``: MomentMatcher taps + the batched generator kernels, channels_last teacher,
  bf16 autocast (the backends the device defaults to).

Both compute the same loss (l2 moments over the step's images + cross-entropy) and the
gradients of every generator parameter of the chunk; the optimizer step is excluded (the
same Adam for both). The projection divides an assumed synthesis budget (printed with the
result; the paper does not state its schedule) by the measured rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.providers import HookLoss, randomize_bn
from fastdfd import GeneratorEnsemble, MomentMatcher
from fastdfd.models import create_model
from fastdfd.ops.generator import ensemble_forward

# 224 px from 7 x 7 with five x2 upsamplings (the paper's generator shape, deeper for ImageNet)
WIDTHS = (128, 128, 64, 64, 32)
ASSUMED_STEPS_PER_GENERATOR = 2000
ASSUMED_IMAGES_PER_STEP = 64
PUBLISHED_GPU_HOURS = {"Luo et al. 2020": 300.0, "DeepInversion": 166.0}


def _step_fn(provider: str, teacher, ensemble: GeneratorEnsemble, chunk: int, batch: int):
    dev = ensemble.fc_z.device
    rows = torch.arange(chunk, device=dev)
    z, y, local = ensemble.draw(batch, rows, torch.Generator(device=dev).manual_seed(0))
    if provider == "hooks+loop":
        gens = [g.requires_grad_(True) for g in ensemble.shard(0, chunk).unbind()]
        params = [p for g in gens for p in g.parameters()]
        hooks = HookLoss(teacher)

        def images():
            return torch.cat([g(z[i], y[i]) for i, g in enumerate(gens)])

        def loss():
            logits = teacher(images())
            return hooks.pop() + F.cross_entropy(logits.float(), y.reshape(-1))

        cleanup = hooks.remove
    else:
        stacked = ensemble.shard(0, chunk).stacked()
        params = list(stacked.values())
        teacher = teacher.to(memory_format=torch.channels_last)
        matcher = MomentMatcher(teacher, kind="l2")

        def loss():
            x = ensemble_forward(stacked, ensemble.spec, z, local)
            x = x.reshape(-1, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
            logits = teacher(x)
            return matcher.loss() + F.cross_entropy(logits.float(), y.reshape(-1))

        cleanup = matcher.remove

    def step():
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            value = loss()
        return torch.autograd.grad(value, params)

    return step, cleanup


def time_imagenet(device, report, bench, tiny: bool = False, reps: int = 5):
    size, classes, chunk, batch = (32, 10, 2, 2) if tiny else (224, 1000, 16, 8)
    widths = (16, 8) if tiny else WIDTHS
    torch.manual_seed(0)
    teacher = randomize_bn(create_model("resnet50_imagenet", num_classes=classes)).to(device).requires_grad_(False)
    ensemble = GeneratorEnsemble(classes, classes, image_size=size, channels=3, widths=widths).to(device)
    rows = []
    for provider in ("hooks+loop", "fastdfd"):
        step, cleanup = _step_fn(provider, teacher, ensemble, chunk, batch)
        try:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            ms = bench(step, device, warmup=1, reps=reps)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        finally:
            cleanup()
        rows.append({"provider": provider, "ms": ms, "images_per_s": chunk * batch / (ms * 1e-3), "peak_gib": peak})
    base = rows[0]["images_per_s"]
    budget_images = classes * ASSUMED_STEPS_PER_GENERATOR * ASSUMED_IMAGES_PER_STEP
    for r in rows:
        r["speedup_vs_hooks_loop"] = r["images_per_s"] / base
        r["projected_gpu_hours"] = budget_images / r["images_per_s"] / 3600
    report["imagenet"] = {
        "config": {"teacher": "resnet50_imagenet", "image_size": size, "generators": classes,
                   "generators_per_step": chunk, "images_per_generator": batch, "widths": list(widths),
                   "autocast": "bf16" if device.type == "cuda" else None},
        "assumption": (f"synthesis budget: each of the {classes} generators trains {ASSUMED_STEPS_PER_GENERATOR} "
                       f"steps of {ASSUMED_IMAGES_PER_STEP} images ({budget_images:,} images through teacher "
                       "forward+backward); the paper does not state its schedule; optimizer time excluded"),
        "published_gpu_hours": PUBLISHED_GPU_HOURS,
        "rows": rows,
    }
    return report["imagenet"]
