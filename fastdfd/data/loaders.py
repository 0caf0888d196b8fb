"""Turn a short dataset spec string into an evaluation DataLoader, in a teacher's input space.

Without an input space each dataset keeps its own normalisation (digits in [-1, 1], CIFAR
with its mean/std, folders with ImageNet's: :data:`NATIVE_SPACES`). With one
(:class:`fastdfd.input_space.InputSpace` or its spec), the images are read as pixels in
[0, 1] and normalised with it: what a teacher trained in that space, and a student distilled
from it, are evaluated on.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..input_space import InputSpace

__all__ = ["NATIVE_SPACES", "SPEC_FORMS", "InInputSpace", "in_input_space", "make_eval_loader", "native_space"]

SPEC_FORMS = ("digits", "cifar10:ROOT", "cifar100:ROOT", "folder:ROOT", "cifar10-jpeg:ROOT",
              "cifar10-jpeg-tune:ROOT", "cifar10-jpeg-heldout:ROOT")
# the CIFAR-10 JPEG test tar (:mod:`.cifar_jpeg`): scheme -> split
_JPEG_SCHEMES = {"cifar10-jpeg": "all", "cifar10-jpeg-tune": "tune", "cifar10-jpeg-heldout": "heldout"}

_CIFAR_SIZE = 32
# each scheme's own normalisation (what its datasets return when no input space is asked for)
NATIVE_SPACES = {"digits": "minus_one_one", "cifar10": "cifar10", "cifar100": "cifar100", "folder": "imagenet",
                 **{scheme: "cifar10" for scheme in _JPEG_SCHEMES}}
_CHANNELS = {"digits": 1, "cifar10": 3, "cifar100": 3, "folder": 3, **{scheme: 3 for scheme in _JPEG_SCHEMES}}

SpaceSpec = Union[str, InputSpace, None]


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
    if scheme in ("cifar10", "cifar100", "folder", *_JPEG_SCHEMES) and sep and root.strip():
        return scheme, root.strip()
    raise ValueError(
        f"unrecognised {what} spec {spec!r}; accepted forms: {', '.join(SPEC_FORMS)}"
    )


def native_space(spec: str) -> InputSpace:
    """The normalisation the datasets of ``spec`` return by themselves (:data:`NATIVE_SPACES`)."""
    return InputSpace.preset(NATIVE_SPACES[parse_spec(spec, "data")[0]])


def _space_for(scheme: str, spec: str, input_space: SpaceSpec) -> Optional[InputSpace]:
    if input_space is None:
        return None
    space = InputSpace.parse(input_space)
    space.check_channels(_CHANNELS[scheme], f"the images of {spec}")
    return space


class InInputSpace(Dataset):
    """(image, label) items of ``base`` mapped per channel from the space they are in (``source``)
    to ``target``: ``target.normalize(source.denormalize(image))``, one affine map. ``source``
    identity: the items are pixels in [0, 1]. Class count and names are passed through."""

    def __init__(self, base: Dataset, target: InputSpace, source: Optional[InputSpace] = None) -> None:
        self.base = base
        self.target = target
        self.source = source if source is not None else InputSpace.preset("identity")
        self.num_classes = getattr(base, "num_classes", None)
        if hasattr(base, "classes"):
            self.classes = base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        batch = image.unsqueeze(0)
        return self.target.normalize(self.source.denormalize(batch)).squeeze(0), label


def in_input_space(dataset: Dataset, spec: str, input_space: SpaceSpec) -> Dataset:
    """``dataset`` (made by :func:`make_train_dataset` or :func:`make_eval_loader` for ``spec``
    without an input space, so in the dataset's own normalisation) in ``input_space``; None or
    the dataset's own space returns it unchanged. The map is per-channel affine, so it commutes
    with the crops, flips and bilinear resizes the training splits apply (exact up to rounding)."""
    scheme, _ = parse_spec(spec, "data")
    space = _space_for(scheme, spec, input_space)
    native = InputSpace.preset(NATIVE_SPACES[scheme])
    if space is None or (space.mean, space.std) == (native.mean, native.std):
        return dataset
    return InInputSpace(dataset, space, native)


def _build(scheme: str, root: Optional[str], image_size: Optional[int],
           space: Optional[InputSpace] = None) -> Tuple[Dataset, int]:
    """The eval split; with ``space``, read as pixels in [0, 1] and normalised with it."""
    # Imports stay local so `digits` never touches Pillow and vice versa.
    if scheme == "digits":
        from .digits import load_digits_split

        split = load_digits_split(image_size=16 if image_size is None else image_size)
        x = split.x_test if space is None else space.normalize((split.x_test + 1) * 0.5)
        return TensorDataset(x, split.y_test), 10
    if scheme in ("cifar10", "cifar100"):
        from .cifar import CIFAR

        resize = None
        if image_size is not None and image_size != _CIFAR_SIZE:
            resize = _resize_to(image_size)
        dataset = CIFAR(root, name=scheme, split="test", transform=resize, normalize=space is None)
        return (dataset if space is None else InInputSpace(dataset, space)), dataset.num_classes
    if scheme in _JPEG_SCHEMES:
        from .cifar_jpeg import CIFAR10JPEG

        resize = _resize_to(image_size) if image_size is not None and image_size != _CIFAR_SIZE else None
        dataset = CIFAR10JPEG(root, split=_JPEG_SCHEMES[scheme], transform=resize, normalize=space is None)
        return (dataset if space is None else InInputSpace(dataset, space)), dataset.num_classes
    from .folders import ImageFolder

    size = 224 if image_size is None else image_size
    if space is None:
        dataset = ImageFolder(root, image_size=size)
        return dataset, dataset.num_classes
    dataset = ImageFolder(root, image_size=size, mean=None, std=None)
    return InInputSpace(dataset, space), dataset.num_classes


def make_eval_loader(
    spec: str,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    image_size: Optional[int] = None,
    input_space: SpaceSpec = None,
) -> Tuple[DataLoader, int]:
    """Build an unshuffled eval loader for ``spec`` and return it with its class count.

    ``spec`` is one of ``digits`` (held-out split, 16x16 unless ``image_size``),
    ``cifar10:ROOT``, ``cifar100:ROOT`` (test split, resized if ``image_size``
    differs from 32), ``folder:ROOT`` (ImageNet-style eval, 224 by default), or the CIFAR-10
    JPEG test tar (``ROOT`` its folder or the tar; :class:`~fastdfd.data.cifar_jpeg.CIFAR10JPEG`):
    ``cifar10-jpeg:ROOT`` all 10,000 images, ``cifar10-jpeg-tune:ROOT`` the tune half,
    ``cifar10-jpeg-heldout:ROOT`` the held-out half.
    ``input_space`` (an :class:`~fastdfd.input_space.InputSpace`, a preset name or
    ``mean=...;std=...``): the images are pixels in [0, 1] (digits: ``(x + 1) / 2``)
    normalised with it; None keeps each dataset's own normalisation (:data:`NATIVE_SPACES`).
    ValueError when the space's per-channel values do not fit the images.
    """
    scheme, root = parse_spec(spec)
    space = _space_for(scheme, spec, input_space)
    dataset, num_classes = _build(scheme, root, image_size, space)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    return loader, num_classes
