"""Small BN CNNs for 1-channel 16x16 digits (sklearn 8x8 upsampled), for the CPU demo."""
from __future__ import annotations

import torch
import torch.nn as nn

from .init import kaiming_init_
from .registry import register_model


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsNet(nn.Module):
    """conv-conv-pool-conv-pool-conv, global avg pool, linear.

    Two 2x pools plus global pooling make any input >= 8 px valid (16 px -> 4x4 features).
    """

    def __init__(self, widths: tuple[int, int, int, int], num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w1),
            *_conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w3, w4),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(w4, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@register_model("digits_teacher")
def digits_teacher(num_classes: int = 10, in_channels: int = 1, **kwargs) -> DigitsNet:
    """Teacher CNN, widths 32/32/64/128 (~0.1M params)."""
    return DigitsNet((32, 32, 64, 128), num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("digits_student")
def digits_student(num_classes: int = 10, in_channels: int = 1, **kwargs) -> DigitsNet:
    """Student CNN, half the teacher widths: 16/16/32/64 (~27k params)."""
    return DigitsNet((16, 16, 32, 64), num_classes=num_classes, in_channels=in_channels, **kwargs)
