"""``fastdfd demo``: the whole data-free pipeline on scikit-learn's handwritten digits.

Real data, no download, 2 CPU cores. A BN teacher is trained on the training split;
then, using nothing but that teacher, a 10-generator class-conditional ensemble is
trained and a smaller student distilled from its images; the same with one generator
under the same image budget; and the student trained on the real data as the upper
bound. Everything is scored on held-out real digits.

Settings: the library's default generator settings (``preset("default")``: the scale-free moment loss,
each BN layer's KL averaged over channels and the layers averaged; statistics over the whole ensemble's
batch; no output BN; Adam lr 1e-2) with a small generator (widths 32/16, latent 64) and one change: the
cross-entropy weight is 0.01 instead of 0.1 (moment : ce = 1000 : 1). On this teacher the cross-entropy
otherwise drives the generators to near one-hot images that teach the student little (students 95.9%
mean at 0.1 against 98.0% at 0.01, 3 seeds; docs/generators.md); on the pretrained EfficientNet-Lite0 the
same 0.01 left the teacher's top-1 on generated images at 8-14% after 150 steps (46% at moment : ce = 30 : 1),
so it is not the library's default. The
teacher recognises 98% of the ensemble's images at 0.01 (``teacher_top1_on_generated`` in metrics.json).
"""

from __future__ import annotations

import json
import os
import platform
import time
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..data import load_digits_split
from ..models import create_model
from ..nn import GeneratorEnsemble, save_ensemble
from ..train import Distiller, GeneratorTrainer, evaluate_accuracy
from ..train.quality import generator_quality, write_quality
from ..settings import DistillSettings, GeneratorSettings, LoopSettings, preset
from ..train.supervised import fit_classifier

NUM_CLASSES = 10
QUALITY_PER_CLASS = 100  # fresh images per class for the teacher's / verifier's top-1 on generated images
INPUT_SPACE = "minus_one_one"  # the digits teacher is trained on pixels scaled to [-1, 1]


