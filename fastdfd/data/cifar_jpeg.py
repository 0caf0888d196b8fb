"""The CIFAR-10 test set stored as JPEG files in a tar, split into a tune half and a held-out half.

Layout: ``test.tar`` holding ``test/<class>/NNNN.jpg``, 1,000 files per class, the classes in
CIFAR-10's order (airplane ... truck, labels 0-9). Files ``0000``-``0499`` of each class are the
**tune** half (choose settings and run studies there), ``0500``-``0999`` the **held-out** half
(final figures only). The whole tar is decoded once (Pillow) into a uint8 array; nothing is
written or downloaded.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from .cifar import CIFAR10_MEAN, CIFAR10_STD, UInt8ImageItems

__all__ = ["CIFAR10_CLASSES", "CIFAR10JPEG", "JPEG_SPLITS", "find_cifar10_tar"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# split -> the file numbers it takes in every class
JPEG_SPLITS = {"tune": range(0, 500), "heldout": range(500, 1000), "all": range(0, 1000)}
_TAR_NAME = "test.tar"
_cache: dict = {}  # (resolved path, mtime, size) -> (images, labels, numbers): one decode per process


def find_cifar10_tar(root: Union[str, Path]) -> Path:
    """``root`` itself when it is a file, else ``root/test.tar``; FileNotFoundError names what was looked for."""
    root = Path(root)
    path = root if root.is_file() else root / _TAR_NAME
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 JPEG tar not found: expected {path} (test/<class>/NNNN.jpg inside). "
                                "fastdfd never downloads data; point at the folder that holds test.tar or at the tar.")
    return path


def _decode(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image of the tar: uint8 [N, 32, 32, 3], labels [N], file numbers [N]."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("the CIFAR-10 JPEG reader needs Pillow: `pip install pillow`") from exc

    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _cache:
        return _cache[key]
    images, labels, numbers = [], [], []
    index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    try:
        tar = tarfile.open(path)
    except tarfile.TarError as e:
        raise ValueError(f"{path} is not a readable tar file: {e}") from e
    with tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2 or not parts[-1].lower().endswith(".jpg"):
                continue
            cls, stem = parts[-2], Path(parts[-1]).stem
            if cls not in index or not stem.isdigit():
                raise ValueError(f"{path}: unexpected member {member.name!r}; expected test/<class>/NNNN.jpg with "
                                 f"<class> one of {', '.join(CIFAR10_CLASSES)}")
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
            if pixels.shape != (32, 32, 3):
                raise ValueError(f"{path}: {member.name} is {pixels.shape[1]}x{pixels.shape[0]}, not 32x32")
            images.append(pixels)
            labels.append(index[cls])
            numbers.append(int(stem))
    if not images:
        raise ValueError(f"{path} holds no test/<class>/NNNN.jpg files")
    order = np.lexsort((np.asarray(numbers), np.asarray(labels)))  # class-major, then file number
    out = (np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order], np.asarray(numbers)[order])
    _cache.clear()  # keep one tar's pixels (30 MB), not every one ever read
    _cache[key] = out
    return out


class CIFAR10JPEG(UInt8ImageItems):
    """A half (or all) of the CIFAR-10 JPEG test tar as (float32 image [3, 32, 32], int label) items.

    Args:
        root: the folder holding ``test.tar``, or the tar file.
        split: ``"tune"`` (files 0000-0499 of each class), ``"heldout"`` (0500-0999) or ``"all"``.
        normalize: apply CIFAR-10's training-set mean/std (the ``cifar10`` input space) after
            ``transform``; False leaves pixels in [0, 1].
        transform: applied to the [0, 1] float image before normalisation.

    Items are class-major, in file order. FileNotFoundError for a missing tar, ValueError for an
    unknown split, a tar of another layout, or a split with no files.
    """

    def __init__(self, root: Union[str, Path], split: str = "heldout", normalize: bool = True,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if split not in JPEG_SPLITS:
            raise ValueError(f"split must be one of {sorted(JPEG_SPLITS)}, got {split!r}")
        self.path = find_cifar10_tar(root)
        images, labels, numbers = _decode(self.path)
        keep = np.isin(numbers, np.asarray(JPEG_SPLITS[split]))
        if not keep.any():
            raise ValueError(f"{self.path} has no files numbered {JPEG_SPLITS[split].start:04d}-"
                             f"{JPEG_SPLITS[split].stop - 1:04d} (the {split!r} split)")
        self.images, self.labels = images[keep], labels[keep]
        self.split, self.normalize, self.transform = split, normalize, transform
        self.num_classes, self.classes = 10, list(CIFAR10_CLASSES)
        self.mean, self.std = CIFAR10_MEAN, CIFAR10_STD
        self._mean_t = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self._std_t = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def pixels(self) -> torch.Tensor:
        """Every image of the split at once: float32 [N, 3, 32, 32] in [0, 1] (no transform, no normalisation)."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)
