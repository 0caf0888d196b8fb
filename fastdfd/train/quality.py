"""Synthetic-data quality: how well a generator ensemble's images carry their intended classes.

The standard measure of inversion quality is the teacher's top-1 on freshly generated images
against the class each image was generated for; a *verifier* (a second network trained
independently and never used in generator training) gives the same measure without the bias
of having been trained against. Per-layer moment distances of the same images say which BN
layers' statistics the images still miss. The diversity of each class's images in the teacher's
penultimate features (:mod:`fastdfd.train.diversity`: a spread and an effective number of distinct
images) says whether a generator makes many images of its class or one repeated; with real images
of the classes (``reference``), the same figures for them stand beside.

    report = generator_quality(teacher, ensemble, n_per_class=32, input_space="imagenet")
    report.teacher_top1            # overall, in [0, 1]
    report.teacher_per_class       # {class id: top-1}
    report.layer_distances         # {BN layer name: distance}  (scope "ensemble", unweighted)
    report.diversity_per_class     # {class id: {"spread", "effective_images", "images"}}
    report.collapsed_classes       # classes under diversity.COLLAPSE_THRESHOLD distinct images
    write_quality(report, run_dir) # quality.json, quality_moments.png, quality_samples.png

Sampling uses its own RNG (``seed``): the global RNG and any trainer's stream are untouched.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..input_space import InputSpace, generator_pixels
from ..nn.ensemble import GeneratorEnsemble, ensemble_forward
from ..nn.matcher import MomentMatcher
from .diversity import COLLAPSE_THRESHOLD, class_diversity, penultimate_features
from .images import grid, save_png
from .modes import in_mode
from .probe import as_logits


@dataclass
class QualityReport:
    """What :func:`generator_quality` measured (accuracies in [0, 1])."""

    n_per_class: int
    classes: list[int]
    teacher_top1: float
    teacher_per_class: dict[int, float]
    teacher_counts: dict[int, int]  # images per class the teacher put in their intended class
    layer_distances: dict[str, float]
    kind: str
    verifier_top1: float | None = None
    verifier_per_class: dict[int, float] | None = None
    class_names: dict[int, str] | None = None
    seed: int = 0
    samples: torch.Tensor | None = field(default=None, repr=False)  # [classes, cols, C, S, S] pixels
    diversity_per_class: dict[int, dict[str, float]] = field(default_factory=dict)
    reference_diversity_per_class: dict[int, dict[str, float]] | None = None  # real images of the classes
    diversity_features: str = "penultimate"  # or "logits" for a teacher without an nn.Linear head

    @property
    def collapsed_classes(self) -> list[int]:
        """Classes whose images count fewer than :data:`~fastdfd.train.diversity.COLLAPSE_THRESHOLD`
        distinct ones by the effective number."""
        return [c for c, d in self.diversity_per_class.items() if d["effective_images"] < COLLAPSE_THRESHOLD]

    @staticmethod
    def _mean(per_class: dict[int, dict[str, float]] | None, key: str) -> float | None:
        return sum(d[key] for d in per_class.values()) / len(per_class) if per_class else None

    def to_dict(self) -> dict:
        out = {
            "n_per_class": self.n_per_class, "seed": self.seed, "classes": self.classes,
            "teacher_top1_on_generated": self.teacher_top1,
            "teacher_top1_per_class": {str(c): v for c, v in self.teacher_per_class.items()},
            "teacher_correct_per_class": {str(c): v for c, v in self.teacher_counts.items()},
            "moment_kind": self.kind,
            "moment_distance_per_layer": self.layer_distances,
            "moment_distance_mean": (sum(self.layer_distances.values()) / len(self.layer_distances)
                                     if self.layer_distances else None),
        }
        if self.diversity_per_class:
            out["diversity"] = {
                "features": self.diversity_features, "collapse_threshold": COLLAPSE_THRESHOLD,
                "effective_images_mean": self._mean(self.diversity_per_class, "effective_images"),
                "spread_mean": self._mean(self.diversity_per_class, "spread"),
                "collapsed_classes": self.collapsed_classes,
                "per_class": {str(c): v for c, v in self.diversity_per_class.items()},
            }
            if self.reference_diversity_per_class:
                ref = self.reference_diversity_per_class
                out["diversity"]["reference"] = {
                    "effective_images_mean": self._mean(ref, "effective_images"),
                    "spread_mean": self._mean(ref, "spread"), "per_class": {str(c): v for c, v in ref.items()},
                }
        if self.verifier_top1 is not None:
            out["verifier_top1_on_generated"] = self.verifier_top1
            out["verifier_top1_per_class"] = {str(c): v for c, v in (self.verifier_per_class or {}).items()}
        if self.class_names:
            out["class_names"] = {str(c): n for c, n in self.class_names.items()}
        return out


def _logits(model: nn.Module, x: torch.Tensor, probabilities: bool = False) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(x.to(device))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return as_logits(out, probabilities).to(x.device)


def _predict(model: nn.Module, x: torch.Tensor, probabilities: bool = False) -> torch.Tensor:
    return _logits(model, x, probabilities).argmax(1)


def _logits_and_features(model: nn.Module, x: torch.Tensor, probabilities: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the penultimate features [N, D] (float32, on the CPU): the input of the last
    nn.Linear, or None for a model without one (its logits then stand in)."""
    if not _has_linear(model):
        return _logits(model, x, probabilities), None
    with penultimate_features(model) as feats:
        logits = _logits(model, x, probabilities)
    return logits, feats[-1].float().cpu()


