"""Wide ResNets (Zagoruyko & Komodakis 2016) with pre-activation BN-ReLU-conv blocks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import kaiming_init_
from .registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, with optional dropout between the convs."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = dropout
        self.equal = in_planes == out_planes and stride == 1
        # Projection shortcut when shape changes; it consumes the pre-activated
        # input, as in the reference WRN code.
        self.shortcut = (
            None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-k: stem 16 ch, three groups of 16k/32k/64k ch, strides 1,2,2."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must satisfy (depth-4) % 6 == 0 and depth >= 10, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = self._make_group(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._make_group(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._make_group(widths[2], widths[3], n, 2, dropout)
        # Final BN-ReLU because pre-activation blocks end on a bare conv.
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init_(self)

    @staticmethod
    def _make_group(in_planes: int, out_planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            *[
                PreActBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("wrn16_1")
def wrn16_1(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-16-1 (~0.18M params for 10 classes)."""
    return WideResNet(16, 1, num_classes=num_classes, **kwargs)


@register_model("wrn16_2")
def wrn16_2(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-16-2 (~0.7M params for 10 classes)."""
    return WideResNet(16, 2, num_classes=num_classes, **kwargs)


@register_model("wrn16_4")
def wrn16_4(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-16-4 (~2.7M params for 10 classes)."""
    return WideResNet(16, 4, num_classes=num_classes, **kwargs)


@register_model("wrn40_1")
def wrn40_1(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-40-1 (~0.57M params for 10 classes)."""
    return WideResNet(40, 1, num_classes=num_classes, **kwargs)


@register_model("wrn40_2")
def wrn40_2(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-40-2 (~2.2M params for 10 classes)."""
    return WideResNet(40, 2, num_classes=num_classes, **kwargs)


@register_model("wrn40_4")
def wrn40_4(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-40-4 (~8.9M params for 10 classes)."""
    return WideResNet(40, 4, num_classes=num_classes, **kwargs)
