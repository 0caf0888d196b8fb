"""Weight initialisation shared by the classifier families."""

from __future__ import annotations

from torch import nn


def kaiming_init_(model: nn.Module) -> nn.Module:
    """He-normal convs (fan_out, as torchvision's ResNets), unit/zero BN affine, zero Linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model
