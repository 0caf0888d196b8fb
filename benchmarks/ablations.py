"""The paper's questions at small scale: one-knob ablations of the digits demo, several seeds.

    python benchmarks/ablations.py [--seeds 3] [--quick] [--out runs/ablations] [--readme docs/ablations.md]

Per seed one BN teacher is trained (the demo's ``train_digits_teacher``) and reused by every
variant. Every variant is the demo's data-free pipeline (``fastdfd.cli.demo``: its settings, at
its full step budget) with exactly one knob changed; the paper's preset changes several at once.
Every run also records the teacher's top-1 on 50 fresh generated images per class
(``teacher_top1_on_generated``). Writes ``results.json`` (every run) and
``table.md`` under ``--out`` and, unless ``--quick`` or ``--no-readme``, replaces the text
between the ``<!-- ablations:begin -->`` / ``<!-- ablations:end -->`` markers of the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.machine import machine
from fastdfd.cli.demo import INPUT_SPACE, NUM_CLASSES, DemoSettings, _data_free_student, train_digits_teacher
from fastdfd.data import load_digits_split
from fastdfd.models import create_model
from fastdfd.nn import GeneratorEnsemble
from fastdfd.train import evaluate_accuracy
from fastdfd.train.quality import generator_quality
from fastdfd.train.supervised import fit_classifier

BEGIN, END = "<!-- ablations:begin -->", "<!-- ablations:end -->"
COMMAND = "python benchmarks/ablations.py --seeds 3"

# The per-run budget of the full study: the demo's own (issue 13 asks for the table at the demo's budget).
BUDGET = {"generator_steps": DemoSettings().generator_steps, "distill_steps": DemoSettings().distill_steps,
          "distill_batch_size": DemoSettings().distill.batch_size}


@dataclass(frozen=True)
class Variant:
    name: str
    change: str  # what differs from the baseline, for the table
    settings: dict = field(default_factory=dict)  # DemoSettings.replace changes (scope, kind, output_bn, ...)
    num_generators: int = NUM_CLASSES


def generator_parameters(num_generators: int, widths, s: DemoSettings) -> int:
    """Parameter count of an ensemble (all generators together)."""
    ens = GeneratorEnsemble(num_generators, NUM_CLASSES, image_size=s.image_size, channels=1,
                            latent_dim=s.generator.architecture.latent_dim, widths=widths, output_bn=False)
    return sum(math.prod(shape) for shape in ens.param_shapes().values())


def same_capacity_widths(s: DemoSettings) -> tuple[tuple[int, ...], int, int]:
    """Widths of one generator scaled (ratios kept) to the K=10 ensemble's parameter count.

    Returns (widths, the single generator's count, the ensemble's count).
    """
    target = generator_parameters(NUM_CLASSES, s.generator.architecture.widths, s)
    best = None
    for step in range(100, 2001):
        widths = tuple(max(1, round(w * step / 100)) for w in s.generator.architecture.widths)
        n = generator_parameters(1, widths, s)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (widths, n)
        if n > target:
            break
    return best[0], best[1], target


def variants(s: DemoSettings) -> list[Variant]:
    """The baseline (the demo's settings) and every one-knob change (same-capacity widths computed from ``s``)."""
    widths, _, _ = same_capacity_widths(s)
    return [
        Variant("baseline", f"demo settings: 10 generators, scope {s.generator.loss.scope}, kl "
                            f"{s.generator.loss.normalization}, moment weight {s.generator.loss.moment_weight:g}, "
                            f"ce weight {s.generator.loss.ce_weight:g}"),
        Variant("single_same_budget", "1 generator, batch x10 (same images per step)", num_generators=1),
        Variant("single_same_capacity", f"1 generator, batch x10, widths {list(widths)} (~ensemble's parameters)",
                {"widths": widths}, num_generators=1),
        Variant("scope_generator", "statistics per generator (scope=generator)", {"scope": "generator"}),
        Variant("normalization_sum", "kl summed over channels and layers (normalization=sum, the paper's)",
                {"normalization": "sum"}),
        Variant("ce_weight_1", "cross-entropy weight 1 (moment : ce = 10 : 1)", {"ce_weight": 1.0}),
        Variant("ce_weight_0.1", "cross-entropy weight 0.1 (moment : ce = 100 : 1)", {"ce_weight": 0.1}),
        Variant("kind_l2", "moment distance l2 (DeepInversion), weights kept", {"kind": "l2"}),
        Variant("output_bn", "generator output BN on (the paper's)", {"output_bn": True}),
        Variant("student_bn_per_generator", "student BN statistics per generator's block",
                {"distill_student_bn": "per_generator"}),
        # the paper's settings as one preset (fastdfd.settings.preset("paper")): summed kl, per-generator
        # statistics, moment weight 10 against cross-entropy 1, output BN, Adam lr 1e-3, 64 images per generator
        Variant("paper_preset", "the paper's preset: summed kl, scope generator, ce weight 1, output BN, lr 1e-3, "
                                "batch 64",
                {"normalization": "sum", "scope": "generator", "moment_weight": 10.0, "ce_weight": 1.0,
                 "lr": 1e-3, "batch_size": 64, "output_bn": True}),
    ]


def budget(quick: bool) -> DemoSettings:
    return DemoSettings.quick() if quick else DemoSettings().replace(**BUDGET)


def _teacher_job(s: DemoSettings) -> dict:
    """The seed's teacher, and the demo's verifier: a digits_student trained on the real data (seed + 200),
    never used in generator training, that scores the generated images as a second network."""
    t = time.perf_counter()
    data, test, teacher = train_digits_teacher(s)
    torch.manual_seed(s.seed + 200)
    verifier = create_model("digits_student", num_classes=NUM_CLASSES)
    fit_classifier(verifier, data.x_train, data.y_train, epochs=s.real_epochs, seed=s.seed, progress=False)
    return {"seed": s.seed, "accuracy": evaluate_accuracy(teacher, test), "seconds": time.perf_counter() - t,
            "verifier_accuracy": evaluate_accuracy(verifier, test), "state": teacher.state_dict(),
            "verifier_state": verifier.state_dict()}


def _variant_job(job: tuple[DemoSettings, Variant, dict, float]) -> dict:
    vs, v, states, teacher_acc = job
    teacher = create_model("digits_teacher", num_classes=NUM_CLASSES)
    teacher.load_state_dict(states["state"])
    verifier = create_model("digits_student", num_classes=NUM_CLASSES)
    verifier.load_state_dict(states["verifier_state"])
    data = load_digits_split(image_size=vs.image_size, seed=vs.seed)  # the split train_digits_teacher used
    test = list(zip(data.x_test.split(256), data.y_test.split(256)))
    t = time.perf_counter()
    ensemble, acc, gen, kd = _data_free_student(teacher, vs, v.num_generators, test, None, False)
    # the teacher's top-1 on fresh images against the intended class (50 per class; private RNG)
    quality = generator_quality(teacher, ensemble, n_per_class=50, input_space=INPUT_SPACE, kind=vs.generator.loss.kind, seed=vs.seed,
                                verifier=verifier)
    return {
        "teacher_top1_on_generated": quality.teacher_top1, "verifier_top1_on_generated": quality.verifier_top1,
        "variant": v.name, "seed": vs.seed, "accuracy": acc, "teacher_accuracy": teacher_acc,
        "seconds": time.perf_counter() - t, "generator_parameters": sum(p.numel() for p in ensemble.parameters()),
        "generator_final": gen[-1] if gen else {}, "distill_final": kd[-1] if kd else {},
        "settings": {**vs.flat(), "num_generators": v.num_generators},
    }


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_ablations(out: str | Path = "runs/ablations", seeds: int = 3, quick: bool = False,
                  readme: str | Path | None = None, only: list[str] | None = None, workers: int = 1) -> dict:
    """Run every variant for seeds 0..seeds-1; write results.json and table.md; return the results.

    ``workers`` > 1: that many single-thread processes share the runs (a teacher per seed
    first, then every (seed, variant), largest first). Each run seeds itself, so results
    do not depend on the scheduling; per-run seconds are then measured beside the other
    workers.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = budget(quick)
    todo = [v for v in variants(base) if only is None or v.name in only]
    widths, n_single, n_ensemble = same_capacity_widths(base)
    print(f"generator parameters: 10-generator ensemble {n_ensemble:,}; one generator of widths "
          f"{list(base.generator.architecture.widths)} "
          f"{generator_parameters(1, base.generator.architecture.widths, base):,}; same-capacity single generator "
          f"(widths {list(widths)}) {n_single:,}", flush=True)
    pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) if workers > 1 else None)
    imap = pool.imap_unordered if pool is not None else map
    try:
        teachers = sorted(imap(_teacher_job, [base.replace(seed=seed) for seed in range(seeds)]),
                          key=lambda t: t["seed"])
        for t in teachers:
            print(f"seed {t['seed']}: teacher {t['accuracy'] * 100:.2f}% ({t['seconds']:.0f} s)", flush=True)
        cost = {"single_same_capacity": 2}  # the slow one first, so the workers finish together
        jobs = [(base.replace(seed=t["seed"], **v.settings), v, t, t["accuracy"])
                for v in sorted(todo, key=lambda v: -cost.get(v.name, 1)) for t in teachers]
        runs = []
        for r in imap(_variant_job, jobs):
            runs.append(r)
            print(f"[{len(runs)}/{len(jobs)}] seed {r['seed']} {r['variant']:<26} student {r['accuracy'] * 100:6.2f}%"
                  f"  teacher on generated {r['teacher_top1_on_generated'] * 100:5.1f}%"
                  f"  {r['seconds']:5.1f} s  ({time.perf_counter() - start:.0f} s in all)", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    order = {v.name: i for i, v in enumerate(todo)}
    runs.sort(key=lambda r: (order[r["variant"]], r["seed"]))
    teachers = [{k: x for k, x in t.items() if not k.endswith("state")} for t in teachers]
    results = {
        "command": COMMAND if not quick else "python benchmarks/ablations.py --quick",
        "date": datetime.date.today().isoformat(),
        "seeds": seeds, "quick": quick, "workers": workers, "budget": {"generator_steps": base.generator_steps,
                                                                         "distill_steps": base.distill_steps,
                                                                         "distill_batch": base.distill.batch_size},
        "variants": [{"name": v.name, "change": v.change} for v in todo],
        "generator_parameters": {"ensemble": n_ensemble, "single_same_capacity": n_single,
                                 "single": generator_parameters(1, base.generator.architecture.widths, base)},
        "teachers": teachers, "runs": runs, "summary": summarize(runs, todo),
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "machine": machine(),
    }
    table = format_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table, flush=True)
    if readme is not None and not quick:
        replace_between_markers(readme, readme_block(results, table))
    return results


def summarize(runs: list[dict], todo: list[Variant]) -> list[dict]:
    rows = []
    for v in todo:
        mine = [r for r in runs if r["variant"] == v.name]
        accs = [r["accuracy"] * 100 for r in mine]
        gaps = [(r["accuracy"] - r["teacher_accuracy"]) * 100 for r in mine]

        def mean(key):
            vals = [r[key] * 100 for r in mine if r.get(key) is not None]
            return statistics.fmean(vals) if vals else float("nan")

        rows.append({
            "variant": v.name, "change": v.change, "n": len(accs),
            "mean": statistics.fmean(accs) if accs else float("nan"),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "gap_to_teacher": statistics.fmean(gaps) if gaps else float("nan"),
            "seconds": statistics.fmean(r["seconds"] for r in mine) if mine else float("nan"),
            # fresh images, 50 per class, against the intended class (not the last training batch)
            "teacher_on_generated": mean("teacher_top1_on_generated"),
            "verifier_on_generated": mean("verifier_top1_on_generated"),
        })
    return rows


def format_table(results: dict) -> str:
    lines = [
        "| variant | what changes | student accuracy, % (mean +- std) | student - teacher, points (paired mean) | "
        "teacher top-1 on generated, % | verifier top-1 on generated, % | wall s per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        lines.append(f"| {r['variant']} | {r['change']} | {r['mean']:.2f} +- {r['std']:.2f} | "
                     f"{r['gap_to_teacher']:+.2f} | {r['teacher_on_generated']:.1f} | "
                     f"{r['verifier_on_generated']:.1f} | {r['seconds']:.0f} |")
    teach = [t["accuracy"] * 100 for t in results["teachers"]]
    sd = statistics.stdev(teach) if len(teach) > 1 else 0.0
    lines.append(f"| (teacher, real data) | | {statistics.fmean(teach):.2f} +- {sd:.2f} | | | | |")
    return "\n".join(lines)


def readme_block(results: dict, table: str) -> str:
    b = results["budget"]
    return (f"`{results['command']}` on {results['machine']} (torch {results['torch']}, "
            f"{results['workers']} single-thread worker processes), "
            f"{results['date']}; seeds 0-{results['seeds'] - 1}; "
            f"per run {b['generator_steps']} generator steps and {b['distill_steps']} distillation steps "
            f"(distillation batch {b['distill_batch']} per generator); {results['seconds'] / 60:.1f} min in all.\n\n"
            + table)


def replace_between_markers(path: str | Path, text: str) -> None:
    """Replace what lies between the ablation markers of ``path`` with ``text`` (markers kept)."""
    path = Path(path)
    doc = path.read_text()
    i, j = doc.find(BEGIN), doc.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{path} lacks the markers {BEGIN} ... {END}")
    path.write_text(doc[: i + len(BEGIN)] + "\n" + text.strip("\n") + "\n" + doc[j:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a few steps, one seed (tests)")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--readme", default="docs/ablations.md")  # the page that holds the table between its markers
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--only", nargs="*", help="run only these variants")
    p.add_argument("--workers", type=int, default=None,
                   help="single-thread worker processes (default 2; 1 with --quick: in this process)")
    a = p.parse_args(argv)
    seeds = 1 if a.quick else a.seeds
    readme = None if a.no_readme or a.quick else a.readme
    workers = a.workers if a.workers is not None else (1 if a.quick else 2)
    run_ablations(a.out, seeds=seeds, quick=a.quick, readme=readme, only=a.only, workers=workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
