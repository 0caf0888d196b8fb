"""The field's CIFAR-10 ResNets with option-A shortcuts (He et al. 2016, section 4.2).

ResNet-20/32/44/56 as the pretrained checkpoints most data-free papers start from have them
(akamaster/pytorch_resnet_cifar10's layout, so those ``{"state_dict": ...}`` files load with
:func:`fastdfd.models.weights.load_weights` unchanged, ``module.`` prefixes included):

- stem: 3x3 conv of 16 channels, BN, ReLU (no max-pool: 32 px inputs);
- three stages of ``n`` basic blocks, 16 / 32 / 64 channels, ``n = (depth - 2) / 6``;
- the first block of stages 2 and 3 has stride 2 and a parameter-free *option-A* shortcut:
  the input subsampled ``x[:, :, ::2, ::2]`` and zero-padded on the channel axis by
  ``planes // 4`` on each side;
- global average pool, linear 64 -> classes.

Parameters for 10 classes: 269,722 (ResNet-20), 464,154 (32), 658,586 (44), 853,018 (56): those of the
published checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model

_DEPTHS = (20, 32, 44, 56, 110)


class OptionAShortcut(nn.Module):
    """Stride-2 subsampling and zero channel padding: [N, C, H, W] -> [N, C + 2 * pad, ceil(H/2), ceil(W/2)]."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlockA(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError(f"option A doubles the channels at stride 2; got {in_planes} -> {planes}, "
                                 f"stride {stride}")
            self.shortcut: nn.Module = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNetA(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with option-A shortcuts; input [N, in_channels, 32, 32]
    (any size works: the pool is global), output [N, num_classes] logits."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        # the reference implementation's initialisation: He-normal (fan_in) on convs and the linear layer
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlockA(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _factory(depth: int):
    def build(num_classes: int = 10, **kwargs) -> CifarResNetA:
        return CifarResNetA(depth, num_classes=num_classes, **kwargs)

    build.__name__ = build.__qualname__ = f"cifar_resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} with option-A shortcuts (He et al. 2016, sec. 4.2)."
    return build


for _depth in _DEPTHS:
    globals()[f"cifar_resnet{_depth}"] = register_model(f"cifar_resnet{_depth}")(_factory(_depth))
del _depth

__all__ = ["BasicBlockA", "CifarResNetA", "OptionAShortcut"] + [f"cifar_resnet{d}" for d in _DEPTHS]
