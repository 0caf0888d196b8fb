"""The teacher's input space: the per-channel normalisation it was trained with.

Pixels are RGB (or grey) values in [0, 1], as torchvision's ``ToTensor`` gives them; a
teacher sees ``(pixels - mean) / std`` per channel. A generator's output layer is a tanh,
so its image ``g`` in [-1, 1] *is* the pixels ``(g + 1) / 2``; the trainer and the distiller
hand the teacher (and the student) ``normalize(pixels)``, and sample grids show pixels.

Presets (name: mean / std):

- ``identity`` (default): 0 / 1 -- the teacher sees pixels in [0, 1];
- ``minus_one_one``: 0.5 / 0.5 -- pixels scaled to [-1, 1] (also written ``[-1,1]``): the
  digits teacher of the demo, TF-style and EfficientNet-Lite teachers;
- ``imagenet``: (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), torchvision's ImageNet models;
- ``cifar10``: (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616), the CIFAR-10 training
  set's per-channel moments;
- ``cifar100``: (0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762), CIFAR-100's.

A one-value mean/std applies to every channel; otherwise it must have one value per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "identity": ((0.0,), (1.0,)),
    "minus_one_one": ((0.5,), (0.5,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_ALIASES = {"[-1,1]": "minus_one_one", "none": "identity", "cifar-10": "cifar10", "cifar-100": "cifar100"}


@dataclass(frozen=True)
class InputSpace:
    """``teacher_input = (pixels - mean) / std`` per channel, pixels in [0, 1].

    Attributes:
        mean, std: one value, or one per channel (std > 0).
        name: the preset's name, or ``custom``.
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    name: str = "custom"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if not mean or len(mean) != len(std):
            raise ValueError(f"input space mean {mean} and std {std} need the same, non-zero number of values")
        if any(not s > 0 for s in std) or any(v != v for v in mean):
            raise ValueError(f"input space std must be positive and mean finite, got mean {mean}, std {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def preset(cls, name: str) -> "InputSpace":
        key = _ALIASES.get(name.strip().lower().replace(" ", ""), name.strip().lower())
        if key not in PRESETS:
            raise ValueError(f"unknown input space {name!r}; presets are {sorted(PRESETS)} "
                             "(or give mean=...,std=... values)")
        mean, std = PRESETS[key]
        return cls(mean, std, key)

    @classmethod
    def parse(cls, spec: "str | InputSpace | None") -> "InputSpace":
        """An InputSpace from a preset name, ``mean=a,b,c;std=d,e,f``, an InputSpace, or None (identity)."""
        if spec is None:
            return cls.preset("identity")
        if isinstance(spec, InputSpace):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"input space must be a preset name, 'mean=...;std=...' or an InputSpace, got {spec!r}")
        if "=" not in spec:
            return cls.preset(spec)
        fields = {}
        for part in spec.split(";"):
            key, _, values = part.partition("=")
            if key.strip() not in ("mean", "std") or not values.strip():
                raise ValueError(f"input space {spec!r}: expected 'mean=v[,v,...];std=v[,v,...]'")
            try:
                fields[key.strip()] = tuple(float(v) for v in values.split(","))
            except ValueError:
                raise ValueError(f"input space {spec!r}: {values!r} is not a list of numbers") from None
        if set(fields) != {"mean", "std"}:
            raise ValueError(f"input space {spec!r}: needs both mean= and std=")
        return cls(fields["mean"], fields["std"])

    def check_channels(self, channels: int, what: str = "the images") -> None:
        """ValueError when a per-channel mean/std does not fit ``channels``."""
        if len(self.mean) not in (1, channels):
            raise ValueError(f"input space {self.name!r} has {len(self.mean)} channels of mean/std but {what} have "
                             f"{channels} channel(s)")

    def _affine(self, x: torch.Tensor, scale: float, shift: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel a, b with ``normalize(scale * x + shift) = a * x + b``, shaped to broadcast over x;
        None when the map is the identity. Cached per (device, dtype, rank): no copy inside a step
        (a CUDA graph cannot capture one)."""
        self.check_channels(x.shape[1])
        key = (scale, shift, x.device, x.dtype, x.dim())
        if key not in self._cache:
            a = [scale / s for s in self.std]
            b = [(shift - m) / s for m, s in zip(self.mean, self.std)]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            self._cache[key] = None if all(v == 1.0 for v in a) and all(v == 0.0 for v in b) else (
                torch.tensor(a, dtype=x.dtype).view(shape).to(x.device),
                torch.tensor(b, dtype=x.dtype).view(shape).to(x.device))
        return self._cache[key]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, *spatial] pixels in [0, 1] -> the teacher's input (same shape, dtype and device)."""
        ab = self._affine(pixels, 1.0, 0.0)
        return pixels if ab is None else torch.addcmul(ab[1], pixels, ab[0])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's input -> pixels (the inverse of :meth:`normalize`)."""
        ab = self._affine(x, 1.0, 0.0)
        return x if ab is None else (x - ab[1]) / ab[0]

    def from_generator(self, images: torch.Tensor) -> torch.Tensor:
        """A generator's tanh output g in [-1, 1] -> the teacher's input ``normalize((g + 1) / 2)``.

        One per-channel affine map (autograd flows through it to the generator); ``minus_one_one``
        hands g over unchanged.
        """
        ab = self._affine(images, 0.5, 0.5)
        return images if ab is None else torch.addcmul(ab[1], images, ab[0])

    def __str__(self) -> str:
        return self.name if self.name != "custom" else f"mean={self.mean}, std={self.std}"


def generator_pixels(images: torch.Tensor) -> torch.Tensor:
    """A generator's tanh output in [-1, 1] -> pixels in [0, 1] (clamped: an output BN can leave the range)."""
    return ((images + 1) * 0.5).clamp(0, 1)


__all__ = ["InputSpace", "PRESETS", "generator_pixels"]
