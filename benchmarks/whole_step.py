"""The whole generator step, providers interleaved in one process (issue 22's measurement).

    python -m benchmarks.whole_step --teacher resnet56 [--rounds 5] [--providers hooks,hooks-compiled,...]

One step: the ensemble, the teacher, DeepInversion's moment loss plus cross-entropy, gradients of
every generator parameter (:func:`benchmarks.providers.generator_step`; the generators on grouped
convolutions for every provider, except the fastdfd ones named ``...-gen[-cl]``, which run fastdfd's own
generator kernels, the step as a fastdfd user runs it; ``-cl``: the teacher channels_last). Teachers: ``digits`` (the digits CNN, 10 generators x 16 images
at 16 px), ``resnet56`` (the pretrained CIFAR ResNet-56 where ``../shared/data/cifar10`` has it,
10 x 25 at 32 px), ``lite0`` (EfficientNet-Lite0, 10 x 8 at 64 px). Every provider is built and
warmed (compiled) first; then each round times one step of every provider in turn, so a drift of
the machine's speed reaches all of them alike. Prints each provider's median and its ratios
against the eager and the compiled hooks; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from .providers import WHOLE_STEPS, whole_step

# fastdfd-cpp-unfused: the matcher without its epilogues (fuse_epilogues=False), the A/B of that fusion;
# fastdfd-cpp-actonly (not in the default list): the activations fused, the residual adds not
PROVIDERS = ("hooks", "hooks-compiled", "fastdfd-cpp-unfused", "fastdfd-cpp", "fastdfd-cpp-compiled")
TEACHERS = tuple(WHOLE_STEPS)


def measure(teacher_name: str, providers, rounds: int, inner: int = 1, verbose: bool = True) -> dict:
    steps, warm = {}, {}
    for p in providers:
        t0 = time.perf_counter()
        step, _ = whole_step(teacher_name, p)
        step()
        step()  # a compiled provider's second call runs the compiled graph alone
        warm[p] = time.perf_counter() - t0
        steps[p] = step
        if verbose:
            print(f"{p}: built and warmed in {warm[p]:.1f} s", flush=True)
    times = {p: [] for p in providers}
    for _ in range(rounds):
        for p in providers:
            t0 = time.perf_counter()
            for _ in range(inner):
                steps[p]()
            times[p].append((time.perf_counter() - t0) / inner)
    median = {p: statistics.median(v) for p, v in times.items()}
    rows = {}
    for p in providers:
        row = {"median_ms": median[p] * 1e3, "times_ms": [t * 1e3 for t in times[p]], "warm_s": warm[p]}
        for anchor in ("hooks", "hooks-compiled"):
            if anchor in median:
                row[f"x_vs_{anchor}"] = median[anchor] / median[p]
        rows[p] = row
    return {"teacher": teacher_name, "rounds": rounds, "inner": inner, "providers": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", choices=TEACHERS, required=True)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner", type=int, default=0, help="steps per timing (default: 20 for digits, else 1)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    inner = args.inner or (20 if args.teacher == "digits" else 1)
    record = measure(args.teacher, args.providers.split(","), args.rounds, inner)
    for p, row in record["providers"].items():
        ratios = "  ".join(f"{v:.2f}x {k[5:]}" for k, v in row.items() if k.startswith("x_vs_"))
        print(f"{args.teacher} {p:22s} {row['median_ms']:9.2f} ms  {ratios}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
