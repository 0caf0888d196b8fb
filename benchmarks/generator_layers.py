"""The ``cpp`` generator kernels layer by layer, at the whole-step cases' sizes (issue 22).

    python -m benchmarks.generator_layers [--case resnet56|digits|lite0] [--repeats 10] [--json OUT]

Each layer of the case's K generators (:data:`benchmarks.providers.WHOLE_STEPS`: ResNet-56's 10 x 25 images at
32 px with widths 128/64, the digits demo's, Lite0's) is timed through the backend's launchers, forward and
backward, on random inputs of the layer's shape (median of ``--repeats``). GFLOP/s count the work the kernel
must do: 2 * CIN * COUT * taps multiply-adds per output pixel, with 4 taps after the x2 upsample (the
sub-pixel decomposition) and 9 without; the backward twice that (the input's and the weights' gradients).
The prologue, the upsample and the output sums are not counted, so a layer whose time goes to them shows a
low rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fastdfd import GeneratorEnsemble
from fastdfd.ops.generator.custom_op import GEN_LAUNCHERS, LEAKY_SLOPE

from .machine import machine
from .providers import WHOLE_STEPS


def layers(case: str) -> list[dict]:
    """The conv layers of a case's generators: (name, K, B, CIN, COUT, input side, upsample, tanh, prologue)."""
    k, batch, classes, size, channels, latent, widths = WHOLE_STEPS[case]
    ens = GeneratorEnsemble(k, classes, image_size=size, channels=channels, latent_dim=latent, widths=widths,
                            output_bn=False)
    params = ens.stacked()
    side, out = ens.spec.init_size, []
    for i in range(len(widths)):
        w = params[f"conv{i}_weight"]
        out.append(dict(name=f"conv{i}", K=k, B=batch, CIN=w.shape[2], COUT=w.shape[1], side=side, upsample=2,
                        tanh=False))
        side *= 2
    w = params["out_weight"]
    out.append(dict(name="out", K=k, B=batch, CIN=w.shape[2], COUT=w.shape[1], side=side, upsample=1, tanh=True))
    return out


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(case: str, repeats: int = 10, backend: str = "cpp", seed: int = 0) -> dict:
    launch = GEN_LAUNCHERS[backend]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for layer in layers(case):
        k, b, cin, cout, side, up = (layer[n] for n in ("K", "B", "CIN", "COUT", "side", "upsample"))
        x = torch.randn(k, b, cin, side, side, generator=g)
        scale, shift = 0.5 + torch.rand(k, cin, generator=g), 0.1 * torch.randn(k, cin, generator=g)
        weight = torch.randn(k, cout, cin, 3, 3, generator=g) / (3 * cin**0.5)
        bias = torch.randn(k, cout, generator=g) if layer["tanh"] else None  # only the image layer has one
        flags = (up, LEAKY_SLOPE, layer["tanh"])
        y, _, _ = launch["conv_forward"](x, scale, shift, weight, bias, *flags, True)
        dy, d1, d2 = torch.randn(y.shape, generator=g), torch.randn(k, cout, generator=g), torch.zeros(k, cout)
        forward_ms = _median_ms(lambda: launch["conv_forward"](x, scale, shift, weight, bias, *flags, True), repeats)
        backward_ms = _median_ms(lambda: launch["conv_backward"](x, scale, shift, weight, y, dy, d1, d2, *flags),
                                 repeats)
        taps = 4 if up == 2 else 9
        flops = 2 * k * b * cin * cout * taps * (side * up) ** 2
        rows.append(dict(layer, forward_ms=forward_ms, backward_ms=backward_ms,
                         forward_gflops=flops / forward_ms / 1e6, backward_gflops=2 * flops / backward_ms / 1e6))
    return {"case": case, "backend": backend, "repeats": repeats, "layers": rows,
            "total_ms": sum(r["forward_ms"] + r["backward_ms"] for r in rows), "machine": machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=tuple(WHOLE_STEPS), default="resnet56")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    record = measure(args.case, args.repeats)
    for r in record["layers"]:
        print(f"{args.case} {r['name']:6s} K{r['K']} B{r['B']} {r['CIN']:4d} -> {r['COUT']:<4d} {r['side']:3d} px "
              f"x{r['upsample']}: forward {r['forward_ms']:7.1f} ms ({r['forward_gflops']:5.1f} GFLOP/s), "
              f"backward {r['backward_ms']:7.1f} ms ({r['backward_gflops']:5.1f} GFLOP/s)")
    print(f"{args.case}: all layers, forward + backward {record['total_ms']:.1f} ms ({record['machine']})")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
