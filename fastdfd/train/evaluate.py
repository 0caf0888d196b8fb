"""Top-1 accuracy of a classifier on a loader (eval mode, restored after)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .modes import in_mode


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> float:
    """Fraction of correct top-1 predictions over every (images, labels) batch of ``loader``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    correct = total = 0
    with in_mode(model, False):
        for x, y in loader:
            pred = model(x.to(device)).argmax(1)
            correct += int((pred == y.to(device)).sum())
            total += y.numel()
    if total == 0:
        raise ValueError("the evaluation loader yielded no samples")
    return correct / total
