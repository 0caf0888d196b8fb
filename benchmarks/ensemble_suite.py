"""The GPU suite's ensemble section (step 4): K generators at once, correctness then timing.

Correctness: the Triton path against a float64 run of the grouped-conv reference, at the
CIFAR generator's real size, in fp32 and bf16 parameters; the rule is the suite's
(|ours - ref64| <= 2 |torch_same_dtype - ref64| + atol), for images and for the gradient
checksum. Timing: every provider of benchmarks/ensemble_providers.py on the same inputs,
sampling (forward, no autograd) and training (forward + backward to every parameter).

Then whole GeneratorTrainer steps with and without CUDA-graph capture (:func:`time_cuda_graph`):
images/s at the digits demo's size and at CIFAR size (small steps are where launch overhead
matters), and the largest parameter difference between the two after the same steps.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from benchmarks.ensemble_providers import ENSEMBLE_PROVIDERS, ensemble_step, grad_checksum
from fastdfd import GeneratorEnsemble

# (name, K, B, image size, channels, widths)
CASES = [
    ("cifar 64 gens x 64 img, 32 px", 64, 64, 32, 3, (128, 64)),
    ("imagenet-classes 1000 gens x 4 img, 32 px", 1000, 4, 32, 3, (128, 64)),
    ("8 gens x 128 img, 32 px", 8, 128, 32, 3, (128, 64)),
]
TINY_CASES = [("tiny 3 gens x 3 img, 8 px", 3, 3, 8, 1, (16, 8))]


def _ensemble(k, size, channels, widths, device, dtype):
    torch.manual_seed(0)
    ens = GeneratorEnsemble(k, k, image_size=size, channels=channels, widths=widths)
    with torch.no_grad():  # non-trivial BN affine parameters
        for name, p in ens.named_parameters():
            if name.startswith(("bn", "out_scale")):
                p.add_(0.2 * torch.randn_like(p))
    return ens.to(device, dtype)


def check_ensembles(cases, device, report, dtypes=(torch.float32, torch.bfloat16), atol=1e-3):
    rows = []
    for name, k, b, size, channels, widths in cases[:1]:
        ref_ens = _ensemble(k, size, channels, widths, device, torch.float64)
        ref_img = ensemble_step("grouped-eager", ref_ens, b, "sample")[0]()
        ref_chk = grad_checksum(ensemble_step("grouped-eager", ref_ens, b, "train")[0]())
        del ref_ens
        for dtype in dtypes:
            ens = _ensemble(k, size, channels, widths, device, dtype)
            out = {}
            for p in ("grouped-eager", "fastdfd-triton"):
                img = ensemble_step(p, ens, b, "sample")[0]()
                chk = grad_checksum(ensemble_step(p, ens, b, "train")[0]())
                out[p] = ((img.double() - ref_img).abs().max().item(), abs(chk - ref_chk) / ref_chk)
            (t_img, t_chk), (k_img, k_chk) = out["grouped-eager"], out["fastdfd-triton"]
            scale = ref_img.abs().max().item()
            ok = k_img <= 2 * t_img + atol * scale and k_chk <= 2 * t_chk + atol
            rows.append({"case": name, "dtype": str(dtype).replace("torch.", ""), "ok": ok,
                         "image_max_err": k_img, "torch_image_max_err": t_img,
                         "grad_checksum_rel_err": k_chk, "torch_grad_checksum_rel_err": t_chk})
            report["ensemble_checks"] = rows
    return rows


def time_ensembles(cases, providers, device, report, bench, reps, dtype=torch.bfloat16):
    """Median ms per provider; ``grouped-compiled`` only on the first case (inductor compiles are slow)."""
    rows = []
    for ci, (name, k, b, size, channels, widths) in enumerate(cases):
        ens = _ensemble(k, size, channels, widths, device, dtype)
        for mode in ("sample", "train"):
            times = {}
            for p in providers:
                if (p == "grouped-compiled" and ci > 0) or (p == "python-loop-graph" and device.type != "cuda"):
                    continue
                try:
                    step = ensemble_step(p, ens, b, mode)[0]
                    step()
                    times[p] = bench(step, device, warmup=0, reps=reps)  # step() above warmed up
                except Exception as e:  # one provider failing must not cost the others' numbers
                    rows.append({"case": name, "mode": mode, "provider": p, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
            for p, ms in times.items():
                rows.append({"case": name, "mode": mode, "provider": p, "dtype": str(dtype).replace("torch.", ""),
                             "ms": ms, "images_per_s": k * b / (ms * 1e-3),
                             **{f"speedup_vs_{a}": times[a] / ms for a in ("python-loop", "vmap", "grouped-eager")
                                if a in times}})
            report["ensemble_timings"] = rows
        del ens
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# (name, teacher, classes, channels, generators, images each, size, latent, widths)
GRAPH_CASES = [
    ("digits 10 gens x 32 img, 16 px", "digits_teacher", 10, 1, 10, 32, 16, 64, (32, 16)),
    ("cifar-r18 10 gens x 32 img, 32 px", "resnet18", 10, 3, 10, 32, 32, 100, (128, 64)),
]
TINY_GRAPH_CASES = [("tiny digits 4 gens x 3 img, 16 px", "digits_teacher", 4, 1, 4, 3, 16, 8, (8, 4))]


def _graph_trainer(case, device, graph: bool, log_every: int):
    from benchmarks.providers import randomize_bn
    from fastdfd import GeneratorTrainer
    from fastdfd.models import create_model
    from fastdfd.train.graphed_step import direct_capture

    _, teacher_name, classes, channels, k, b, size, latent, widths = case
    torch.manual_seed(0)
    teacher = randomize_bn(create_model(teacher_name, num_classes=classes, in_channels=channels)).to(device)
    ens = GeneratorEnsemble(k, classes, image_size=size, channels=channels, latent_dim=latent, widths=widths,
                            output_bn=False).to(device)
    on_gpu = device.type == "cuda"
    tr = GeneratorTrainer(teacher, ens, batch_size=b, lr=1e-2, progress=False, log_every=log_every,
                          cuda_graph=graph and on_gpu)
    if graph and not on_gpu:  # the CPU smoke run: the static-buffer path with direct calls for the graph
        tr.plan, tr._capture = dataclasses.replace(tr.plan, cuda_graph=True, graph_reason=None), direct_capture
    return tr


def time_cuda_graph(device, report, tiny: bool = False, check_steps: int = 6, windows: int = 4,
                    log_every: int = 10):
    """GeneratorTrainer images/s, eager against CUDA-graph replay, and the parameter drift between them.

    Timing: ``windows`` logging windows of ``log_every`` steps in one fit; the loop's own
    per-window rate (one host sync per window), median over the windows after the first
    (which holds the warm-up steps and the capture). Check: ``check_steps`` steps of each
    from the same start, largest |difference| of any generator parameter.
    """
    rows = []
    if tiny:
        check_steps, windows, log_every = 5, 2, 2
    for case in TINY_GRAPH_CASES if tiny else GRAPH_CASES:
        params = {}
        for graph in (False, True):
            tr = _graph_trainer(case, device, graph, log_every=check_steps)
            tr.fit(check_steps)
            params[graph] = [p.detach().clone() for p in tr.ensemble.parameters()]
            del tr
        diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(params[False], params[True]))
        rates = {}
        for graph in (False, True):
            tr = _graph_trainer(case, device, graph, log_every=log_every)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            hist = tr.fit(windows * log_every)
            window_rates = [r["images_per_s"] for r in hist if r["step"] % log_every == 0][1:]
            rates[graph] = (statistics.median(window_rates), hist[-1].get("gpu_mem_gib"), tr.placement)
            del tr
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for graph in (False, True):
            ips, mem, placement = rates[graph]
            rows.append({"case": case[0], "cuda_graph": graph, "images_per_s": ips, "ms_per_step":
                         case[4] * case[5] / ips * 1e3, "peak_gib": mem,
                         "speedup_vs_eager": ips / rates[False][0], "check_steps": check_steps,
                         "max_abs_param_diff_vs_eager": diff, "ok": diff <= 1e-3, "placement": placement})
        report["cuda_graph"] = rows
    return rows


__all__ = ["CASES", "ENSEMBLE_PROVIDERS", "GRAPH_CASES", "TINY_CASES", "check_ensembles", "time_cuda_graph",
           "time_ensembles"]
