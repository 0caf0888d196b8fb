"""The GPU suite: correctness at real sizes first, then every provider timed, in one run.

    python benchmarks/gpu_suite.py [--out benchmarks/results] [--skip-compiled]

Budget: under 4 minutes on one H100. Sections, each written to the JSON as it finishes
(a run cut short still leaves its data):

1. device-to-device copy bandwidth (the roofline every GB/s figure is set against);
2. correctness: the moment loss and dx of one BN layer at the layer shapes of CIFAR
   ResNet-34 (batch 256) and ImageNet ResNet-50 (batch 64, 224 px), fp32 and bf16, for
   every provider against the float64 torch reference (bf16 rule: |ours - ref64| <=
   2 |torch_bf16 - ref64| + atol, as flash-attention's tests);
3. timing of one BN layer forward+backward per provider: median ms, effective GB/s
   (5 x activation bytes: the fused design's forward read+write and backward 2 reads +
   1 write) and its share of the copy bandwidth, speed-up against ``hooks``;
4. a whole generator-training step: 64 generators x 32 images with a CIFAR ResNet-34
   teacher, and 8 x 16 images at 224 px with an ImageNet ResNet-50 teacher (bf16
   autocast): ms, images/s, peak memory, and the loss against ``hooks``; the generators run
   as grouped convolutions for every provider, plus one run of the triton tap with the
   step-4 generator kernels (``fastdfd-triton+gen-triton``);
5. K generators at once (benchmarks/ensemble_suite.py): the Triton path against float64
   at the CIFAR generator's size (fp32, bf16), then sampling and training of 64 x 64,
   1000 x 4 and 8 x 128 generators x images at 32 px for every provider of
   benchmarks/ensemble_providers.py (Python loop, CUDA-graph loop, vmap, grouped conv
   eager and compiled, fastdfd-triton), bf16 parameters; then whole GeneratorTrainer steps
   eager against CUDA-graph replay (``cuda_graph=True``) at the digits demo's and CIFAR size:
   images/s, speed-up, and the largest parameter difference after the same 6 steps;
6. ImageNet generator training (benchmarks/imagenet_suite.py): ResNet-50 at 224 px, 1000
   generators, 16 per step x 8 images, hooks + Python loop against fastdfd: images/s per
   GPU, and the GPU-hours of an assumed synthesis budget beside the published ones.

Every timed row carries the H200 performance model's prediction beside the measurement
(benchmarks/perf_model.py: ``predicted_ms``, ``roofline_ms``, ``measured_over_predicted``,
``roofline_fraction`` = roofline / measured, and the predicted speed-ups over the anchors), so
the first run on a card says at once where each kernel stands against its limit.
``--budget-s`` stops starting new work after that many seconds and records what it skipped
(benchmarks/device_check.py runs the suite inside a 4-minute card check).

``--tiny`` runs the same code at toy sizes on the CPU (Triton interpreter) so the script
itself is tested without a GPU; its predictions are still the H200's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ensemble_suite import (  # noqa: E402
    CASES,
    ENSEMBLE_PROVIDERS,
    TINY_CASES,
    check_ensembles,
    time_cuda_graph,
    time_ensembles,
)
from benchmarks.ensemble_suite import GRAPH_CASES, TINY_GRAPH_CASES  # noqa: E402
from benchmarks.imagenet_suite import time_imagenet  # noqa: E402
from benchmarks import perf_model  # noqa: E402
from benchmarks.providers import PROVIDERS, bn_layer_step, generator_step, randomize_bn  # noqa: E402

CIFAR_R34 = [(256, 64, 32), (256, 128, 16), (256, 256, 8), (256, 512, 4)]
IMAGENET_R50 = [(64, 64, 112), (64, 64, 56), (64, 256, 56), (64, 128, 28), (64, 512, 28),
                (64, 256, 14), (64, 1024, 14), (64, 512, 7), (64, 2048, 7)]
TINY = [(4, 3, 5), (6, 8, 3)]
# (name, teacher, classes, channels, generators, images each, size, widths, bf16 autocast)
STEP_CASES = [("cifar-r34 64 gens x 32 img, 32 px, bf16", "resnet34", 10, 3, 64, 32, 32, (128, 64), True),
              ("imagenet-r50 8 gens x 16 img, 224 px, bf16", "resnet50_imagenet", 1000, 3, 8, 16, 224, (128, 64), True)]
TINY_STEP_CASES = [("tiny digits-like", "digits_teacher", 10, 1, 4, 3, 16, (8, 4), False)]
SECTIONS = ("moments", "steps", "ensembles", "imagenet")


# ------------------------------------------------------------------------------ helpers
def bench(fn, device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of fn() (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, numel: int) -> float:
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, warmup=5, reps=30)
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def machine_info(device: torch.device) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    else:
        info.update(card=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)")
    return info


def make_layer(n, c, s, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = randomize_bn(torch.nn.BatchNorm2d(c), seed).to(device)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
        bn.bias.copy_(0.1 * torch.randn(c, generator=g))
    x = (0.2 + torch.randn(n, c, s, s, generator=g)).to(device, dtype).requires_grad_(True)
    dy = torch.randn(n, c, s, s, generator=g).to(device, dtype)
    return bn, x, dy


def reference64(bn, x, dy):
    bn64 = torch.nn.BatchNorm2d(bn.num_features).to(x.device).double().eval()
    bn64.load_state_dict(bn.state_dict())
    step, cleanup = bn_layer_step("fastdfd-torch", bn64)
    loss, dx = step(x.detach().double().requires_grad_(True), dy.double())
    cleanup()
    return loss, dx


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _past(deadline: float, report: dict, what: str) -> bool:
    """True (and the skip recorded) once the run's time budget is spent: a short device lease
    keeps what finished rather than losing everything to an overrun."""
    if time.perf_counter() < deadline:
        return False
    report.setdefault("skipped", []).append({"what": what, "reason": "time budget spent"})
    return True


def attach_predictions(rows, predictions, key, ms_field="ms"):
    """Writes the H200 model's prediction (benchmarks/perf_model.py) beside each measured row."""
    by_key = {(p.case, p.provider): p for p in predictions}
    for r in rows:
        pred = by_key.get(key(r))
        if pred is not None and ms_field in r:
            r.update(perf_model.measured_vs_predicted(r[ms_field], pred))
    return rows


