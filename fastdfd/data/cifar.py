"""CIFAR-10/100 read from torchvision's on-disk pickle layout, without torchvision."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CIFAR",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# name -> (folder, {split: batch files}, label key, meta file, label-names key, classes, mean, std)
_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        b"labels",
        "batches.meta",
        b"label_names",
        10,
        CIFAR10_MEAN,
        CIFAR10_STD,
    ),
    "cifar100": (
        "cifar-100-python",
        {"train": ["train"], "test": ["test"]},
        b"fine_labels",
        "meta",
        b"fine_label_names",
        100,
        CIFAR100_MEAN,
        CIFAR100_STD,
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a tampered batch file cannot run code."""

    # Resolve to live objects instead of importing by name: numpy 2 moved numpy.core.
    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        _ALLOWED[(_module, "_reconstruct")] = np.array(0).__reduce__()[0]
        _ALLOWED[(_module, "scalar")] = np.float64(0).__reduce__()[0]
    del _module

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR batch file"
            ) from None


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="bytes").load()


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: expected {path} (torchvision's CIFAR layout). "
        "fastdfd never downloads data; place the extracted archive there yourself."
    )


class UInt8ImageItems(Dataset):
    """Items of an NHWC uint8 array ``images`` with ``labels``: the [C, H, W] float image in [0, 1], then
    ``transform`` (if any), then ``(image - _mean_t) / _std_t`` when ``normalize``; with the int label."""

    images: np.ndarray
    labels: np.ndarray
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]]
    normalize: bool
    _mean_t: torch.Tensor
    _std_t: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        if self.normalize:
            image = (image - self._mean_t) / self._std_t
        return image, int(self.labels[index])


class CIFAR(UInt8ImageItems):
    """CIFAR-10 or CIFAR-100 split as (float32 image [3, 32, 32], int label) items.

    Images are scaled to [0, 1]; ``transform`` (if given) is then applied to that
    float tensor, and finally the dataset's per-channel mean/std normalization
    when ``normalize`` is true.
    """

    def __init__(
        self,
        root: Union[str, Path],
        name: str = "cifar10",
        split: str = "test",
        normalize: bool = True,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        if name not in _LAYOUT:
            raise ValueError(f"name must be one of {sorted(_LAYOUT)}, got {name!r}")
        folder, splits, label_key, meta_file, names_key, num_classes, mean, std = _LAYOUT[name]
        if split not in splits:
            raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")

        self.root = Path(root)
        self.name = name
        self.split = split
        self.normalize = normalize
        self.transform = transform
        self.num_classes = num_classes
        self.mean = mean
        self.std = std

        base = self.root / folder
        if not self.root.is_dir():
            raise _missing(self.root, f"{name} root directory")
        if not base.is_dir():
            raise _missing(base, f"{name} directory")

        data, labels = [], []
        for batch in splits[split]:
            path = base / batch
            if not path.is_file():
                raise _missing(path, f"{name} batch file")
            entry = _load_pickle(path)
            data.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(y) for y in entry[label_key])

        # NHWC uint8 matches torchvision's `.data`; conversion to CHW float happens per item.
        self.images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{base}: {len(self.images)} images but {len(self.labels)} labels"
            )
        self.classes = self._read_class_names(base / meta_file, names_key)
        self._mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def _read_class_names(self, path: Path, key: bytes) -> list:
        # The meta file is optional for evaluation; fall back to index names.
        if path.is_file():
            names = _load_pickle(path).get(key)
            if names is not None and len(names) == self.num_classes:
                return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        return [str(i) for i in range(self.num_classes)]
