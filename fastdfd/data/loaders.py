"""Turn a short dataset spec string into an evaluation DataLoader."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["SPEC_FORMS", "make_eval_loader"]

SPEC_FORMS = ("digits", "cifar10:ROOT", "cifar100:ROOT", "folder:ROOT")

_CIFAR_SIZE = 32


def _resize_to(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def resize(image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            image.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False
        ).squeeze(0)

    return resize


def parse_spec(spec: str, what: str = "eval data") -> Tuple[str, Optional[str]]:
    """``scheme:ROOT`` -> (scheme, root); ``digits`` has no root. ValueError names ``what``."""
    scheme, sep, root = spec.strip().partition(":")
    scheme = scheme.strip().lower()
    if scheme == "digits" and not root:
        return scheme, None
    if scheme in ("cifar10", "cifar100", "folder") and sep and root.strip():
        return scheme, root.strip()
    raise ValueError(
        f"unrecognised {what} spec {spec!r}; accepted forms: {', '.join(SPEC_FORMS)}"
    )


def _build(scheme: str, root: Optional[str], image_size: Optional[int]) -> Tuple[Dataset, int]:
    # Imports stay local so `digits` never touches Pillow and vice versa.
    if scheme == "digits":
        from .digits import load_digits_split

        split = load_digits_split(image_size=16 if image_size is None else image_size)
        return TensorDataset(split.x_test, split.y_test), 10
    if scheme in ("cifar10", "cifar100"):
        from .cifar import CIFAR

        resize = None
        if image_size is not None and image_size != _CIFAR_SIZE:
            resize = _resize_to(image_size)
        dataset = CIFAR(root, name=scheme, split="test", transform=resize)
        return dataset, dataset.num_classes
    from .folders import ImageFolder

    dataset = ImageFolder(root, image_size=224 if image_size is None else image_size)
    return dataset, dataset.num_classes


def make_eval_loader(
    spec: str,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    image_size: Optional[int] = None,
) -> Tuple[DataLoader, int]:
    """Build an unshuffled eval loader for ``spec`` and return it with its class count.

    ``spec`` is one of ``digits`` (held-out split, 16x16 unless ``image_size``),
    ``cifar10:ROOT``, ``cifar100:ROOT`` (test split, resized if ``image_size``
    differs from 32) or ``folder:ROOT`` (ImageNet-style eval, 224 by default).
    """
    scheme, root = parse_spec(spec)
    dataset, num_classes = _build(scheme, root, image_size)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    return loader, num_classes
