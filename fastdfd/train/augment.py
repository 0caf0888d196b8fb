"""Augmentation of generated images in distillation: the standard CIFAR random crop and flip, batched.

The teacher and the student see the same augmented view (a consistent view, as Beyer et al.,
"Knowledge distillation: A good teacher is patient and consistent", 2022, recommend), so the
teacher's targets stay exact; what it adds is more distinct inputs per generated image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..settings import AUGMENTS  # the choices live with the setting


def random_crop_flip(x: torch.Tensor, padding: int, rng: torch.Generator | None = None) -> torch.Tensor:
    """Per image, a random ``H x W`` crop of ``x`` zero-padded by ``padding`` pixels, then a horizontal flip
    with probability 1/2 (torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip``, for a
    whole batch in one gather). ``x`` [N, C, H, W] (any float dtype and device), same shape out; the draws
    come from ``rng`` (on x's device), so a run stays reproducible."""
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip takes [N, C, H, W] images, got {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=rng, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=rng, device=dev)
    flip = torch.rand(n, 1, 1, generator=rng, device=dev) < 0.5
    cols = torch.arange(w, device=dev).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx  # flip the crop's columns: the same as flipping after
    rows = torch.arange(h, device=dev).view(1, h, 1) + dy
    padded = F.pad(x, (padding, padding, padding, padding))
    index = (rows * (w + 2 * padding) + cols).reshape(n, 1, h * w).expand(n, x.shape[1], h * w)
    return padded.flatten(2).gather(2, index).view_as(x)


__all__ = ["AUGMENTS", "random_crop_flip"]
