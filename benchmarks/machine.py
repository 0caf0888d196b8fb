"""The machine a benchmark's figures belong to, in one line for its record."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, vector ISA, core count, torch build and threads: step counts (and so every figure reached in a
    fixed time budget) differ between development machines of the same core count (an AVX2 EPYC took 1.4x as long
    per CIFAR-10 generator step as the AVX-512 machine before it)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = f"{platform.machine()} {names[0]}" if names else model
    return (f"{model} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
