"""The scaling sweep's table and plot: how time, memory and quality move as the ensemble grows.

    python -m benchmarks.imagenet_scaling runs/in1k/k10 runs/in1k/k100 runs/in1k/k1000 --plot scaling.png
    python -m benchmarks.imagenet_scaling --time 10,100,1000 [--rounds 3] [--out timing.json]

Each argument is an ``OUT`` of ``benchmarks/imagenet_ensemble.py`` (its ``result.json``); the runs are meant to
share a per-generator budget (``--steps-per-generator``) so that every column compares equal work per generator.

The runs' own seconds per generator-step are wall-clock averages of runs made one after the other, minutes or an
hour apart; on a shared virtual machine the same step's time drifts by tens of percent over an hour (measured
here: 36.5 ms per generator-step for K = 10 at one time, 50.8 ms an hour later, the code unchanged). ``--time``
therefore measures the step of every K in one process, in alternating rounds (K = 10, 100, 1000, 10, 100,
...), each with the memory planner's automatic chunk, and reports each K's median against the smallest K's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 2**30


def load(dirs) -> list[dict]:
    runs = [json.loads((Path(d) / "result.json").read_text()) for d in dirs]
    return sorted(runs, key=lambda r: (r["generators"], r["seed"]))


def table(runs: list[dict]) -> str:
    base = runs[0]["seconds_per_generator_step"]
    rows = ["| K | seed | chunk | steps per generator | ms per generator-step (vs the smallest K) | step ms | checkpoint s "
            "(ms per generator) | quality ms per image | memory measured / planner (GiB) | checkpoint MiB | "
            "teacher top-1 | verifier top-1 | distinct images per class | collapsed classes |",
            "|---:|---:|---:|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        m = r["memory"]
        pred = m["planner_predicted_bytes"]
        step_ms = r["train_seconds"] / max(1, r["steps"]) * 1e3
        v = r.get("verifier_top1_fresh")
        rows.append(
            f"| {r['generators']} | {r['seed']} | {r['chunk']} | {r['steps_per_generator']:.1f} | "
            f"{r['seconds_per_generator_step'] * 1e3:.1f} ({r['seconds_per_generator_step'] / base:.2f}x) | "
            f"{step_ms:.0f} | {r['checkpoint_seconds']:.2f} ({r['checkpoint_seconds_per_generator'] * 1e3:.1f}) | "
            f"{r.get('quality_seconds_per_image', float('nan')) * 1e3:.2f} | "
            f"{m['measured_bytes'] / GIB:.2f} / {(pred or 0) / GIB:.2f} ({m['measured_over_predicted'] or 0:.2f}) | "
            f"{r['checkpoint_bytes'] / 2**20:.0f} | {r.get('teacher_top1_fresh', float('nan')) * 100:.2f}% | "
            f"{'' if v is None else f'{v * 100:.2f}%'} | {r.get('effective_images_mean') or float('nan'):.2f} | "
            f"{r.get('collapsed_classes', '')} |")
    return "\n".join(rows)


def plot(runs: list[dict], path: Path, timing: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ks = [r["generators"] for r in runs]
    runs_by_k = {}
    for r in runs:  # memory: one run per K (the first seed)
        runs_by_k.setdefault(r["generators"], r)
    axes[0].plot(ks, [r["seconds_per_generator_step"] * 1e3 for r in runs], "o", label="each run's mean")
    if timing:
        tk = sorted(timing["per_k"], key=int)
        axes[0].plot([int(k) for k in tk], [timing["per_k"][k]["median"] * 1e3 for k in tk], "s-",
                     label=f"interleaved, one process (median of {timing['rounds']})")
    axes[0].legend(fontsize=8)
    axes[0].set_xscale("log")
    axes[0].set_ylim(bottom=0)
    axes[0].set_xlabel("generators K")
    axes[0].set_ylabel("ms per generator-step")
    axes[0].set_title("time per generator-step")
    one = [runs_by_k[k] for k in sorted(runs_by_k)]
    axes[1].plot(sorted(runs_by_k), [r["memory"]["measured_bytes"] / GIB for r in one], "o-", label="measured (peak RSS)")
    axes[1].plot(sorted(runs_by_k), [(r["memory"]["planner_predicted_bytes"] or 0) / GIB for r in one], "s--",
                 label="memory planner")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("generators K")
    axes[1].set_ylabel("GiB")
    axes[1].set_title("the run's memory")
    axes[1].legend(fontsize=8)
    for r in runs:
        c = r["curve"]
        axes[2].plot([p["steps_per_generator"] for p in c], [p["teacher_top1_fresh"] * 100 for p in c], "o-",
                     label=f"K = {r['generators']}, seed {r['seed']}", ms=3)
    axes[2].set_xlabel("steps per generator")
    axes[2].set_ylabel("teacher top-1 on fresh images (%)")
    axes[2].set_title("quality at equal work per generator")
    axes[2].legend(fontsize=8)
    r0 = runs[-1]
    fig.suptitle(f"{r0['teacher'].split(' ')[0]}, one-class generators at {r0['image_size']} px, "
                 f"{r0['batch_size']} images each per step; {r0['machine']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def interleaved_timing(ks: list[int], rounds: int = 3, generator_steps: int = 400, seed: int = 0) -> dict:
    """Seconds per generator-step of each K, measured in alternating rounds in this process (module docstring)."""
    import statistics
    import time

    import torch

    from benchmarks.efficientnet_lite import load_efficientnet_lite
    from benchmarks.imagenet_ensemble import build, parser

    teacher = load_efficientnet_lite("efficientnet-lite0")
    trainers = {}
    for k in ks:
        args = parser().parse_args(["--out", "unused", "--generators", str(k), "--seed", str(seed)])
        args.chunk = "auto"
        trainers[k] = build(args, teacher)[1]
        trainers[k].fit(1)  # warm-up: first-call costs (allocations, kernel selection) out of the rounds
    times = {k: [] for k in ks}
    for _ in range(rounds):
        for k, tr in trainers.items():
            steps = max(2, generator_steps // tr.schedule.chunk)
            t0 = time.perf_counter()
            tr.fit(steps)
            times[k].append((time.perf_counter() - t0) / (steps * tr.schedule.chunk))
    base = statistics.median(times[ks[0]])
    return {"rounds": rounds, "threads": torch.get_num_threads(),
            "per_k": {str(k): {"chunk": trainers[k].schedule.chunk, "seconds_per_generator_step": times[k],
                               "median": statistics.median(times[k]),
                               "median_over_smallest_k": statistics.median(times[k]) / base} for k in ks}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--time", default=None, help="comma-separated K: interleaved timing instead of the table")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="the timing's JSON")
    p.add_argument("--timing", type=Path, default=None, help="a --time JSON to draw beside the runs' means")
    args = p.parse_args(argv)
    if args.time:
        result = interleaved_timing([int(k) for k in args.time.split(",")], args.rounds)
        for k, r in result["per_k"].items():
            cells = ", ".join(f"{t * 1e3:.1f}" for t in r["seconds_per_generator_step"])
            print(f"K={k} (chunk {r['chunk']}): {cells} ms per generator-step; median {r['median'] * 1e3:.1f} ms, "
                  f"{r['median_over_smallest_k']:.2f}x the smallest K's")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return
    runs = load(args.runs)
    print(table(runs))
    if args.plot:
        plot(runs, args.plot, json.loads(args.timing.read_text()) if args.timing else None)


if __name__ == "__main__":
    main()
