"""The CIFAR-10 benchmark's distillation step as the library ran it before and with its speed knobs, interleaved
in one process: the teacher's labels from its BN-folded copy (``DistillSettings.fold_teacher``,
:mod:`fastdfd.train.labeller`), then the student channels_last too (``DistillSettings.channels_last``), then
that labelling forward under bf16 autocast too (``DistillSettings.autocast``; a speed-up only where the CPU
computes in bf16, AVX-512 BF16 or AMX: :func:`fastdfd.train.bf16.cpu_computes_bf16`; on an AVX2 CPU 4.6x slower).

    python -m benchmarks.distill_step --data ../shared/data/cifar10 [--rounds 7] [--steps 4] [--json OUT]

The last case is the step :mod:`benchmarks.cifar10_datafree` runs by default where the CPU computes in bf16 (its
labels in bf16 since the thirteenth knob of docs/cifar10.md), the one before it elsewhere: 130 images drawn from a pool the
generators filled, crop and flip, CutMix, the pretrained ResNet-56 labelling the mixes, a ResNet-20 student's
forward, backward and SGD update. The distillers share one pool (filled by a few generator steps first) and
start from one student; each round times ``--steps`` steps of each in turn, the order rotated round by round, so
a drift of the machine's speed reaches all alike. Prints the medians per step and their ratios to the first;
``--json`` writes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.cifar10_datafree import DISTILL, INPUT_SPACE, Settings, _teacher, generator_settings
from benchmarks.machine import machine
from fastdfd.models import create_model
from fastdfd.nn import GeneratorEnsemble
from fastdfd.ops import extensions
from fastdfd.settings import LoopSettings
from fastdfd.train import Distiller, GeneratorTrainer
from fastdfd.train.pool import ImagePool

# each case: DistillSettings fields laid over the benchmark's DISTILL; the first is the anchor of the ratios
# (every field a case names is named in each, so a change of DISTILL's defaults cannot merge two cases)
CASES = {"as_is": {"fold_teacher": False, "channels_last": False, "autocast": False},
         "folded": {"fold_teacher": True, "channels_last": False, "autocast": False},
         "folded_channels_last": {"fold_teacher": True, "channels_last": True, "autocast": False},
         "folded_channels_last_bf16_labels": {"fold_teacher": True, "channels_last": True, "autocast": True}}


def measure(data: str, rounds: int, steps: int, fill_steps: int = 4, verbose: bool = True) -> dict:
    extensions.load("cpu")
    torch.manual_seed(0)
    s = Settings(data=data)
    teacher = _teacher(s)
    g = generator_settings(s)
    a = g.architecture
    ensemble = GeneratorEnsemble(10, 10, image_size=32, channels=3, latent_dim=a.latent_dim, widths=a.widths,
                                 output_bn=a.output_bn)
    pool = ImagePool(5000)
    loop = LoopSettings(seed=0, progress=False, log_every=steps)
    GeneratorTrainer(teacher, ensemble, loss=g.loss, optim=g.optimizer, loop=loop, pool=pool,
                     input_space=INPUT_SPACE).fit(fill_steps)
    student = create_model(f"cifar_{s.student}", num_classes=10)
    distillers = {name: Distiller(teacher, copy.deepcopy(student), ensemble, loop=loop, pool=pool,
                                  input_space=INPUT_SPACE, settings=replace(DISTILL, **case))
                  for name, case in CASES.items()}
    for d in distillers.values():
        d.fit(2)  # warm: the folded copy is traced on its first call
    times = {name: [] for name in CASES}
    names = list(CASES)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            d = distillers[name]
            t0 = time.perf_counter()
            d.fit(steps)
            times[name].append((time.perf_counter() - t0) / steps)
    median = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "step": "pool draw of 130, crop_flip, cutmix, ResNet-56 labels, ResNet-20 update",
        "rounds": rounds, "steps_per_round": steps, "threads": torch.get_num_threads(),
        "median_ms": {name: m * 1e3 for name, m in median.items()},
        "times_ms": {name: [t * 1e3 for t in v] for name, v in times.items()},
        "cases": CASES,
        "x_vs_as_is": {name: median["as_is"] / m for name, m in median.items()},
        "labeller_reason": distillers["folded"].labeller.reason,
        "machine": machine(), "torch": torch.__version__,
    }
    if verbose:
        print(json.dumps({k: v for k, v in result.items() if k != "times_ms"}, indent=1), flush=True)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.steps < 1:
        p.error("--rounds and --steps must be positive")
    if not (Path(a.data) / "resnet56.th").exists():
        p.error(f"{a.data} holds no resnet56.th (the pretrained CIFAR-10 teacher, see docs/cifar10.md)")
    result = measure(a.data, a.rounds, a.steps)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
