"""MomentMatcher against DeepInversion-style forward hooks written here, on CIFAR ResNets."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfd
from fastdfd import MomentMatcher
from fastdfd.models import create_model
from fastdfd.nn import BNTap

from ..conftest import randomize_bn_stats


def hook_distance(x, module, kind, normalization="sum"):
    """The distance a forward hook would compute, in float64, straight from docs/method.md sections 3-4.

    ``normalization="mean"``: the scale-free per-layer form (per-channel mean; RMS for l2).
    """
    x = x.double()
    nch = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)
    var = x.transpose(0, 1).contiguous().view(nch, -1).var(1, unbiased=False)
    rm, rv, eps = module.running_mean.double(), module.running_var.double(), module.eps
    per_channel = 1.0 if normalization == "sum" else nch
    if kind == "l2":  # DeepInversion's r_feature, verbatim (mean: root-mean-square differences)
        return (torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)) / per_channel ** 0.5
    if kind == "mse":
        return ((mean - rm) ** 2).mean() + ((var - rv) ** 2).mean()
    vb, vr = var + eps, rv + eps
    if kind == "kl":
        return (0.5 * torch.log(vr / vb) + (vb + (mean - rm) ** 2) / (2 * vr) - 0.5).sum() / per_channel
    return (0.5 * torch.log(vb / vr) + (vr + (mean - rm) ** 2) / (2 * vb) - 0.5).sum() / per_channel


class HookLoss:
    """DeepInversion's pattern: a forward hook per BN layer storing its r_feature."""

    def __init__(self, model, kind, first_bn_multiplier=1.0):
        self.values, self.kind, self.handles = [], kind, []
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                self.handles.append(m.register_forward_hook(self.hook))
        self.rescale = first_bn_multiplier

    def hook(self, module, inputs, output):
        self.values.append(hook_distance(inputs[0], module, self.kind))

    def loss(self):
        return self.rescale * self.values[0] + sum(self.values[1:])

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def resnets():
    calib = torch.Generator().manual_seed(5)
    return {name: randomize_bn_stats(create_model(name, num_classes=10), seed=i,
                                     calibrate=torch.randn(16, 3, 32, 32, generator=calib))
            for i, name in enumerate(["resnet18", "resnet34"])}


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
@pytest.mark.parametrize("kind", fastdfd.KINDS)
def test_matches_hooks_value_and_input_gradient(resnets, name, kind):
    # float64 end to end: a random deep ReLU network amplifies any fp32 rounding difference
    # (a flipped ReLU mask) into percent-level gradient differences, whoever is right
    teacher = copy.deepcopy(resnets[name]).double()
    x = (0.2 + torch.randn(6, 3, 32, 32, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, 10, (6,))

    hooks = HookLoss(teacher, kind, first_bn_multiplier=3.0)
    ref_logits = teacher(x)
    ref = hooks.loss()
    (ref_grad,) = torch.autograd.grad(ref + F.cross_entropy(ref_logits, y), x)
    hooks.remove()

    with MomentMatcher(teacher, kind=kind, first_layer_multiplier=3.0) as matcher:
        logits = teacher(x)
        loss = matcher.loss()
        (grad,) = torch.autograd.grad(loss + F.cross_entropy(logits, y), x)
        assert len(matcher.layer_losses()) == len(hooks.values)

    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("kind", fastdfd.KINDS)
def test_fp32_error_no_worse_than_fp32_hooks(resnets, kind):
    """fp32 against the float64 hooks. The loss by flash-attention's rule (our error <= 2x that
    of the fp32 hook implementation + slack). The input gradient only to 1%: through a random
    18-layer ReLU network any fp32 rounding difference flips some ReLU masks, and fp32
    implementations then differ by 1e-3..1e-2 in norm, run to run (oneDNN's convolutions are
    not bit-stable across processes); exactness is the float64 test's job above."""
    teacher = resnets["resnet18"]
    x = 0.2 + torch.randn(6, 3, 32, 32, dtype=torch.float64)

    def hooks_run(model, inp):
        hooks = HookLoss(model, kind)
        inp = inp.clone().requires_grad_(True)
        model(inp)
        loss = hooks.loss()
        hooks.remove()
        return loss.double(), torch.autograd.grad(loss, inp)[0].double()

    ref, ref_grad = hooks_run(copy.deepcopy(teacher).double(), x)
    base, base_grad = hooks_run(teacher, x.float())
    x32 = x.float().requires_grad_(True)
    with MomentMatcher(teacher, kind=kind) as matcher:
        teacher(x32)
        loss = matcher.loss()
        (grad,) = torch.autograd.grad(loss, x32)

    def err(g):
        return float((g.double() - ref_grad).norm() / ref_grad.norm())

    assert abs(float(loss) - float(ref)) <= 2 * abs(float(base) - float(ref)) + 1e-5 * abs(float(ref))
    assert err(grad) < 1e-2 and err(base_grad) < 1e-2, (err(grad), err(base_grad))


def test_teacher_state_is_bit_identical_and_restored(resnets):
    teacher = resnets["resnet18"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modules_before = dict(teacher.named_modules())
    with MomentMatcher(teacher) as matcher:
        assert sum(isinstance(m, BNTap) for m in teacher.modules()) == 20
        assert list(teacher.state_dict()) == list(before)  # same keys while attached
        (teacher(torch.randn(4, 3, 32, 32)).sum() + matcher.loss()).backward()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert dict(teacher.named_modules()).keys() == modules_before.keys()
    for name, m in teacher.named_modules():
        assert m is modules_before[name]
    teacher.zero_grad(set_to_none=True)


def test_teacher_in_train_mode_is_the_untapped_teacher(resnets):
    """A training teacher normalises with batch statistics and moves its running ones, tapped or not;
    the loss keeps the statistics seen at attach time."""
    import copy

    teacher = resnets["resnet18"]
    twin = copy.deepcopy(teacher).train()
    x = torch.randn(4, 3, 32, 32)
    ref = twin(x)
    with MomentMatcher(teacher) as matcher:
        first = matcher.layer_names[0]
        teacher.eval()
        teacher(x)
        expected = matcher.layer_losses()[first].detach()
        teacher.train()
        out = teacher(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        # the first BN sees the same input in either mode; its loss uses the attach-time statistics
        torch.testing.assert_close(matcher.layer_losses()[first].detach(), expected)
        assert matcher.flavours[first] == "batchnorm"
    teacher.eval()
    for (k, v), (k2, v2) in zip(teacher.state_dict().items(), twin.state_dict().items()):
        assert k == k2 and torch.allclose(v.float(), v2.float(), rtol=1e-5, atol=1e-6), k
    teacher.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_tapped_teacher_gives_the_untapped_outputs(mode):
    import copy

    teacher = randomize_bn_stats(create_model("digits_teacher"))
    twin = copy.deepcopy(teacher)
    x = torch.randn(5, 1, 16, 16)
    want = twin.train(mode == "train")(x)
    teacher.train(mode == "train")
    with MomentMatcher(teacher):
        got = teacher(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_generator_scope_gives_one_loss_per_segment(digits_teacher):
    xs = [torch.randn(4, 1, 16, 16) + i for i in range(3)]
    per = []
    with MomentMatcher(digits_teacher, scope="ensemble") as m:
        for x in xs:
            digits_teacher(x)
            per.append(m.loss())
    with MomentMatcher(digits_teacher, scope="generator", groups=3) as m:
        digits_teacher(torch.cat(xs))
        got = m.loss()
        assert got.shape == (3,)
        assert all(v.shape == (3,) for v in m.layer_losses().values())
    torch.testing.assert_close(got, torch.stack(per), rtol=1e-5, atol=1e-5)


def test_layer_weights_by_name_and_sequence(digits_teacher):
    x = torch.randn(8, 1, 16, 16)
    with MomentMatcher(digits_teacher) as m:
        digits_teacher(x)
        layers = m.layer_losses()
        names = list(layers)
        plain = m.loss()
    torch.testing.assert_close(plain, sum(layers.values()))
    weights = [0.5 * (i + 1) for i in range(len(names))]
    with MomentMatcher(digits_teacher, layer_weights=weights, first_layer_multiplier=4.0) as m:
        digits_teacher(x)
        want = 4.0 * weights[0] * layers[names[0]] + sum(w * layers[n] for w, n in zip(weights[1:], names[1:]))
        torch.testing.assert_close(m.loss(), want)
    with MomentMatcher(digits_teacher, layer_weights={names[1]: 0.0}) as m:
        digits_teacher(x)
        torch.testing.assert_close(m.loss(), plain - layers[names[1]])


def test_channels_last_teacher(resnets):
    teacher = resnets["resnet18"]
    x = torch.randn(4, 3, 32, 32)
    with MomentMatcher(teacher) as m:
        teacher(x)
        want = m.loss()
    teacher.to(memory_format=torch.channels_last)
    try:
        with MomentMatcher(teacher) as m:
            teacher(x.to(memory_format=torch.channels_last))
            torch.testing.assert_close(m.loss(), want, rtol=1e-4, atol=1e-4)
    finally:
        teacher.to(memory_format=torch.contiguous_format)


def test_batchnorm1d_and_3d_and_shared_layers():
    bn = nn.BatchNorm1d(6)
    model = nn.Sequential(nn.Linear(4, 6), bn, nn.ReLU(), nn.Linear(6, 6), bn)  # one BN used twice
    model3 = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3))
    randomize_bn_stats(model)
    randomize_bn_stats(model3)
    with MomentMatcher(model) as m:
        model(torch.randn(5, 4))
        assert len(m.layer_names) == 1 and torch.isfinite(m.loss())
    assert model[1] is bn and model[4] is bn
    with MomentMatcher(model3, kind="mse") as m:
        x = torch.randn(2, 2, 3, 4, 5)
        model3(x)
        torch.testing.assert_close(
            m.loss().double(), hook_distance(model3[0](x), model3[1], "mse"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "l2", "mse"])
@pytest.mark.parametrize("groups", [1, 2])
def test_a_bn_called_twice_counts_both_calls(kind, groups):
    """Weight sharing: a BN module used at two places of the forward. The loss is that of every input it saw,
    pooled (the float64 hook below records every call, where DeepInversion's keeps only the last), value and
    input gradient, per segment under scope='generator'."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), bn, nn.ReLU(), nn.Conv2d(5, 5, 1), bn)
    other = nn.BatchNorm2d(5)  # an ordinary layer beside the shared one
    model.append(other)
    randomize_bn_stats(model)
    model.eval()
    x = torch.randn(4, 3, 6, 7, requires_grad=True)
    scope = "ensemble" if groups == 1 else "generator"
    with MomentMatcher(model, kind=kind, scope=scope, groups=None if groups == 1 else groups) as m:
        model(x)
        loss = m.loss().sum()
        assert len(m.layer_names) == 2
    (grad,) = torch.autograd.grad(loss, x)

    xd = x.detach().double().requires_grad_(True)
    model_d = copy.deepcopy(model).double()  # the shared BN stays one module in the copy
    calls: dict[nn.Module, list[torch.Tensor]] = {model_d[1]: [], model_d[5]: []}
    handles = [mod.register_forward_hook(lambda mod, inp, out: calls[mod].append(inp[0])) for mod in calls]
    model_d(xd)
    for h in handles:
        h.remove()
    assert len(calls[model_d[1]]) == 2 and len(calls[model_d[5]]) == 1
    ref = 0
    for mod, inputs in calls.items():
        for g in range(groups):  # segment g of every call, pooled
            pooled = torch.cat([t.chunk(groups)[g] for t in inputs])
            ref = ref + hook_distance(pooled, mod, kind)
    (ref_grad,) = torch.autograd.grad(ref, xd)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    # atol on the gradient's scale: fp32 rounding of the kl distance's 1/var terms reaches 2e-5 of it on the cpp
    # backend (AVX-512 host); a call left out of the pooled statistics moves it by O(1)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))


def test_to_while_attached_hands_new_tensors_back(digits_teacher):
    with MomentMatcher(digits_teacher) as m:
        digits_teacher.double()
        digits_teacher(torch.randn(2, 1, 16, 16, dtype=torch.float64))
        assert m.loss().dtype == torch.float64
    bn = digits_teacher.net[1] if hasattr(digits_teacher, "net") else next(
        x for x in digits_teacher.modules() if isinstance(x, nn.BatchNorm2d))
    assert bn.running_mean.dtype == torch.float64 and bn.weight.dtype == torch.float64


def test_paused_records_nothing(digits_teacher):
    with MomentMatcher(digits_teacher) as m:
        with m.paused():
            digits_teacher(torch.randn(2, 1, 16, 16))
        with pytest.raises(RuntimeError, match="call teacher"):
            m.loss()


# ----------------------------------------------------------------- bad input
def test_teacher_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm"):
        MomentMatcher(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_negative_running_var_is_refused_and_nothing_changes():
    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm2d(2)))
    model[2].running_var[0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        MomentMatcher(model)
    assert not any(isinstance(m, BNTap) for m in model.modules())


def test_double_attach_and_bad_settings(digits_teacher):
    with MomentMatcher(digits_teacher):
        with pytest.raises(RuntimeError, match="already attached"):
            MomentMatcher(digits_teacher)
    with pytest.raises(ValueError, match="scope"):
        MomentMatcher(digits_teacher, scope="class")
    with pytest.raises(ValueError, match="kind"):
        MomentMatcher(digits_teacher, kind="js")
    with pytest.raises(ValueError, match="layer_weights"):
        MomentMatcher(digits_teacher, layer_weights=[1.0])
    with pytest.raises(ValueError, match="unknown BN layers"):
        MomentMatcher(digits_teacher, layer_weights={"nope": 1.0})
    assert not any(isinstance(m, BNTap) for m in digits_teacher.modules())


def test_generator_scope_batch_must_split(digits_teacher):
    with MomentMatcher(digits_teacher, scope="generator", groups=3):
        with pytest.raises(ValueError, match="multiple of groups=3"):
            digits_teacher(torch.randn(4, 1, 16, 16))
    with MomentMatcher(digits_teacher, scope="generator"):
        with pytest.raises(RuntimeError, match="matcher.groups"):
            digits_teacher(torch.randn(4, 1, 16, 16))


@pytest.mark.parametrize("kind", fastdfd.KINDS)
def test_mean_normalization_against_float64_reference(resnets, kind):
    teacher = copy.deepcopy(resnets["resnet18"]).double()
    x = (0.2 + torch.randn(6, 3, 32, 32, dtype=torch.float64)).requires_grad_(True)
    values = []
    handles = [m.register_forward_hook(lambda mod, inp, out: values.append(hook_distance(inp[0], mod, kind, "mean")))
               for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    teacher(x)
    for h in handles:
        h.remove()
    ref = (2.0 * values[0] + sum(values[1:])) / len(values)
    (ref_grad,) = torch.autograd.grad(ref, x)
    with MomentMatcher(teacher, kind=kind, normalization="mean", first_layer_multiplier=2.0) as matcher:
        teacher(x)
        loss = matcher.loss()
        (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10 * float(ref_grad.abs().max()))


def test_mean_normalization_generator_scope_and_scale(digits_teacher):
    x = torch.randn(12, 1, 16, 16)
    with MomentMatcher(digits_teacher, scope="generator", groups=3) as m:
        digits_teacher(x)
        layers = m.layer_losses()
        summed = m.loss()
    channels = {n: mod.num_features for n, mod in digits_teacher.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    with MomentMatcher(digits_teacher, scope="generator", groups=3, normalization="mean") as m:
        digits_teacher(x)
        got = m.loss()
        assert "normalization='mean'" in repr(m)
    want = sum(v / channels[n] for n, v in layers.items()) / len(layers)
    torch.testing.assert_close(got, want)
    assert got.shape == summed.shape == (3,)
    with pytest.raises(ValueError, match="normalization"):
        MomentMatcher(digits_teacher, normalization="max")


def test_mean_normalization_does_not_grow_with_width():
    """The same per-channel mismatch in a 4x wider layer: the summed KL grows 4x, the mean stays."""
    def loss(width, normalization):
        bn = nn.BatchNorm2d(width).eval()
        x = torch.full((4, width, 2, 2), 0.5) + torch.arange(4.0).view(4, 1, 1, 1)
        with MomentMatcher(nn.Sequential(bn), normalization=normalization) as m:
            m.teacher(x)
            return float(m.loss())
    assert loss(32, "sum") == pytest.approx(4 * loss(8, "sum"), rel=1e-5)
    assert loss(32, "mean") == pytest.approx(loss(8, "mean"), rel=1e-5)


def test_torch_compile_traces_the_tapped_step_once():
    """The matcher's per-forward Python state must repeat from step to step: torch.compile guards on it, and a
    value that changes every step (a counter) recompiles every step (the whole-step benchmark fell to 0.14x)."""
    torch.manual_seed(0)
    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                             nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    compiles = []

    def count(gm, _inputs):
        compiles.append(gm)
        return gm.forward

    with MomentMatcher(model, kind="l2") as m:
        def forward():
            out = model(x).sum()
            return m.loss() + out

        step = torch.compile(forward, backend=count)
        step(), step()  # the first steps fill the matcher's caches (a layout, a result): a guard may change once
        first = len(compiles)
        for _ in range(4):
            loss = step()
        torch.autograd.grad(loss, x)
    torch._dynamo.reset()
    assert first >= 1 and len(compiles) == first, f"{len(compiles) - first} recompilations in the steady state"