@torch.no_grad()
def reference_diversity(teacher: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, *,
                        input_space: str | InputSpace | None = None, batch_size: int = 256,
                        teacher_outputs: str = "logits") -> dict[int, dict[str, float]]:
    """:func:`~fastdfd.train.diversity.class_diversity` of real images: ``pixels`` [N, C, S, S] in [0, 1]
    (float), ``labels`` [N], normalised with ``input_space`` for the teacher (eval mode, restored)."""
    space = InputSpace.parse(input_space)
    feats = []
    with in_mode(teacher, False):
        for lo in range(0, pixels.shape[0], batch_size):
            logits, f = _logits_and_features(teacher, space.normalize(pixels[lo:lo + batch_size].float()),
                                             teacher_outputs == "probabilities")
            feats.append(logits.float().cpu() if f is None else f)
    return class_diversity(torch.cat(feats), labels.cpu())


@torch.no_grad()
def generator_quality(
    teacher: nn.Module,
    ensemble: GeneratorEnsemble,
    *,
    n_per_class: int = 32,
    input_space: str | InputSpace | None = None,
    verifier: nn.Module | None = None,
    verifier_input_space: str | InputSpace | None = None,
    kind: str = "kl",
    seed: int = 0,
    batch_size: int = 256,
    moment_images: int = 2048,
    sample_columns: int = 8,
    max_grid_rows: int = 32,
    class_names: Sequence[str] | None = None,
    teacher_outputs: str = "logits",
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QualityReport:
    """The teacher's (and a verifier's) top-1 on fresh images of ``ensemble``, per class and overall,
    and per-layer moment distances of those images.

    Every generator makes ``n_per_class`` images of each class of its class set (a class served by
    several generators gets ``n_per_class`` from each); the images are normalised with
    ``input_space`` (the verifier's with ``verifier_input_space``, by default the same) and the
    networks run in eval mode without gradients (their modes are restored). ``moment_images``
    caps the images of the one moment forward (scope ``ensemble``, unweighted distances of ``kind``;
    taken evenly over the classes when there are more); only those and the grid's columns are kept
    in memory, the rest are scored and dropped chunk by chunk. ``seed`` seeds a private RNG.

    Diversity (:mod:`fastdfd.train.diversity`) is measured per class on the teacher's penultimate
    features of every generated image; ``reference`` = (pixels [N, C, S, S] in [0, 1], labels [N]),
    real images of the classes, gets the same figures (:func:`reference_diversity`).
    """
    if n_per_class < 1:
        raise ValueError("n_per_class must be positive")
    space = InputSpace.parse(input_space)
    vspace = space if verifier_input_space is None else InputSpace.parse(verifier_input_space)
    probabilities = teacher_outputs == "probabilities"
    device = ensemble.fc_z.device
    rng = torch.Generator(device=device).manual_seed(int(seed))
    k, per = ensemble.num_generators, ensemble.classes_per_generator
    per_gen = n_per_class * per
    chunk = max(1, batch_size // per_gen)
    images, labels, y_seen, t_pred, v_pred, t_feats = [], [], [], [], [], []
    # images kept per (generator, class): the grid's columns, or the moment forward's even share if larger
    keep_per = min(n_per_class, max(sample_columns, moment_images // (k * per)))
    with in_mode(teacher, False), (in_mode(verifier, False) if verifier is not None else contextlib.nullcontext()):
        for lo in range(0, k, chunk):
            rows = torch.arange(lo, min(k, lo + chunk), device=device)
            local = torch.arange(per, device=device).repeat_interleave(n_per_class).expand(rows.numel(), per_gen)
            y = ensemble.class_ids.index_select(0, rows).gather(1, local)
            z = torch.randn(rows.numel(), per_gen, ensemble.spec.latent_dim, generator=rng, device=device)
            x = ensemble_forward(ensemble.stacked(rows), ensemble.spec, z.to(ensemble.fc_z.dtype), local)
            x = x.reshape(-1, *x.shape[2:])
            y = y.reshape(-1)
            logits, feats = _logits_and_features(teacher, space.from_generator(x), probabilities)
            t_pred.append(logits.argmax(1))
            t_feats.append(logits.float().cpu() if feats is None else feats)
            if verifier is not None:
                v_pred.append(_predict(verifier, vspace.from_generator(x)))
            # keep only what the grid and the moment forward need (not every image: 1000 classes at 224 px)
            keep = (torch.arange(per_gen, device=device) % n_per_class < keep_per).repeat(rows.numel())
            images.append(x[keep].cpu())
            labels.append(y[keep].cpu())
            y_seen.append(y.cpu())
        x_all, y_kept = torch.cat(images), torch.cat(labels)
        y_all = torch.cat(y_seen)
        t_ok = torch.cat(t_pred).cpu() == y_all
        v_ok = torch.cat(v_pred).cpu() == y_all if verifier is not None else None
        classes = sorted(set(y_all.tolist()))
        per_class = {c: (y_all == c) for c in classes}
        counts = {c: int(t_ok[m].sum()) for c, m in per_class.items()}
        t_per = {c: counts[c] / int(m.sum()) for c, m in per_class.items()}
        v_per = {c: float(v_ok[m].float().mean()) for c, m in per_class.items()} if v_ok is not None else None
        diversity = class_diversity(torch.cat(t_feats), y_all)

        # moment distances: one forward of (at most) moment_images images, evenly over the classes
        order = torch.argsort(y_kept, stable=True)
        if len(order) > moment_images:
            order = order[torch.linspace(0, len(order) - 1, moment_images).long()]
        teacher_device = next(teacher.parameters()).device
        with MomentMatcher(teacher, kind=kind, scope="ensemble") as matcher, torch.no_grad():  # values only
            teacher(space.from_generator(x_all[order].to(teacher_device)))
            distances = {name: float(v) for name, v in matcher.layer_losses().items()}

    # the sample grid: the first columns of every class, one row per class (at most max_grid_rows)
    rows_px = [generator_pixels(x_all[y_kept == c][:sample_columns]) for c in classes[:max_grid_rows]]
    cols = min(r.shape[0] for r in rows_px)
    samples = torch.stack([r[:cols] for r in rows_px])
    names = None
    if class_names is not None:
        names = {c: str(class_names[c]) for c in classes if c < len(class_names)}
    return QualityReport(
        n_per_class=n_per_class, classes=classes, teacher_top1=float(t_ok.float().mean()), teacher_per_class=t_per,
        teacher_counts=counts, layer_distances=distances, kind=kind,
        verifier_top1=None if v_ok is None else float(v_ok.float().mean()), verifier_per_class=v_per,
        class_names=names, seed=int(seed), samples=samples, diversity_per_class=diversity,
        diversity_features="penultimate" if _has_linear(teacher) else "logits",
        reference_diversity_per_class=None if reference is None else reference_diversity(
            teacher, reference[0], reference[1], input_space=space, batch_size=batch_size,
            teacher_outputs=teacher_outputs),
    )


def _has_linear(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in model.modules())


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_moment_plot(report: QualityReport, path: str | Path) -> Path | None:
    """A bar chart of the per-layer moment distances (None, with a message, without matplotlib)."""
    plt = _matplotlib()
    if plt is None:
        print("matplotlib is not installed: skipping the per-layer moment plot (pip install matplotlib)")
        return None
    names = list(report.layer_distances)
    values = [max(report.layer_distances[n], 1e-12) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), values)
    ax.set_yscale("log")
    ax.set_xlabel("BN layer (teacher order)")
    ax.set_ylabel(f"{report.kind} distance")
    ax.set_title(f"moment distance per BN layer on generated images (mean {sum(values) / len(values):.3g})")
    if len(names) <= 20:
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_sample_grid(report: QualityReport, path: str | Path) -> Path:
    """One row per class, each labelled with its class (name when known) and the teacher's top-1
    on it; without matplotlib an unlabelled PNG of the same grid."""
    samples = report.samples
    if samples is None:
        raise ValueError("the report carries no samples")
    n_rows, cols, c, h, w = samples.shape
    path = Path(path)
    plt = _matplotlib()
    if plt is None:
        print("matplotlib is not installed: the sample grid is written without labels")
        return save_png(grid(samples.reshape(-1, c, h, w), n_rows), path)
    fig, axes = plt.subplots(n_rows, 1, figsize=(max(4.0, 0.9 * cols + 2.5), 0.9 * n_rows + 0.4), squeeze=False)
    for r, cls in enumerate(report.classes[:n_rows]):
        strip = grid(samples[r], 1)  # [C, h, cols*w]
        ax = axes[r, 0]
        if c == 1:
            ax.imshow(strip[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(strip.permute(1, 2, 0).numpy())
        name = report.class_names.get(cls) if report.class_names else None
        label = f"{cls}: {name}" if name else f"class {cls}"
        div = report.diversity_per_class.get(cls)
        eff = f"\n{div['effective_images']:.1f} distinct" if div else ""
        ax.set_ylabel(f"{label}\n{report.teacher_per_class[cls] * 100:.0f}%{eff}", rotation=0, ha="right",
                      va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"generated samples, one row per class; teacher top-1 {report.teacher_top1 * 100:.1f}%", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_quality(report: QualityReport, out: str | Path, extra: dict | None = None) -> dict[str, str]:
    """Write ``quality.json``, ``quality_moments.png`` and ``quality_samples.png`` into ``out``;
    returns the paths written by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    (out / "quality.json").write_text(json.dumps({**report.to_dict(), **(extra or {})}, indent=2))
    written["quality"] = str(out / "quality.json")
    plot = save_moment_plot(report, out / "quality_moments.png")
    if plot is not None:
        written["moment_plot"] = str(plot)
    written["samples"] = str(save_sample_grid(report, out / "quality_samples.png"))
    return written


__all__ = ["QualityReport", "generator_quality", "reference_diversity", "save_moment_plot", "save_sample_grid",
           "write_quality"]
