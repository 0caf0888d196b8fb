"""Tests for the model zoo: registry, shapes, gradients, parameter counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

# Import the model modules directly so registration happens even without the
# package __init__ re-exports.
from fastdfd.models import digits, resnet_cifar, wrn  # noqa: F401
from fastdfd.models.registry import create_model, list_models, register_model

CIFAR_NAMES = ["resnet18", "resnet34", "resnet50", "wrn16_1", "wrn16_2", "wrn16_4", "wrn40_1", "wrn40_2", "wrn40_4"]
DIGITS_NAMES = ["digits_teacher", "digits_student"]
# resnet50 only gets the single forward in test_forward_shape to keep the suite fast.
BACKWARD_NAMES = [n for n in CIFAR_NAMES if n != "resnet50"] + DIGITS_NAMES


def _input(name: str, n: int = 2) -> torch.Tensor:
    if name.startswith("digits"):
        return torch.randn(n, 1, 16, 16)
    return torch.randn(n, 3, 32, 32)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_expected_names_registered() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(CIFAR_NAMES + DIGITS_NAMES) <= set(names)


@pytest.mark.parametrize("name", CIFAR_NAMES + DIGITS_NAMES)
def test_forward_shape_and_batchnorm(name: str) -> None:
    model = create_model(name, num_classes=7)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        out = model(_input(name))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_backward(name: str) -> None:
    model = create_model(name, num_classes=10)
    model(_input(name)).logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", DIGITS_NAMES)
def test_digits_default_and_small_inputs(name: str) -> None:
    model = create_model(name).eval()  # factory defaults: 10 classes, 1 channel
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("resnet18", 11.1e6, 11.3e6),
        ("resnet34", 21.2e6, 21.4e6),
        ("wrn40_2", 2.15e6, 2.3e6),
        ("wrn16_2", 0.65e6, 0.75e6),
        ("wrn40_1", 0.5e6, 0.6e6),
    ],
)
def test_param_counts(name: str, low: float, high: float) -> None:
    assert low <= _n_params(create_model(name, num_classes=10)) <= high


def test_digits_sizes() -> None:
    teacher = _n_params(create_model("digits_teacher"))
    student = _n_params(create_model("digits_student"))
    assert teacher < 200_000
    assert student < teacher / 2


def test_in_channels_arg() -> None:
    model = create_model("resnet18", num_classes=5, in_channels=1).eval()
    wide = create_model("wrn16_1", num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)
        assert wide(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(KeyError) as info:
        create_model("no_such_net", num_classes=10)
    msg = str(info.value)
    assert "no_such_net" in msg
    assert "resnet18" in msg and "wrn40_2" in msg and "digits_teacher" in msg


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError):

        @register_model("resnet18")
        def other(num_classes: int = 10) -> nn.Module:
            return nn.Linear(1, num_classes)


def _wrn_parameters(depth: int, k: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """WRN-depth-k's parameter count from the paper's architecture: a 3x3 stem of 16 channels, three
    groups of n = (depth - 4) / 6 pre-activation blocks of 16k, 32k and 64k channels (strides 1, 2, 2;
    a 1x1 projection where a block changes shape), BN-ReLU, pooling and a linear head."""
    n = (depth - 4) // 6
    total, width = 9 * in_channels * 16, 16
    for out, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
        for i in range(n):
            inp = width if i == 0 else out
            total += 2 * inp + 9 * inp * out + 2 * out + 9 * out * out  # BN, conv3x3, BN, conv3x3
            if i == 0 and (inp != out or stride != 1):
                total += inp * out  # the projection shortcut
        width = out
    return total + 2 * width + width * num_classes + num_classes  # final BN and the head


@pytest.mark.parametrize("depth, k", [(10, 1), (16, 2), (22, 1), (28, 1), (40, 1), (40, 2)])
def test_wrn_valid_depths(depth: int, k: int) -> None:
    model = wrn.WideResNet(depth, k, num_classes=10)
    n = (depth - 4) // 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv3 = [m for m in convs if m.kernel_size == (3, 3)]
    conv1 = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(conv3) == 6 * n + 1  # the stem and two per block
    assert len(conv1) == (2 if k == 1 else 3)  # group 1 keeps 16 channels only when k == 1
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 6 * n + 1
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) == 1
    if k == 1:  # the depth counts the weighted layers: 6n + 1 3x3 convs, the two projections, the head
        assert len(conv3) + len(conv1) + 1 == depth
    assert [g[0].conv2.out_channels for g in (model.block1, model.block2, model.block3)] == [16 * k, 32 * k, 64 * k]
    assert sum(p.numel() for p in model.parameters()) == _wrn_parameters(depth, k)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn_parameter_counts_match_the_literature() -> None:
    # the counts the papers and their code report on 10 classes (WRN-28-10: 36.5M; WRN-40-2: 2.2M)
    assert _wrn_parameters(28, 10) == 36_479_194
    assert sum(p.numel() for p in wrn.WideResNet(40, 2, num_classes=10).parameters()) == 2_243_546


@pytest.mark.parametrize("depth", [15, 20, 41, 4])
def test_wrn_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError):
        wrn.WideResNet(depth, 2, num_classes=10)


def test_wrn_dropout_only_in_train() -> None:
    model = wrn.WideResNet(16, 1, num_classes=10, dropout=0.3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["resnet18", "wrn16_2", "digits_teacher"])
def test_channels_last(name: str) -> None:
    model = create_model(name, num_classes=10).eval()
    x = _input(name)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,params", [("resnet18_imagenet", 11_689_512), ("resnet50_imagenet", 25_557_032)])
def test_imagenet_resnets_match_torchvision_layout(name: str, params: int) -> None:
    # torchvision's resnet18 / resnet50 (1000 classes) have exactly these parameter counts
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="stem"):
        resnet_cifar.ResNet(resnet_cifar.BasicBlock, (1, 1, 1, 1), stem="tiny")