def _predicted(make, report):
    """The model's predictions, or [] with the error recorded (a model bug must not cost a measurement)."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001
        report.setdefault("model_errors", []).append(f"{type(e).__name__}: {e}"[:300])
        return []


def _vs_model(r) -> str:
    if "predicted_ms" not in r:
        return ""
    return f"  | H200 model {r['predicted_ms']:8.3f} ms, x{r['measured_over_predicted']:5.2f}, roofline {100 * r['roofline_fraction']:5.1f}%"


# ----------------------------------------------------------------------------- sections
def check_layers(shapes, dtypes, providers, device, report, deadline=float("inf")):
    rows = []
    for n, c, s in shapes:
        if _past(deadline, report, f"correctness from shape {[n, c, s, s]} on"):
            break
        for dtype in dtypes:
            bn, x, dy = make_layer(n, c, s, dtype, device)
            ref_loss, ref_dx = reference64(bn, x, dy)
            errs = {}
            for p in providers:
                step, cleanup = bn_layer_step(p, bn)
                loss, dx = step(x, dy)
                errs[p] = (abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)), rel(dx, ref_dx))
                cleanup()
            for p in providers:
                if dtype == torch.float32:
                    ok = errs[p][0] < 1e-3 and errs[p][1] < 1e-4
                else:  # low precision: no worse than twice eager torch in the same dtype, plus slack
                    base = errs.get("fastdfd-torch", errs["hooks"])
                    ok = errs[p][0] <= 2 * base[0] + 1e-3 and errs[p][1] <= 2 * base[1] + 1e-3
                rows.append({"shape": [n, c, s, s], "dtype": str(dtype).replace("torch.", ""), "provider": p,
                             "loss_rel_err": errs[p][0], "dx_rel_err": errs[p][1], "ok": bool(ok)})
        report["correctness"] = rows
    return rows


def time_layers(shapes, dtypes, providers, device, copy_gbps, report, reps, deadline=float("inf")):
    rows = []
    for n, c, s in shapes:
        if _past(deadline, report, f"layer timings from shape {[n, c, s, s]} on"):
            break
        for dtype in dtypes:
            bn, x, dy = make_layer(n, c, s, dtype, device)
            ideal_bytes = 5 * x.numel() * x.element_size()
            times = {}
            for p in providers:
                step, cleanup = bn_layer_step(p, bn)
                times[p] = bench(lambda: step(x, dy), device, reps=reps)
                cleanup()
            for p, ms in times.items():
                gbps = ideal_bytes / (ms * 1e-3) / 1e9
                rows.append({"shape": [n, c, s, s], "dtype": str(dtype).replace("torch.", ""), "provider": p,
                             "ms": ms, "gbps": gbps, "copy_fraction": gbps / copy_gbps,
                             "speedup_vs_hooks": times["hooks"] / ms})
            report["layers"] = rows
    return rows


def time_steps(cases, providers, device, report, reps, generator_kernels=True):
    from fastdfd import GeneratorEnsemble
    from fastdfd.models import create_model

    rows = []
    for name, teacher_name, num_classes, channels, k, b, size, widths, autocast in cases:
        torch.manual_seed(0)
        teacher = randomize_bn(create_model(teacher_name, num_classes=num_classes)).to(device)
        ens = GeneratorEnsemble(k, num_classes, image_size=size, channels=channels, widths=widths,
                                classes=[[i % num_classes] for i in range(k)]).to(device)
        results = {}
        # the last entry: step 2's tap with step 4's generator kernels, against the same tap
        # with grouped-conv generators ("fastdfd-triton")
        runs = [(p, p, "torch") for p in providers]
        if "fastdfd-triton" in providers and generator_kernels:
            runs.append(("fastdfd-triton+gen-triton", "fastdfd-triton", "triton"))
        for label, p, gen_backend in runs:
            step, cleanup = generator_step(p, teacher, ens, b, generator_backend=gen_backend)
            ctx = torch.autocast(device.type, torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx:
                loss, _ = step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                ms = bench(step, device, warmup=2, reps=reps)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            results[label] = (ms, float(loss), peak)
            cleanup()
        for p, (ms, loss, peak) in results.items():
            rows.append({"case": name, "provider": p, "ms": ms, "images_per_s": k * b / (ms * 1e-3),
                         "speedup_vs_hooks": results["hooks"][0] / ms, "loss": loss,
                         "loss_rel_diff_vs_hooks": abs(loss - results["hooks"][1]) / abs(results["hooks"][1]),
                         "peak_gib": peak,
                         **({"speedup_vs_grouped_conv_generators": results["fastdfd-triton"][0] / ms}
                            if p == "fastdfd-triton+gen-triton" else {})})
        report["steps"] = rows
    return rows


# --------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (Triton interpreter)")
    parser.add_argument("--skip-compiled", action="store_true", help="leave out hooks-compiled (saves compile time)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (to fit a short device lease)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop starting new work after this many seconds; what is skipped is recorded")
    args = parser.parse_args(argv)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; expected some of {SECTIONS}")
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    providers = [p for p in PROVIDERS if not (p == "hooks-compiled" and (args.skip_compiled or args.tiny))]
    torch._dynamo.config.cache_size_limit = 64
    info = machine_info(device)
    slug = re.sub(r"[^a-z0-9]+", "-", info["card"].lower()).strip("-")
    out = Path(args.out) / f"gpu-suite-{slug}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "providers": providers, "sections": sections}
    bad: list = []

    def save():
        out.write_text(json.dumps(report, indent=1))

    started = time.perf_counter()
    deadline = started + args.budget_s
    report["copy_gbps"] = copy_bandwidth(device, 2**16 if args.tiny else 2**28)
    save()
    print(f"{info['card']}: device copy {report['copy_gbps']:.0f} GB/s; torch {info['torch']}, triton {info['triton']}")

    dtypes = [torch.float32] if args.tiny else [torch.float32, torch.bfloat16]
    if "moments" in sections and not _past(deadline, report, "section moments"):
        shapes = TINY if args.tiny else CIFAR_R34 + IMAGENET_R50
        checks = check_layers(shapes, dtypes, providers, device, report, deadline)
        save()
        bad += [r for r in checks if not r["ok"]]
        print(f"correctness: {len(checks) - len(bad)}/{len(checks)} provider x case checks within tolerance")
        for r in bad:
            print(f"  FAIL {r['provider']} {r['shape']} {r['dtype']}: loss {r['loss_rel_err']:.2e} dx {r['dx_rel_err']:.2e}")

        layers = time_layers(shapes, dtypes, providers, device, report["copy_gbps"], report,
                             reps=3 if args.tiny else 20, deadline=deadline)
        attach_predictions(layers, _predicted(lambda: perf_model.layer_predictions(shapes, dtypes, providers), report),
                           lambda r: (f"{r['shape']} {r['dtype']}", r["provider"]))
        save()
        print("\none BN layer, forward+backward (median ms; GB/s as a share of copy bandwidth; speed-up vs hooks)")
        for r in layers:
            print(f"  {str(r['shape']):<22} {r['dtype']:<9} {r['provider']:<15} {r['ms']:8.3f} ms "
                  f"{r['gbps']:8.0f} GB/s {100 * r['copy_fraction']:5.1f}%  {r['speedup_vs_hooks']:5.2f}x"
                  f"{_vs_model(r)}")

    if "steps" in sections and not _past(deadline, report, "section steps"):
        cases = TINY_STEP_CASES if args.tiny else STEP_CASES
        # (--tiny: the interpreter takes half a minute per step with the generator kernels, and
        # section 5 runs them anyway)
        steps = time_steps(cases, providers, device, report, reps=2 if args.tiny else 10, generator_kernels=not args.tiny)
        attach_predictions(steps, _predicted(lambda: perf_model.step_predictions(cases, providers, not args.tiny),
                                             report), lambda r: (r["case"], r["provider"]))
        save()
        print("\ngenerator-training step (ms, images/s, peak GiB, loss vs hooks)")
        for r in steps:
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            print(f"  {r['case']:<44} {r['provider']:<15} {r['ms']:9.2f} ms {r['images_per_s']:9.0f} img/s "
                  f"{peak:>6} GiB  {r['speedup_vs_hooks']:5.2f}x  loss diff {r['loss_rel_diff_vs_hooks']:.1e}"
                  f"{_vs_model(r)}")

    if "ensembles" in sections and not _past(deadline, report, "section ensembles"):
        ens_cases = TINY_CASES if args.tiny else CASES
        ens_providers = [p for p in ENSEMBLE_PROVIDERS if not (p == "grouped-compiled" and (args.skip_compiled or args.tiny))]
        ens_checks = check_ensembles(ens_cases, device, report, dtypes=dtypes)
        save()
        for r in ens_checks:
            print(f"ensemble correctness {r['case']} {r['dtype']}: {'ok' if r['ok'] else 'FAIL'}  image err "
                  f"{r['image_max_err']:.2e} (torch {r['torch_image_max_err']:.2e})  grad checksum "
                  f"{r['grad_checksum_rel_err']:.2e} (torch {r['torch_grad_checksum_rel_err']:.2e})")
        bad += [r for r in ens_checks if not r["ok"]]
        ens_dtype = torch.float32 if args.tiny else torch.bfloat16
        ens_rows = time_ensembles(ens_cases, ens_providers, device, report, bench, reps=1 if args.tiny else 5,
                                  dtype=ens_dtype)
        attach_predictions(ens_rows, _predicted(lambda: perf_model.ensemble_predictions(
            ens_cases, [p for p in ens_providers if p != "fastdfd-cpp"], ens_dtype), report),
            lambda r: (f"{r['case']} {r['mode']}", r["provider"]))
        save()
        print("\nK generators at once (median ms; speed-up vs python-loop / vmap / grouped-eager)")
        for r in ens_rows:
            if "error" in r:
                print(f"  {r['case']:<42} {r['mode']:<6} {r['provider']:<18} ERROR {r['error']}")
                continue
            ratios = "  ".join(f"{a}: {r[f'speedup_vs_{a}']:6.2f}x" for a in ("python-loop", "vmap", "grouped-eager")
                               if f"speedup_vs_{a}" in r)
            print(f"  {r['case']:<42} {r['mode']:<6} {r['provider']:<18} {r['ms']:9.2f} ms  {ratios}{_vs_model(r)}")
        graph_rows = time_cuda_graph(device, report, tiny=args.tiny)
        attach_predictions(graph_rows, _predicted(lambda: perf_model.graph_predictions(
            TINY_GRAPH_CASES if args.tiny else GRAPH_CASES), report),
            lambda r: (r["case"], "graph" if r["cuda_graph"] else "eager"), ms_field="ms_per_step")
        save()
        print("\ngenerator training, eager vs CUDA graph (images/s; max |param diff| after the same steps)")
        for r in graph_rows:
            print(f"  {r['case']:<36} graph={'on ' if r['cuda_graph'] else 'off'} {r['images_per_s']:10.0f} img/s "
                  f"{r['ms_per_step']:8.2f} ms/step  {r['speedup_vs_eager']:5.2f}x  diff "
                  f"{r['max_abs_param_diff_vs_eager']:.1e} {'ok' if r['ok'] else 'FAIL'}"
                  + _vs_model({**r, "ms": r["ms_per_step"]}))
        bad += [r for r in graph_rows if not r["ok"]]

    if "imagenet" in sections and not _past(deadline, report, "section imagenet"):
        imagenet = time_imagenet(device, report, bench, tiny=args.tiny, reps=1 if args.tiny else 5)
        inet = _predicted(lambda: perf_model.imagenet_predictions(args.tiny), report)
        attach_predictions(imagenet["rows"], inet, lambda r: (inet[0].case if inet else None, r["provider"]))
        save()
        print(f"\nImageNet generator training ({imagenet['config']})")
        for r in imagenet["rows"]:
            print(f"  {r['provider']:<11} {r['ms']:9.1f} ms/step {r['images_per_s']:8.1f} img/s  "
                  f"{r['speedup_vs_hooks_loop']:5.2f}x  projected {r['projected_gpu_hours']:8.1f} GPU-hours{_vs_model(r)}")
        print(f"  assumption: {imagenet['assumption']}")
        print(f"  published: {imagenet['published_gpu_hours']}")
    report["seconds"] = time.perf_counter() - started
    save()
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
