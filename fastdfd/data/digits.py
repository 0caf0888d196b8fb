"""scikit-learn's bundled 8x8 digits as a tiny, download-free eval set."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["DigitsSplit", "load_digits_split"]

DIGITS_MAX_VALUE = 16.0  # sklearn digits pixels are integer counts in 0..16


class DigitsSplit(NamedTuple):
    """Train/test tensors: images float32 [N, 1, S, S] in [-1, 1], labels int64 [N]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _require_sklearn():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # sklearn is an optional (demo) dependency
        raise ImportError(
            "the digits dataset needs scikit-learn: "
            "`pip install fastdfd[demo]` (or `pip install scikit-learn`)"
        ) from exc
    return load_digits, train_test_split


def load_digits_split(
    image_size: int = 16, test_fraction: float = 0.25, seed: int = 0
) -> DigitsSplit:
    """Load sklearn's 1797 digits, scale to [-1, 1], resize bilinearly, split stratified."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    load_digits, train_test_split = _require_sklearn()

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    images = images / DIGITS_MAX_VALUE * 2.0 - 1.0
    if image_size != images.shape[-1]:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        # Bilinear weights are convex, but guard against float round-off past the range.
        images = images.clamp_(-1.0, 1.0)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)

    indices = torch.arange(labels.numel()).numpy()
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx = torch.as_tensor(train_idx)
    test_idx = torch.as_tensor(test_idx)
    return DigitsSplit(
        x_train=images[train_idx].contiguous(),
        y_train=labels[train_idx].contiguous(),
        x_test=images[test_idx].contiguous(),
        y_test=labels[test_idx].contiguous(),
    )
