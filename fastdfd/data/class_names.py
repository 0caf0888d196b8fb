"""Class names that ship with the package (for labelled sample grids and reports)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

IMAGENET_NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-id order (torchvision's ``_IMAGENET_CATEGORIES``)."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected {IMAGENET_NUM_CLASSES}")
    return names


def class_names_for(num_classes: int) -> tuple[str, ...] | None:
    """Known names for a teacher with ``num_classes`` outputs: ImageNet's for 1000, else None (unknown)."""
    return imagenet_class_names() if num_classes == IMAGENET_NUM_CLASSES else None


__all__ = ["IMAGENET_NUM_CLASSES", "class_names_for", "imagenet_class_names"]
