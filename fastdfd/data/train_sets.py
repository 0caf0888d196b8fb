"""Training splits for teacher training, with the field's standard augmentation on tensors.

Spec strings are those of :mod:`fastdfd.data.loaders`. Augmentation draws from torch's
global RNG inside ``__getitem__``: in the main process that is the RNG the caller seeds,
in a DataLoader worker it is the per-worker seed the loader derives from its generator, so
a seeded run sees the same crops and flips every time. torchvision is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .loaders import parse_spec

__all__ = [
    "Compose",
    "RandomCropFlip",
    "RandomResizedCropFlip",
    "Resize",
    "make_train_dataset",
]

Transform = Callable[[torch.Tensor], torch.Tensor]

_CIFAR_SIZE = 32
_CIFAR_PADDING = 4  # RandomCrop(32, padding=4): the CIFAR recipe since the ResNet paper
_FOLDER_SIZE = 224
_DIGITS_SIZE = 16


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def _randint(high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, ()))


# The transforms are classes, not closures, so DataLoader workers started with `spawn`
# (macOS, Windows) can pickle them.
class RandomCropFlip:
    """Zero-pad each side by ``padding``, crop back to the input size at a random offset,
    then mirror left-right with probability 1/2 (torchvision's RandomCrop(padding) +
    RandomHorizontalFlip on a [C, H, W] tensor)."""

    def __init__(self, padding: int, flip: bool = True) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding
        self.flip = flip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        p = self.padding
        if p:
            image = F.pad(image, (p, p, p, p))
            top, left = _randint(2 * p + 1), _randint(2 * p + 1)
            image = image[:, top : top + h, left : left + w]
        if self.flip and _coin():
            image = image.flip(-1)
        return image.contiguous()


class RandomResizedCropFlip:
    """Crop a random box (area fraction in ``scale``, log-uniform aspect ratio in ``ratio``),
    resize it bilinearly back to the input size, mirror left-right with probability 1/2."""

    def __init__(
        self,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        attempts: int = 10,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.scale = scale
        self.ratio = ratio
        self.attempts = attempts

    def _box(self, h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(self.attempts):
            target = area * float(torch.empty(()).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(()).uniform_(log_lo, log_hi)))
            bw = round(math.sqrt(target * aspect))
            bh = round(math.sqrt(target / aspect))
            if 0 < bw <= w and 0 < bh <= h:
                return _randint(h - bh + 1), _randint(w - bw + 1), bh, bw
        return 0, 0, h, w  # no box fitted (extreme ratios): keep the whole image

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        top, left, bh, bw = self._box(h, w)
        crop = image[:, top : top + bh, left : left + bw]
        if (bh, bw) != (h, w):
            crop = F.interpolate(crop.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False).squeeze(0)
        if _coin():
            crop = crop.flip(-1)
        return crop.contiguous()


class Resize:
    """Bilinear resize of a [C, H, W] tensor to ``size`` x ``size`` (the eval loader's resize)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            image.unsqueeze(0), size=(self.size, self.size), mode="bilinear", align_corners=False
        ).squeeze(0)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            image = t(image)
        return image


class _Transformed(Dataset):
    """(image, label) items of ``base`` with ``transform`` applied to the image."""

    def __init__(self, base: Dataset, transform: Transform, num_classes: int) -> None:
        self.base = base
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


def _digits(image_size: int | None) -> tuple[Dataset, int]:
    from .digits import load_digits_split

    split = load_digits_split(image_size=_DIGITS_SIZE if image_size is None else image_size)
    # Never augmented: a mirrored 2, 3 or 7 is not that digit, and at 16 px a 2-pixel
    # shift is an eighth of the image (the digits models train well without it).
    dataset = TensorDataset(split.x_train, split.y_train)
    dataset.num_classes = 10
    return dataset, 10


def _cifar(name: str, root: str, image_size: int | None, augment: bool) -> tuple[Dataset, int]:
    from .cifar import CIFAR

    steps: list[Transform] = []
    if augment:
        # On [0, 1] pixels before normalization, so the padding is black as in torchvision.
        steps.append(RandomCropFlip(_CIFAR_PADDING))
    if image_size is not None and image_size != _CIFAR_SIZE:
        steps.append(Resize(image_size))  # after the crop: same framing as the eval resize
    transform = Compose(steps) if steps else None
    dataset = CIFAR(root, name=name, split="train", transform=transform)
    return dataset, dataset.num_classes


def _folder(root: str, image_size: int | None, augment: bool) -> tuple[Dataset, int]:
    from .folders import ImageFolder

    dataset = ImageFolder(root, image_size=_FOLDER_SIZE if image_size is None else image_size)
    if not augment:
        return dataset, dataset.num_classes
    # Folders are ImageNet-like data, where scale augmentation (random-resized crop + flip)
    # is the standard. The box is taken from the eval-style center crop, so train and eval
    # see objects framed alike; the smallest box keeps a quarter of it instead of
    # torchvision's 8% of the whole photo, since that crop already trimmed the borders and
    # user folders are usually trained for far fewer steps than ImageNet's 90+ epochs.
    # Bilinear resize and flips commute with per-channel normalization, so applying them
    # to the normalized tensor equals applying them before it.
    return _Transformed(dataset, RandomResizedCropFlip(), dataset.num_classes), dataset.num_classes


def make_train_dataset(
    spec: str, *, image_size: int | None = None, augment: bool = True
) -> tuple[Dataset, int]:
    """The training split named by ``spec`` and its class count.

    ``digits``: scikit-learn digits train split (16 px unless ``image_size``; never
    augmented). ``cifar10:ROOT`` / ``cifar100:ROOT``: the train split of torchvision's
    pickle layout at ROOT, with random crop 32 (4 px zero padding) + horizontal flip when
    ``augment``, resized after augmentation if ``image_size`` is not 32.
    ``folder:ROOT``: ROOT/<class>/<image>, resize + center crop to ``image_size`` (224),
    then random-resized crop + horizontal flip when ``augment``. Items are
    (float32 [C, S, S] normalized like the eval split, int label).
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    scheme, root = parse_spec(spec, "training data")
    if scheme == "digits":
        return _digits(image_size)
    if scheme in ("cifar10", "cifar100"):
        return _cifar(scheme, root, image_size, augment)
    if scheme.startswith("cifar10-jpeg"):
        raise ValueError(f"{spec!r} is the CIFAR-10 test set (JPEG): an evaluation source, not training data; "
                         "train on cifar10:ROOT (torchvision's layout)")
    return _folder(root, image_size, augment)
