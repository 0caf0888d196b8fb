"""Where the cpp tap's time goes on a CPU, beside ``make bench``'s whole-layer ratios.

1. The extension's kernels called directly (no autograd, no custom-op layer) against ATen's own
   copy and add of the same tensors into fresh outputs: forward (read x, write y) against
   ``x.clone()``, backward (read x and dy, write dx) against ``torch.add(x, dy)``. NCHW and
   channels_last, at the bench's CIFAR ResNet-34 layer shapes, batch 256.
2. The fixed cost of one BN-layer step (forward and backward through ``MomentMatcher``, or the
   hooks) at a layer too small for its kernels to matter, [2, 512, 1, 1]: the Python, dispatch and
   autograd work per call.

    python -m benchmarks.cpu_tap_breakdown      # medians in ms / us; ratios are what to read
"""

from __future__ import annotations

import time

import torch
from torch import nn

from benchmarks.providers import bn_layer_step, randomize_bn
from fastdfd.ops import extensions

LAYERS = [(64, 32), (128, 16), (256, 8), (512, 4)]
BATCH = 256


def median_time(fn, rounds: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[rounds // 2]


def kernels_against_copies() -> None:
    ext, why = extensions.load("cpu")
    if ext is None:
        raise SystemExit(f"the cpu extension is unavailable: {why}")
    g = torch.Generator().manual_seed(0)
    print("kernels called directly, median ms (ratio to ATen's copy / add of the same tensors)")
    for c, s in LAYERS:
        for channels_last in (False, True):
            x = torch.randn(BATCH, c, s, s, generator=g)
            dy = torch.randn(BATCH, c, s, s, generator=g)
            if channels_last:
                x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
            strides = (x.stride(0), x.stride(1), x.stride(3))
            mean, var = 0.2 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)
            w, b = 1 + 0.2 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
            ds1, ds2 = torch.randn(1, c, generator=g), torch.randn(1, c, generator=g)
            fwd = median_time(lambda: ext.tap_forward(x, mean, var, w, b, 1e-5, 1, True, *strides, 0, 0.0, None))
            bwd = median_time(lambda: ext.tap_backward(x, dy, ds1, ds2, mean, var, w, b, 1e-5, 1, *strides, 0,
                                                       0.0, None))
            copy = median_time(lambda: x.clone())
            add = median_time(lambda: torch.add(x, dy))
            layout = "channels_last" if channels_last else "NCHW"
            print(f"  c{c} s{s} {layout:<13} forward {fwd * 1e3:7.2f} ({fwd / copy:4.2f}x clone {copy * 1e3:6.2f})"
                  f"   backward {bwd * 1e3:7.2f} ({bwd / add:4.2f}x add {add * 1e3:6.2f})")


def fixed_cost_per_call() -> None:
    print("one BN-layer step at [2, 512, 1, 1], median us (the per-call cost)")
    for provider in ("hooks", "hooks-compiled", "fastdfd-cpp"):
        bn = randomize_bn(nn.BatchNorm2d(512))
        x = torch.randn(2, 512, 1, 1).requires_grad_(True)
        dy = torch.randn(2, 512, 1, 1)
        step, cleanup = bn_layer_step(provider, bn)
        t = median_time(lambda: step(x, dy), rounds=201, warmup=20)
        cleanup()
        print(f"  {provider:<15} {t * 1e6:6.0f}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    kernels_against_copies()
    fixed_cost_per_call()
