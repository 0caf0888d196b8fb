"""Class-per-subfolder image datasets with the usual ImageNet eval transform."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageFolder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Eval resizes the short side to size * 256/224 before the center crop (ImageNet convention).
_RESIZE_RATIO = 256 / 224


def _require_pil():
    try:
        from PIL import Image
    except ImportError as exc:  # Pillow is only needed for folder datasets
        raise ImportError("ImageFolder needs Pillow: `pip install pillow`") from exc
    return Image


def _channel_stats(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        pass
    elif len(values) == 1:
        values = values * channels
    elif channels == 1:
        # RGB statistics on a grayscale load: use their average rather than failing.
        values = (sum(values) / len(values),)
    else:
        raise ValueError(f"{what} has {len(values)} values for {channels} channels")
    return torch.tensor(values, dtype=torch.float32).view(channels, 1, 1)


class ImageFolder(Dataset):
    """``root/<class>/<image>`` dataset; class index = position of the sorted folder name.

    Items are (float32 [C, S, S], int). Each image is resized (bilinear) so its
    short side is ``round(image_size * 256 / 224)``, center-cropped to
    ``image_size``, scaled to [0, 1] and normalized with ``mean``/``std``
    (pass ``None`` for both to skip normalization).
    """

    def __init__(
        self,
        root: Union[str, Path],
        image_size: int = 224,
        mean: Optional[Sequence[float]] = IMAGENET_MEAN,
        std: Optional[Sequence[float]] = IMAGENET_STD,
        channels: int = 3,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither")
        self.root = Path(root)
        self.image_size = image_size
        self.resize_size = int(round(image_size * _RESIZE_RATIO))
        self.channels = channels
        self._mean = None if mean is None else _channel_stats(mean, channels, "mean")
        self._std = None if std is None else _channel_stats(std, channels, "std")

        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.classes: List[str] = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: List[Tuple[Path, int]] = [
            (path, idx)
            for name, idx in self.class_to_idx.items()
            for path in sorted((self.root / name).rglob("*"))
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"no images in {self.root}: expected {self.root}/<class>/<image> "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
            )
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> torch.Tensor:
        Image = _require_pil()
        with Image.open(path) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            w, h = img.size
            short, long = min(w, h), max(w, h)
            # Truncating the long side matches torchvision's Resize(int) exactly.
            new_short, new_long = self.resize_size, max(1, int(self.resize_size * long / short))
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            if (new_w, new_h) != (w, h):
                resample = getattr(Image, "Resampling", Image).BILINEAR
                img = img.resize((new_w, new_h), resample)
            array = np.asarray(img, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return self._center_crop(tensor)

    def _center_crop(self, image: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        _, h, w = image.shape
        if h < size or w < size:
            # Only possible for tiny images after rounding; pad so the crop is defined.
            pad_h, pad_w = max(size - h, 0), max(size - w, 0)
            image = torch.nn.functional.pad(
                image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            )
            _, h, w = image.shape
        top = int(round((h - size) / 2.0))
        left = int(round((w - size) / 2.0))
        return image[:, top : top + size, left : left + size]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = self._load(path).float().div_(255.0)
        if self._mean is not None:
            image = (image - self._mean) / self._std
        return image, label
