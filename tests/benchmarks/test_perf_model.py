"""The H200 performance model (benchmarks/perf_model.py): bytes worked by hand, and the
properties that make its predicted speed-ups meaningful."""

import pytest
import torch

from benchmarks import perf_model as pm

N, C, S = 256, 64, 32  # CIFAR ResNet-34's first BN layer at batch 256
NUMEL = N * C * S * S


def test_bn_layer_bytes_worked_by_hand():
    # fused: forward reads x and writes y, backward reads x and dy and writes dx: 5 passes
    assert pm.bn_layer("fastdfd-triton", NUMEL, 4).bytes == 5 * 4 * NUMEL
    assert pm.bn_layer("fastdfd-cuda", NUMEL, 2).bytes == 5 * 2 * NUMEL
    # hooks, fp32: forward 2 (BN) + 1 (mean) + 2 (permute copy) + 1 (var) = 6 passes,
    # backward 2 (BN) + 5 (var) + 1 (mean) + 3 (sum) + 3 (dx sum) = 14 passes: 80 B per element
    assert pm.bn_layer("hooks", NUMEL, 4).bytes == 80 * NUMEL
    # hooks, bf16: + the fp32 cast each way (2 + 4 bytes each), BN and the dx sum in 2-byte elements
    assert pm.bn_layer("hooks", NUMEL, 2).bytes == (4 + 6 + 4 + 8 + 4) * NUMEL + (4 + 20 + 4 + 12 + 6 + 6) * NUMEL
    # 64 x 256 x 32 x 32 fp32 fused: 335.5 MB at 4.3 TB/s is 78.0 us
    assert pm.bn_layer("fastdfd-triton", NUMEL, 4).roofline_s() == pytest.approx(5 * 4 * NUMEL / 4.3e12)


def test_launch_floor_and_host_bound():
    tiny = pm.bn_layer("hooks", 8, 4)  # a few elements: every kernel costs its floor, the host leads
    kernels = tiny.num_kernels
    assert tiny.gpu_s() == pytest.approx(kernels * pm.H200.kernel_min_s)
    assert tiny.seconds() == pytest.approx(kernels * pm.H200.launch_s)
    assert tiny.graphed().seconds() == pytest.approx(kernels * pm.H200.kernel_min_s)


@pytest.mark.parametrize("provider", pm.BN_PROVIDERS)
def test_time_grows_with_the_layer(provider):
    times = [pm.bn_layer(provider, n, 2).seconds() for n in (1 << 10, 1 << 20, 1 << 24, 1 << 27)]
    assert all(a <= b for a, b in zip(times, times[1:])), times
    assert times[-1] > times[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusion_predicts_a_speedup_where_it_removes_passes(dtype):
    (pred,) = [p for p in pm.layer_predictions([(N, C, S)], [dtype]) if p.provider == "fastdfd-triton"]
    assert pred.speedups["hooks"] > 3  # 20 (fp32) or more passes against 5, memory-bound at this size
    assert pred.speedups["hooks-compiled"] > 1.1  # 6 against 5 passes, fewer launches
    # bf16 halves the fused tap's bytes but not the hooks' fp32 statistics passes
    if dtype == torch.bfloat16:
        (fp32,) = [p for p in pm.layer_predictions([(N, C, S)], [torch.float32]) if p.provider == "fastdfd-triton"]
        assert pred.speedups["hooks"] > fp32.speedups["hooks"]


def test_trace_counts_a_convolution_by_hand():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False).to("meta")

    def run():
        x = torch.empty(2, 8, 10, 10, device="meta", requires_grad=True)
        conv(x).sum().backward()

    ops = pm.trace(run)
    fwd = [o for o in ops if o.name == "convolution"][0]
    assert fwd.flops == 2 * (2 * 16 * 10 * 10) * (8 * 9)  # 2 FLOPs per MAC, C_in * k * k MACs per output
    assert fwd.in_bytes == 4 * (2 * 8 * 100 + 16 * 8 * 9) and fwd.out_bytes == 4 * 2 * 16 * 100
    bwd = [o for o in ops if o.name == "convolution_backward"][0]
    assert bwd.flops == 2 * fwd.flops  # dx and dW


def test_grouped_convolution_backward_is_not_counted_groups_times():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=8, bias=False).to("meta")

    def run():
        conv(torch.empty(2, 64, 8, 8, device="meta", requires_grad=True)).sum().backward()

    ops = pm.trace(run)
    fwd, bwd = [next(o for o in ops if o.name == n) for n in ("convolution", "convolution_backward")]
    assert fwd.flops == 2 * (2 * 64 * 64) * (8 * 9)
    assert bwd.flops == 2 * fwd.flops


def test_teacher_step_swaps_only_the_bn_layers():
    t = pm.teacher_ops("digits_teacher", 10, 1, 8, 16, torch.float32)
    bns = pm.bn_inputs(list(t))
    assert bns, "the digits teacher has BN layers"
    hooks, fused = pm.teacher_cost("hooks", t), pm.teacher_cost("fastdfd-triton", t)
    assert hooks.flops == fused.flops  # the convolutions are the same
    extra = sum(pm.bn_layer("hooks", n, e).bytes - pm.bn_layer("fastdfd-triton", n, e).bytes for n, e in bns)
    assert hooks.bytes - fused.bytes == pytest.approx(extra)


