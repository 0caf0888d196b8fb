"""bn_moment_loss and the moment ops against independent float64 formulas."""

import math

import pytest
import torch

import fastdfd
from fastdfd.ops import PackedLayout, moment_finalize, moment_sums, moment_tap

SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 63, 1, 1), (5, 17, 33, 31), (4, 6), (6, 3, 10), (2, 3, 3, 4, 5)]


def batch_stats64(x: torch.Tensor, groups: int):
    """Per-(segment, channel) mean and biased variance, written plainly in float64."""
    x = x.double()
    n, c = x.shape[:2]
    seg = x.reshape(groups, n // groups, c, -1).transpose(1, 2).reshape(groups, c, -1)
    return seg.mean(-1), seg.var(-1, unbiased=False)


def distance64(mb, vb, mr, vr, eps, kind):
    """One segment's distance, channel by channel, from the formulas of docs/method.md section 3."""
    c = len(mr)
    if kind == "kl":
        return sum(0.5 * math.log((vr[i] + eps) / (vb[i] + eps)) + ((vb[i] + eps) + (mb[i] - mr[i]) ** 2)
                   / (2 * (vr[i] + eps)) - 0.5 for i in range(c))
    if kind == "kl_reverse":
        return sum(0.5 * math.log((vb[i] + eps) / (vr[i] + eps)) + ((vr[i] + eps) + (mb[i] - mr[i]) ** 2)
                   / (2 * (vb[i] + eps)) - 0.5 for i in range(c))
    if kind == "l2":
        return math.sqrt(sum((vr[i] - vb[i]) ** 2 for i in range(c))) + math.sqrt(
            sum((mr[i] - mb[i]) ** 2 for i in range(c)))
    if kind == "mse":
        return sum((mb[i] - mr[i]) ** 2 for i in range(c)) / c + sum((vb[i] - vr[i]) ** 2 for i in range(c)) / c
    raise AssertionError(kind)


def reference64(x, rm, rv, eps, kind, groups):
    mb, vb = batch_stats64(x, groups)
    mr, vr = rm.double().tolist(), rv.double().tolist()
    return torch.tensor([distance64(mb[g].tolist(), vb[g].tolist(), mr, vr, eps, kind) for g in range(groups)],
                        dtype=torch.float64)


def make(shape, groups=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[0] * groups, shape[1]
    x = (0.3 + 1.5 * torch.randn((n,) + tuple(shape[1:]), generator=g, dtype=torch.float64)).to(dtype)
    rm = 0.5 * torch.randn(c, generator=g)
    rv = 0.5 + torch.rand(c, generator=g)
    return x, rm, rv


@pytest.mark.parametrize("kind", fastdfd.KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 2, 5])
def test_loss_matches_float64_formula(kind, shape, groups):
    x, rm, rv = make(shape, groups)
    got = fastdfd.bn_moment_loss(x, rm, rv, kind=kind, groups=groups, eps=1e-3, reduction="none")
    want = reference64(x, rm, rv, 1e-3, kind, groups)
    assert got.shape == (groups,) and got.dtype == torch.float32
    # fp32 sums: var_b = S2/M - (S1/M)^2 loses a few digits when M is tiny (2 elements)
    torch.testing.assert_close(got.double(), want, rtol=5e-4, atol=2e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions(reduction):
    x, rm, rv = make((3, 4, 5, 5), groups=3)
    per = fastdfd.bn_moment_loss(x, rm, rv, groups=3, reduction="none")
    got = fastdfd.bn_moment_loss(x, rm, rv, groups=3, reduction=reduction)
    want = {"sum": per.sum(), "mean": per.mean(), "none": per}[reduction]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", fastdfd.KINDS)
@pytest.mark.parametrize("shape,groups", [((2, 3, 4, 5), 1), ((1, 4, 3, 2), 3), ((3, 5), 2), ((2, 2, 7), 1)])
def test_gradcheck(kind, shape, groups):
    x, rm, rv = make(shape, groups, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: fastdfd.bn_moment_loss(t, rm.double(), rv.double(), kind=kind, groups=groups, reduction="none"),
        (x,),
    )


def test_l2_equals_deepinversion_hook():
    # DeepInversion's hook: norm(running_var - var, 2) + norm(running_mean - mean, 2), var biased.
    x, rm, rv = make((8, 16, 6, 6))
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    hook = torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)
    torch.testing.assert_close(fastdfd.bn_moment_loss(x, rm, rv, kind="l2"), hook, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", fastdfd.KINDS)
def test_low_precision_inputs_accumulate_in_fp32(dtype, kind):
    x, rm, rv = make((6, 8, 9, 9), groups=2, dtype=dtype)
    got = fastdfd.bn_moment_loss(x, rm, rv, kind=kind, groups=2, reduction="none")
    assert got.dtype == torch.float32
    # Statistics of the rounded input, exactly: the only error left is fp32 accumulation.
    want = reference64(x.double(), rm, rv, 1e-5, kind, 2)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    x.requires_grad_(True)
    fastdfd.bn_moment_loss(x, rm, rv, kind=kind, groups=2).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_channels_last_same_as_contiguous():
    x, rm, rv = make((4, 6, 5, 7))
    xc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fastdfd.bn_moment_loss(xc, rm, rv), fastdfd.bn_moment_loss(x, rm, rv))


def test_sums_are_shifted_and_exact():
    x, rm, rv = make((3, 4, 5, 6), groups=2, dtype=torch.float64)
    s1, s2 = moment_sums(x, rm.double(), 2)
    d = x.reshape(2, 3, 4, -1) - rm.double().view(1, 1, 4, 1)
    torch.testing.assert_close(s1, d.sum((1, 3)))
    torch.testing.assert_close(s2, (d * d).sum((1, 3)))


def test_shifted_sums_survive_a_large_mean():
    # E[x^2] - E[x]^2 in fp32 loses every digit at mean 1e4; the shifted sums do not.
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 0.1 * torch.randn(64, 3, 8, 8, generator=g)
    rm = torch.full((3,), 1e4)
    rv = torch.full((3,), 0.01)
    got = fastdfd.bn_moment_loss(x, rm, rv, kind="mse")
    want = reference64(x, rm, rv, 1e-5, "mse", 1)[0]
    assert abs(float(got) - float(want)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tap_output_is_eval_batchnorm(dtype):
    x, rm, rv = make((3, 5, 4, 4), dtype=dtype)
    w, b = 1 + 0.1 * torch.randn(5), 0.1 * torch.randn(5)
    y, s1, s2 = moment_tap(x, rm, rv, w, b, 1e-5, 1)
    ref = (x.double() - rm.double().view(1, -1, 1, 1)) / (rv.double().view(1, -1, 1, 1) + 1e-5).sqrt()
    ref = ref * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    assert y.dtype == dtype
    tol = {torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(s1.double(), (x.double() - rm.double().view(1, -1, 1, 1)).sum((0, 2, 3)).view(1, -1),
                               rtol=1e-5, atol=1e-4)


def test_finalize_packs_many_layers_at_once():
    xs = [make((4, c, 3, 3), seed=i) for i, c in enumerate([3, 7, 2])]
    for kind in fastdfd.KINDS:
        layout = PackedLayout.build([rm for _, rm, _ in xs], [rv for _, _, rv in xs], [1e-5, 1e-3, 0.1])
        sums = [moment_sums(x, rm, 2) for x, rm, _ in xs]
        s1 = torch.cat([s[0] for s in sums], 1)
        s2 = torch.cat([s[1] for s in sums], 1)
        count = layout.counts([2 * 9] * 3)
        got = moment_finalize(s1, s2, count, layout, kind)
        assert got.shape == (3, 2)
        for i, ((x, rm, rv), e) in enumerate(zip(xs, [1e-5, 1e-3, 0.1])):
            want = fastdfd.bn_moment_loss(x, rm, rv, kind=kind, groups=2, eps=e, reduction="none")
            torch.testing.assert_close(got[i], want)


# ----------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    x, rm, rv = make((4, 3, 2, 2))
    with pytest.raises(ValueError, match="not a positive multiple of groups"):
        fastdfd.bn_moment_loss(x, rm, rv, groups=3)
    with pytest.raises(ValueError, match="negative"):
        fastdfd.bn_moment_loss(x, rm, rv - 2.0)
    with pytest.raises(ValueError, match="channels"):
        fastdfd.bn_moment_loss(x, rm[:2], rv[:2])
    with pytest.raises(TypeError, match="floating"):
        fastdfd.bn_moment_loss(x.long(), rm, rv)
    with pytest.raises(ValueError, match="kind"):
        fastdfd.bn_moment_loss(x, rm, rv, kind="kld")
    with pytest.raises(ValueError, match="reduction"):
        fastdfd.bn_moment_loss(x, rm, rv, reduction="max")
    with pytest.raises(ValueError, match=r"\[N, C"):
        fastdfd.bn_moment_loss(x[0, 0, 0], rm[:1], rv[:1])
    with pytest.raises(ValueError, match="NaN"):
        fastdfd.bn_moment_loss(x, rm, torch.full_like(rv, float("nan")))
    with pytest.raises(ValueError, match="groups"):
        fastdfd.bn_moment_loss(x, rm, rv, groups=0)
