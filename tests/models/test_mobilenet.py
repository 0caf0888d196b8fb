"""MobileNetV2: torchvision's ImageNet layout (parameter count, module names), any input size, channels."""

from __future__ import annotations

import torch
from torch import nn

from fastdfd.models import create_model, list_models
from fastdfd.models.mobilenet import InvertedResidual, MobileNetV2


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_with_torchvision_parameter_count():
    assert "mobilenet_v2" in list_models()
    model = create_model("mobilenet_v2")
    assert isinstance(model, MobileNetV2)
    assert _params(model) == 3_504_872  # torchvision.models.mobilenet_v2(), 1000 classes
    # 1281 * 1000 of those are the classifier (weights and biases): 10 classes keep the rest.
    assert _params(create_model("mobilenet_v2", num_classes=10)) == 3_504_872 - 1281 * 990


def test_module_names_follow_torchvision_so_its_weights_load():
    state = create_model("mobilenet_v2").state_dict()
    assert len(state) == 314
    expected = {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),  # t = 1: no expansion conv
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


def test_structure_strides_and_residuals():
    model = create_model("mobilenet_v2")
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    # Every repeat after a stage's first block keeps its shape: 0+1+2+3+2+2+0 shortcuts.
    assert sum(b.use_residual for b in blocks) == 10
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35
    assert model.classifier[0].p == 0.2


def test_forward_shapes_small_inputs_and_one_channel():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    gray = create_model("mobilenet_v2", num_classes=10, in_channels=1)
    assert gray.features[0][0].in_channels == 1
    out = gray.train()(torch.randn(2, 1, 32, 32))  # train mode: BN over the 1x1 tail still has 2 values
    assert out.shape == (2, 10)
    out.sum().backward()
    assert gray.features[0][0].weight.grad is not None


def test_width_multiplier_rounds_channels_to_multiples_of_eight():
    half = MobileNetV2(num_classes=10, width_mult=0.5)
    assert half.features[0][0].out_channels == 16
    assert half.last_channels == 1280  # the last conv never shrinks
    assert all(m.out_channels % 8 == 0 for m in half.modules() if isinstance(m, nn.Conv2d) and m.groups == 1)
    assert MobileNetV2(num_classes=10, width_mult=1.4).last_channels == 1792