@dataclass(frozen=True)
class DemoSettings:
    """The demo's run: its own budget, and the library's settings objects for the generators and the student.

    ``generator``: the default preset with a small generator (latent 64, widths 32/16) and ce_weight 0.01
    (the module docstring says why); ``distill``: :class:`DistillSettings`' defaults (temperature 4, batch 32 per
    generator, SGD lr 0.05)."""

    seed: int = 0
    image_size: int = 16
    teacher_epochs: int = 12
    real_epochs: int = 12
    generator_steps: int = 300
    distill_steps: int = 400
    # images per generator per step: generator.optimizer.batch_size and distill.batch_size (x10 for one generator)
    generator: GeneratorSettings = field(
        default_factory=lambda: preset("default").replace(latent_dim=64, widths=(32, 16), ce_weight=0.01))
    distill: DistillSettings = field(default_factory=DistillSettings)

    def replace(self, **changes) -> "DemoSettings":
        """A copy with ``changes``: the demo's own fields by name, ``distill_<field>`` for the student's settings
        (``distill_lr=0.1``), and any other name for the generator settings (``scope="generator"``, ``lr=1e-3``)."""
        own = {k: v for k, v in changes.items() if k in {f.name for f in fields(self)}}
        student = {k[len("distill_"):]: v for k, v in changes.items() if k not in own and k.startswith("distill_")}
        rest = {k: v for k, v in changes.items() if k not in own and not k.startswith("distill_")}
        out = dataclasses.replace(self, **own)
        return dataclasses.replace(out, generator=out.generator.replace(**rest),
                                   distill=out.distill.replace(**student))

    def flat(self) -> dict:
        """Every value under the names :meth:`replace` takes (for a run's record)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("generator", "distill")}
        return {**own, **self.generator.as_dict(), **{f"distill_{k}": v for k, v in self.distill.as_dict().items()}}

    @classmethod
    def quick(cls, **kw) -> "DemoSettings":
        """A run of a few seconds that exercises every stage (for tests)."""
        return cls().replace(teacher_epochs=3, real_epochs=1, generator_steps=3, batch_size=4, distill_steps=3,
                             distill_batch_size=4, **kw)


def _data_free_student(teacher, settings: DemoSettings, num_generators: int, test, log_dir: Path | None,
                       progress: bool):
    """Train an ensemble of ``num_generators`` from the teacher, distill a student; return (ensemble, the student's
    accuracy, the generator history, the distillation history).

    Every knob is in ``settings`` (``benchmarks/ablations.py`` varies them one at a time with
    :meth:`DemoSettings.replace`). The images per step do not depend on the number of generators: one generator
    gets 10 times the batch. ``log_dir=None`` writes no CSV logs.
    """
    s, g = settings, settings.generator
    batch_scale = NUM_CLASSES // num_generators  # same images per step whatever K
    torch.manual_seed(s.seed + num_generators)
    arch = g.architecture
    ensemble = GeneratorEnsemble(num_generators, NUM_CLASSES, image_size=s.image_size, channels=1,
                                 latent_dim=arch.latent_dim, widths=arch.widths, output_bn=arch.output_bn)
    trainer = GeneratorTrainer(
        teacher, ensemble, loss=g.loss, optim=g.optimizer.replace(batch_size=g.optimizer.batch_size * batch_scale),
        loop=LoopSettings(seed=s.seed, progress=progress, log_every=25), input_space=INPUT_SPACE,
        log_path=None if log_dir is None else log_dir / f"generators_k{num_generators}.csv",
    )
    gen_history = trainer.fit(s.generator_steps)
    student = create_model("digits_student", num_classes=NUM_CLASSES)
    distiller = Distiller(
        teacher, student, ensemble, settings=s.distill.replace(batch_size=s.distill.batch_size * batch_scale),
        loop=LoopSettings(seed=s.seed, progress=progress, log_every=25), total_steps=s.distill_steps,
        input_space=INPUT_SPACE, log_path=None if log_dir is None else log_dir / f"distill_k{num_generators}.csv",
    )
    kd_history = distiller.fit(s.distill_steps)
    return ensemble, distiller.evaluate(test), gen_history, kd_history


def train_digits_teacher(settings: DemoSettings, progress: bool = False):
    """Seed, load the digits split, train the BN teacher; return (data, test batches, teacher)."""
    s = settings
    torch.manual_seed(s.seed)
    data = load_digits_split(image_size=s.image_size, seed=s.seed)
    test = list(zip(data.x_test.split(256), data.y_test.split(256)))
    teacher = create_model("digits_teacher", num_classes=NUM_CLASSES)
    fit_classifier(teacher, data.x_train, data.y_train, epochs=s.teacher_epochs, seed=s.seed, progress=progress)
    return data, test, teacher


def run_demo(out: str | Path = "runs/demo", settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Run the demo, write metrics.json and the figures under ``out``, return the metrics."""
    s = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings = {}
    t = time.perf_counter()
    data, test, teacher = train_digits_teacher(s, progress)
    timings["teacher"] = time.perf_counter() - t

    torch.manual_seed(s.seed + 100)
    untrained = create_model("digits_student", num_classes=NUM_CLASSES)
    untrained_acc = evaluate_accuracy(untrained, test)

    results = {}
    for k, name in [(NUM_CLASSES, "ensemble"), (1, "single_generator")]:
        t = time.perf_counter()
        results[name] = _data_free_student(teacher, s, k, test, out, progress)
        timings[name] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(s.seed + 200)
    real = create_model("digits_student", num_classes=NUM_CLASSES)
    fit_classifier(real, data.x_train, data.y_train, epochs=s.real_epochs, seed=s.seed, progress=progress)
    timings["real_data_student"] = time.perf_counter() - t

    # Quality of the generated images: the teacher's top-1 against the intended digit, and a verifier's.
    # The verifier is the real-data student: another architecture (digits_student) and seed, trained on real
    # digits after both generator stages, so it never took part in generator training.
    t = time.perf_counter()
    quality = {}
    for name in results:
        report = generator_quality(teacher, results[name][0], n_per_class=QUALITY_PER_CLASS, input_space=INPUT_SPACE,
                                   verifier=real, kind=s.generator.loss.kind, seed=s.seed, class_names=[str(c) for c in range(10)])
        write_quality(report, out / f"quality_{name}")
        quality[name] = report
    timings["quality"] = time.perf_counter() - t

    metrics = {
        "teacher_accuracy": evaluate_accuracy(teacher, test),
        "ensemble_student_accuracy": results["ensemble"][1],
        "single_generator_student_accuracy": results["single_generator"][1],
        "real_data_student_accuracy": evaluate_accuracy(real, test),
        "untrained_student_accuracy": untrained_acc,
        "teacher_top1_on_generated": {k: r.teacher_top1 for k, r in quality.items()},
        "verifier_top1_on_generated": {k: r.verifier_top1 for k, r in quality.items()},
        "teacher_top1_on_generated_per_class": {k: r.to_dict()["teacher_top1_per_class"] for k, r in quality.items()},
        "quality_images_per_class": QUALITY_PER_CLASS,
        "verifier": "digits_student trained on the real training split (seed + 200), never used in generator training",
        "seconds": time.perf_counter() - start,
        "stage_seconds": timings,
        "test_images": int(data.y_test.numel()),
        "settings": dataclasses.asdict(s),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs".replace(" ,", ","),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_ensemble(results["ensemble"][0], out / "generators.pt")
    torch.save(teacher.state_dict(), out / "teacher.pt")
    _figures(out, results)
    return metrics


def _figures(out: Path, results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # figures are a nicety; the metrics are the result
        print("matplotlib is not installed: skipping the PNG figures (pip install fastdfd[demo])")
        return
    ensemble = results["ensemble"][0]
    images, _ = ensemble.sample(8, rng=torch.Generator().manual_seed(0))
    grid = images.view(ensemble.num_generators, 8, ensemble.spec.image_size, ensemble.spec.image_size)
    grid = grid.permute(0, 2, 1, 3).reshape(ensemble.num_generators * ensemble.spec.image_size, -1)
    fig, ax = plt.subplots(figsize=(4, 5))
    ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
    ax.set_title("samples: one row per generator (class 0-9)")
    ax.axis("off")
    fig.savefig(out / "samples.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for name, (_, _, gen, kd) in results.items():
        steps = [r["step"] for r in gen]
        axes[0].plot(steps, [r["moment"] for r in gen], label=name)
        axes[1].plot(steps, [r["ce"] for r in gen], label=name)
        axes[2].plot([r["step"] for r in kd], [r["kd"] for r in kd], label=name)
    for ax, title in zip(axes, ["moment loss (per generator)", "teacher cross-entropy", "distillation KL"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)


def format_table(m: dict) -> str:
    rows = [
        ("teacher (real data)", m["teacher_accuracy"]),
        ("student, data-free, 10-generator ensemble", m["ensemble_student_accuracy"]),
        ("student, data-free, one generator", m["single_generator_student_accuracy"]),
        ("student, real data (upper bound)", m["real_data_student_accuracy"]),
        ("student, untrained", m["untrained_student_accuracy"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{width}}  accuracy", f"{'-' * width}  --------"]
    lines += [f"{name:<{width}}  {acc * 100:7.2f}%" for name, acc in rows]
    if "teacher_top1_on_generated" in m:
        for key, label in [("teacher_top1_on_generated", "teacher"), ("verifier_top1_on_generated", "verifier")]:
            v = m[key]
            lines.append(f"{label} top-1 on generated images: ensemble {v['ensemble'] * 100:.1f}%, "
                         f"one generator {v['single_generator'] * 100:.1f}%")
    lines.append(f"held-out real digits: {m['test_images']}; wall time {m['seconds']:.0f} s")
    return "\n".join(lines)
