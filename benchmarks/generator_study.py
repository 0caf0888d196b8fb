"""The generator study: one knob at a time, on the pretrained EfficientNet-Lite0 and on the digits demo.

    python benchmarks/generator_study.py lite0 NAME KEY=VALUE ...   # one Lite0 run (benchmarks/real_teacher.py)
    python benchmarks/generator_study.py table                      # the runs so far as a markdown table
    python benchmarks/generator_study.py digits NAME KEY=VALUE ...  # one digits run (the demo's generator stage
                                                                    # + its distillation, 10 generators)

Every run is appended to ``benchmarks/results/generator_study.json`` (seed, settings, teacher top-1 on
freshly generated images, moment loss at the first and last logged step, wall time; digits runs also the
student's accuracy, the teacher's, and a verifier's top-1 on the generated images).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("STUDY_OUT", ROOT / "benchmarks" / "results" / "generator_study.json"))


def _parse(pairs, cls):
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for pair in pairs:
        k, v = pair.split("=", 1)
        t = types[k] if isinstance(types[k], str) else types[k].__name__
        if "tuple" in t:
            out[k] = tuple(int(x) for x in v.split(","))
        elif t == "bool":
            out[k] = v.lower() in ("1", "true", "yes")
        elif t == "int":
            out[k] = int(v)
        elif t == "float":
            out[k] = float(v)
        else:
            out[k] = v
    return out


def _parse_demo(pairs):
    """``key=value`` pairs for :meth:`DemoSettings.replace`: the demo's own fields as integers, every other key a
    generator setting parsed by its own spec."""
    from fastdfd.cli.demo import DemoSettings
    from fastdfd.settings import GeneratorSettings

    own = {f.name for f in fields(DemoSettings)}
    specs = {sp.name: sp for cls in GeneratorSettings.CLASSES for sp in cls.specs()}
    out = {}
    for pair in pairs:
        k, v = pair.split("=", 1)
        out[k] = int(v) if k in own else specs[k].parse(v)
    return out


def lite0(name, pairs):
    from benchmarks.real_teacher import Settings, run

    s = Settings(**_parse(pairs, Settings))
    rec = run(s, out_dir=ROOT / "benchmarks" / "results" / "generator_study" / f"lite0-{name}")
    return {"teacher": "efficientnet-lite0", "name": name, "seed": s.seed, "settings": asdict(s),
            "teacher_top1_on_generated": rec["teacher_top1_on_generated"],
            "teacher_top1_per_class": rec["quality"]["teacher_top1_per_class"],
            "moment_start": rec["moment_start"], "moment_end": rec["moment_end"], "ce_start": rec["ce_start"],
            "ce_end": rec["ce_end"], "steps": rec["steps_done"], "wall_s": rec["seconds"],
            "curve": [{k: round(v, 5) for k, v in r.items()} for r in rec["curve"]]}


def digits(name, pairs):
    from fastdfd.cli.demo import INPUT_SPACE, NUM_CLASSES, DemoSettings, _data_free_student, train_digits_teacher
    from fastdfd.models import create_model
    from fastdfd.train import evaluate_accuracy
    from fastdfd.train.quality import generator_quality
    from fastdfd.train.supervised import fit_classifier

    torch.set_num_threads(1)  # a shared 2-core machine: 2 threads oversubscribe (10x slower measured on Lite0)
    knobs = {}
    for key in ("output_bn", "tv_weight", "l2_weight", "k"):
        for p in list(pairs):
            if p.startswith(key + "="):
                knobs[key] = p.split("=", 1)[1]
                pairs.remove(p)
    s = DemoSettings().replace(**_parse_demo(pairs))
    start = time.perf_counter()
    data, test, teacher = train_digits_teacher(s)
    k = int(knobs.pop("k", NUM_CLASSES))
    s = s.replace(output_bn=knobs.get("output_bn", "0").lower() in ("1", "true"),
                  **{key: float(v) for key, v in knobs.items() if key != "output_bn"})
    ensemble, acc, gen_h, _ = _data_free_student(teacher, s, k, test, None, False)
    torch.manual_seed(s.seed + 200)
    verifier = create_model("digits_student", num_classes=NUM_CLASSES)
    fit_classifier(verifier, data.x_train, data.y_train, epochs=s.real_epochs, seed=s.seed, progress=False)
    q = generator_quality(teacher, ensemble, n_per_class=100, input_space=INPUT_SPACE, verifier=verifier,
                          kind=s.generator.loss.kind, seed=s.seed)
    return {"teacher": "digits", "name": name, "seed": s.seed, "settings": {**s.flat(), **knobs, "k": k},
            "teacher_top1_on_generated": q.teacher_top1, "verifier_top1_on_generated": q.verifier_top1,
            "student_accuracy": acc, "teacher_accuracy": evaluate_accuracy(teacher, test),
            "moment_start": gen_h[0]["moment"], "moment_end": gen_h[-1]["moment"], "ce_start": gen_h[0]["ce"],
            "ce_end": gen_h[-1]["ce"], "steps": s.generator_steps, "wall_s": time.perf_counter() - start}


def table(runs) -> str:
    """The study as a markdown table (every run, in the order run)."""
    lines = ["| teacher | run | seed | steps | teacher top-1 on generated | verifier top-1 | "
             "student | moment start -> end | ce start -> end | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        v = r.get("verifier_top1_on_generated")
        st = r.get("student_accuracy")
        lines.append(
            f"| {r['teacher']} | {r['name']} | {r['seed']} | {r['steps']} | "
            f"{r['teacher_top1_on_generated'] * 100:.1f}% | {'' if v is None else f'{v * 100:.1f}%'} | "
            f"{'' if st is None else f'{st * 100:.2f}%'} | {r['moment_start']:.4g} -> {r['moment_end']:.4g} | "
            f"{r['ce_start']:.3g} -> {r['ce_end']:.3g} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main():
    if sys.argv[1:] == ["table"]:
        print(table(json.loads(OUT.read_text())))
        return
    which, name, *pairs = sys.argv[1:]
    rec = {"lite0": lite0, "digits": digits}[which](name, pairs)
    rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs = json.loads(OUT.read_text()) if OUT.exists() else []
    runs.append(rec)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(runs, indent=1))
    print("STUDY", json.dumps({k: v for k, v in rec.items() if k not in ("curve", "teacher_top1_per_class")}))


if __name__ == "__main__":
    main()
