"""The digits study behind the demo's cross-entropy weight (docs/generators.md, "Why the students lagged").

    python benchmarks/ce_weight_study.py SEED GEN_CHANGE DISTILL_CHANGE [DISTILL_CHANGE ...]

    python benchmarks/ce_weight_study.py 0 ce_weight=0.01 base T=8       # one generator run, two students
    python benchmarks/ce_weight_study.py 2 base base T=8,mix=1,shift=1

One run trains the demo's teacher for SEED, then a 10-generator ensemble from it with the demo's budget
(300 steps, 32 images per generator) starting from ``base`` = scope ensemble, normalization mean, kl,
moment weight 10, ce weight 1, Adam lr 1e-2, no output BN, and GEN_CHANGE (comma-separated KEY=VALUE of
DemoSettings, or ``ls`` / ``ce_floor`` / ``ce_pmax``). Then one student per DISTILL_CHANGE is distilled
from the same generators (400 steps; ``T``, ``steps``, ``lr``, ``batch``, ``mix``, ``shift``). Each line
printed is one result; benchmarks/results/ce_weight_study.json holds the runs of 2026-11-30.

This is an exploratory script. The cross-entropy variants (label smoothing ``ls``, a floor ``ce_floor``
below which the per-image cross-entropy is clamped, ``ce_pmax=1``: cross-entropy only on images the
teacher does not yet put in their class) and the distillation augmentations (``mix``: mixup with a
uniform weight; ``shift``: a random translation of up to that many pixels, edge replicated) are patched
in here for the study. None paid enough to become a library feature (docs/generators.md).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdfd.cli.demo import INPUT_SPACE, NUM_CLASSES, DemoSettings, train_digits_teacher  # noqa: E402
from fastdfd.models import create_model  # noqa: E402
from fastdfd.nn import GeneratorEnsemble  # noqa: E402
from fastdfd.train import Distiller, GeneratorTrainer, evaluate_accuracy  # noqa: E402
from fastdfd.train import generator_trainer as trainer_module  # noqa: E402
from fastdfd.train.losses import distillation_kl  # noqa: E402
from fastdfd.train.probe import as_logits  # noqa: E402
from fastdfd.train.quality import generator_quality  # noqa: E402

BASE = dict(scope="ensemble", normalization="mean", ce_weight=1.0)  # the study's starting point


def _pairs(text: str) -> dict:
    return {} if text == "base" else dict(p.split("=", 1) for p in text.split(","))


class _PatchedCE:
    """torch.nn.functional with cross_entropy replaced by the study's variant (only inside the trainer)."""

    def __init__(self, smoothing: float, floor: float, pmax: float):
        self.smoothing, self.floor, self.pmax = smoothing, floor, pmax

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, logits, target, reduction="mean"):
        ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.smoothing)
        if self.floor:
            ce = ce.clamp(min=self.floor)
        if self.pmax:
            with torch.no_grad():
                recognised = logits.argmax(1) == target
            ce = ce * (~recognised).float()
        return ce if reduction == "none" else ce.mean()


class _AugmentingDistiller(Distiller):
    """The Distiller's step with mixup and a random translation before teacher and student see the images."""

    mix, shift = False, 0

    def _step(self, _ctx):
        x, _ = self.ensemble.sample(self.batch_size, self.schedule.next(), rng=self.rng)
        x = self.input_space.from_generator(x)
        if self.shift:
            n, s, h = x.shape[0], self.shift, x.shape[-1]
            padded = F.pad(x, (s, s, s, s), mode="replicate")
            dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=self.rng)
            x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + h] for i in range(n)])
        if self.mix:
            perm = torch.randperm(x.shape[0], generator=self.rng)
            lam = torch.rand((x.shape[0], 1, 1, 1), generator=self.rng)
            x = lam * x + (1 - lam) * x[perm]
        with torch.no_grad():
            t = as_logits(self.teacher(x), self.teacher_probe.probabilities)
        s_logits = self.student_logits(x)
        loss = distillation_kl(s_logits, t, self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return torch.stack([loss.detach(), (s_logits.argmax(1) == t.argmax(1)).float().mean()])


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # a shared 2-core machine
    seed, gen_change, distill_changes = int(argv[0]), argv[1], argv[2:]
    knobs = _pairs(gen_change)
    patch = {k: float(knobs.pop(k, 0.0)) for k in ("ls", "ce_floor", "ce_pmax")}
    s = DemoSettings().replace(seed=seed, **BASE)
    s = s.replace(**{k: float(v) if "weight" in k or k == "lr" else v for k, v in knobs.items()})
    g = s.generator
    data, test, teacher = train_digits_teacher(s)
    trainer_module.F = _PatchedCE(patch["ls"], patch["ce_floor"], patch["ce_pmax"])
    torch.manual_seed(s.seed + NUM_CLASSES)
    ens = GeneratorEnsemble(NUM_CLASSES, NUM_CLASSES, image_size=s.image_size, channels=1,
                            latent_dim=g.architecture.latent_dim, widths=g.architecture.widths, output_bn=False)
    t0 = time.time()
    history = GeneratorTrainer(teacher, ens, loss=g.loss, optim=g.optimizer, input_space=INPUT_SPACE, seed=s.seed,
                               progress=False).fit(s.generator_steps)
    trainer_module.F = F
    q = generator_quality(teacher, ens, n_per_class=100, input_space=INPUT_SPACE, kind=g.loss.kind, seed=s.seed)
    print(f"GEN seed={seed} gv={gen_change} teacher={evaluate_accuracy(teacher, test):.4f} top1={q.teacher_top1:.3f} "
          f"ce_end={history[-1]['ce']:.4f} t={time.time() - t0:.0f}s", flush=True)
    state = {k: v.clone() for k, v in ens.state_dict().items()}
    for change in distill_changes:
        kw = _pairs(change)
        ens.load_state_dict(state)
        torch.manual_seed(seed + 300)
        student = create_model("digits_student", num_classes=NUM_CLASSES)
        steps = int(kw.get("steps", s.distill_steps))
        d = _AugmentingDistiller(teacher, student, ens, temperature=float(kw.get("T", s.distill.temperature)),
                                 batch_size=int(kw.get("batch", s.distill.batch_size)),
                                 lr=float(kw.get("lr", s.distill.lr)),
                                 total_steps=steps, seed=s.seed, progress=False, input_space=INPUT_SPACE)
        d.mix, d.shift = kw.get("mix", "0") not in ("0", "false"), int(kw.get("shift", 0))
        t0 = time.time()
        d.fit(steps)
        print(f"DIST seed={seed} gv={gen_change} dv={change} acc={d.evaluate(test):.4f} t={time.time() - t0:.0f}s",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