def test_ensemble_model_orders_the_providers():
    (case,) = [("c", 64, 64, 32, 3, (128, 64))]
    preds = {(p.case.split()[-1], p.provider): p for p in
             pm.ensemble_predictions([case], ["python-loop", "python-loop-graph", "grouped-eager", "fastdfd-triton"])}
    for mode in ("sample", "train"):
        loop, graph = preds[(mode, "python-loop")], preds[(mode, "python-loop-graph")]
        assert graph.ms <= loop.ms  # the same kernels without the host's launches
        assert preds[(mode, "fastdfd-triton")].ms < preds[(mode, "grouped-eager")].ms
        # the same FLOPs in every form: batching changes the traffic and the launches, not the arithmetic
        assert preds[(mode, "grouped-eager")].flops == pytest.approx(loop.flops, rel=0.02)


def test_measured_columns():
    (pred,) = [p for p in pm.layer_predictions([(N, C, S)], [torch.float32]) if p.provider == "hooks"]
    row = pm.measured_vs_predicted(2 * pred.ms, pred)
    assert row["measured_over_predicted"] == pytest.approx(2.0)
    assert row["roofline_fraction"] == pytest.approx(pred.roofline_ms / (2 * pred.ms))
    assert row["predicted_speedup_vs_hooks"] == pytest.approx(1.0)


def test_the_imagenet_ensemble_estimate_is_launch_bound_small_and_flat_large():
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs pip install efficientnet-lite-pytorch")
    from benchmarks.perf_model import imagenet_ensemble_estimate

    small, mid, big = (imagenet_ensemble_estimate(k, steps_per_generator=88) for k in (10, 100, 1000))
    assert small["bound"] == "launch" and big["bound"] == "roofline"
    # a step of 10 generators is launch latency; from 100 on the cost per generator-step is the work's
    assert small["seconds_per_generator_step"] > 3 * mid["seconds_per_generator_step"]
    assert big["seconds_per_generator_step"] == pytest.approx(mid["seconds_per_generator_step"], rel=0.25)
    assert big["seconds_for_steps_per_generator"] == pytest.approx(big["seconds_per_generator_step"] * 1000 * 88)
    assert small["kernels_per_step"] == big["kernels_per_step"]  # batched: the same kernels whatever K


def _trace_teacher(model, n, c, size):
    model = model.to("meta").eval().requires_grad_(False)

    def run():
        x = torch.empty(n, c, size, size, device="meta", requires_grad=True)
        torch.nn.functional.cross_entropy(model(x), torch.zeros(n, dtype=torch.long, device="meta")).backward()

    return tuple(pm.trace(run))


def test_compiled_moments_read_x_where_fuse_does_not():
    # layer 1's BN feeds a convolution: its backward opens a fused run, whose inputs (x among them) fuse() counts;
    # layer 2's BN feeds a ReLU: its backward sits inside the ReLU backward's run, x not counted there
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    teacher = _trace_teacher(model, 4, 3, 8)
    n1, n2 = 4 * 8 * 8 * 8, 4 * 16 * 8 * 8
    moments = pm.compiled_moments(teacher)
    assert moments.bytes == 4 * n1 + 2 * 4 * n2
    assert moments.num_kernels == 2 * 5  # per layer: the forward reduction and four per-channel kernels
    # a forward-only trace: the reduction's read of x only
    forward_only = tuple(o for o in teacher if not (o.bn_input and "backward" in o.name))
    assert pm.compiled_moments(forward_only).bytes == 4 * (n1 + n2)


def test_whole_step_forms():
    teacher = pm.teacher_ops("digits_teacher", 10, 1, 40, 16, torch.float32)
    gens = pm.generator_ops(4, 10, 16, 1, (8, 4), "train", torch.float32, latent=8)
    cost = {p: pm.whole_step_cost(p, teacher, gens) for p in pm.WHOLE_STEP_PROVIDERS}
    # the same arithmetic in every form: fusion changes traffic and launches, not FLOPs
    assert len({round(c.flops) for c in cost.values()}) == 1
    # fusing removes kernels and bytes: compiled < fastdfd eager < hooks eager
    assert cost["hooks-compiled"].num_kernels < cost["fastdfd-triton"].num_kernels < cost["hooks"].num_kernels
    assert cost["hooks-compiled"].bytes < cost["fastdfd-triton"].bytes < cost["hooks"].bytes
    # the generators' fused kernels only change the generators' part
    assert cost["fastdfd-triton+gen-triton"].bytes - cost["fastdfd-triton"].bytes == pytest.approx(
        pm.fuse(list(gens)).bytes - pm.ops_cost(list(gens)).bytes)
    with pytest.raises(ValueError, match="unknown whole-step provider"):
        pm.whole_step_cost("hooks-eager", teacher, gens)


def test_whole_step_predictions_cover_the_cases():
    preds = pm.whole_step_predictions(["digits", "resnet56"])
    assert {p.provider for p in preds} == set(pm.WHOLE_STEP_PROVIDERS)
    assert {p.case.split()[0] for p in preds} == {"digits", "resnet56"}
    by = {(p.case.split()[0], p.provider): p for p in preds}
    for case in ("digits", "resnet56"):
        assert by[(case, "hooks-compiled")].speedups["hooks"] > 1  # the compiler's fusion pays on a card too
    with pytest.raises(KeyError):
        pm.whole_step_predictions(["resnet18"])
