"""Data-parallel scaling of generator training on CPU processes (gloo), and the all-reduce volume.

    python benchmarks/scaling_cpu.py [--generators 16 --steps 40 --batch 16]

Runs `fastdfd train-generators` (scope="ensemble": one all-reduce of the packed moment sums
per step) as 1 process and under torchrun as 2, each process on one thread, the same global
ensemble and images per step, and prints the global images/s of both (from metrics.csv,
the median over the run) and the bytes each step's all-reduce moves for common teachers.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from fastdfd.models import create_model


def allreduce_bytes(model: nn.Module) -> int:
    """S1 and S2 over every BN channel, fp32: what one step's all-reduce moves per rank."""
    return 2 * 4 * sum(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def run(procs: int, out: Path, teacher: Path, args) -> float:
    cli = ["-m", "fastdfd", "train-generators", "--teacher", "digits_teacher", "--weights", str(teacher),
           "--num-classes", "16", "--generators", str(args.generators), "--channels", "1", "--image-size", "16",
           "--widths", "32,16", "--latent-dim", "64", "--batch-size", str(args.batch), "--steps", str(args.steps),
           "--scope", "ensemble", "--checkpoint-every", "0", "--device", "cpu", "--out", str(out)]
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={procs}"]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
    subprocess.run(launcher + cli, check=True, env=env, capture_output=True)
    with open(out / "metrics.csv") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f)][1:]  # the first window holds start-up
    return statistics.median(rates) * procs  # rank 0 logs its own images; every rank makes as many


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.save(create_model("digits_teacher", num_classes=16).state_dict(), tmp / "teacher.pt")
        one = run(1, tmp / "one", tmp / "teacher.pt", args)
        two = run(2, tmp / "two", tmp / "teacher.pt", args)
    print(f"global images/s: 1 process {one:.0f}, 2 processes {two:.0f} ({two / one:.2f}x; "
          f"{os.cpu_count()} CPUs on this machine)")
    for name in ("digits_teacher", "resnet34", "resnet50_imagenet"):
        print(f"all-reduce per step, {name}: {allreduce_bytes(create_model(name, num_classes=10)) / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
