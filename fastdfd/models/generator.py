"""One class-conditional generator of the paper's architecture (from DAFL / Luo et al.).

    concat(z, onehot(y)) -> Linear (no bias) -> [W0, S/2^n, S/2^n] -> BN(eps 0.8) -> LeakyReLU(0.2)
    -> n x [nearest upsample x2 -> conv3x3 -> BN(eps 0.8) -> LeakyReLU(0.2)]   (widths W0..W_{n-1})
    -> conv3x3 to image channels -> tanh -> BN without shift (optional; scale only)

eps 0.8 is DAFL's deliberate choice. The one-hot is over the generator's *own* class
set, so a one-class generator of a 1000-class teacher carries one label row, not 1000.
BN always normalises with the batch's statistics (no running statistics): a generator
is only ever used the way it was trained, in train and in sampling alike.
This module is the readable reference; :class:`fastdfd.GeneratorEnsemble` runs K of
them in one batched pass and converts to and from it exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import ArchitectureSettings

_ARCHITECTURE = ArchitectureSettings()  # one source for the defaults (fastdfd.settings)

BN_EPS = 0.8
OUT_BN_EPS = 1e-5
LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class GeneratorSpec:
    """Architecture shared by every generator of an ensemble (everything but the classes)."""

    image_size: int = 32
    channels: int = 3
    latent_dim: int = _ARCHITECTURE.latent_dim
    widths: tuple[int, ...] = _ARCHITECTURE.widths
    output_bn: bool = _ARCHITECTURE.output_bn

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"non-square images are not supported: image_size={tuple(size)}; the generators "
                                 "(and their fused kernels) make square S x S images: give one size")
            size = size[0]
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"image_size must be an int (the side of square images), got {size!r}")
        object.__setattr__(self, "image_size", int(size))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {self.widths}")
        if self.latent_dim < 1 or self.channels < 1:
            raise ValueError("latent_dim and channels must be positive")
        if self.image_size % self.scale != 0 or self.image_size < self.scale:
            raise ValueError(
                f"image_size {self.image_size} must be a positive multiple of 2^len(widths) = {self.scale}"
            )

    @property
    def scale(self) -> int:
        return 2 ** len(self.widths)

    @property
    def init_size(self) -> int:
        return self.image_size // self.scale

    @property
    def fc_features(self) -> int:
        return self.widths[0] * self.init_size**2

    def conv_shapes(self) -> list[tuple[int, int]]:
        """(out, in) channels of every 3x3 conv, output conv last."""
        ins = (self.widths[0],) + self.widths[:-1]
        return list(zip(self.widths, ins)) + [(self.channels, self.widths[-1])]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def uniform_fan_in_(t: torch.Tensor, fan_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


class Generator(nn.Module):
    """A standalone generator for the classes in ``classes`` (global label ids)."""

    def __init__(self, classes: Sequence[int], spec: GeneratorSpec | None = None, **spec_kwargs):
        super().__init__()
        self.spec = spec if spec is not None else GeneratorSpec(**spec_kwargs)
        self.classes = tuple(int(c) for c in classes)
        if not self.classes or len(set(self.classes)) != len(self.classes) or min(self.classes) < 0:
            raise ValueError(f"classes must be distinct non-negative label ids, got {classes!r}")
        s = self.spec
        self.register_buffer("class_ids", torch.tensor(self.classes, dtype=torch.long), persistent=False)
        self.fc = nn.Linear(s.latent_dim + len(self.classes), s.fc_features, bias=False)
        self.bn0 = nn.BatchNorm2d(s.widths[0], eps=BN_EPS, track_running_stats=False)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        for out_c, in_c in s.conv_shapes()[:-1]:
            self.convs.append(nn.Conv2d(in_c, out_c, 3, padding=1, bias=False))  # bias cancels in BN
            self.bns.append(nn.BatchNorm2d(out_c, eps=BN_EPS, track_running_stats=False))
        self.out = nn.Conv2d(s.widths[-1], s.channels, 3, padding=1)
        self.out_scale = nn.Parameter(torch.ones(s.channels)) if s.output_bn else None

    def local_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Position of each global label in this generator's class set (error if absent)."""
        hit = y.unsqueeze(-1) == self.class_ids
        if not bool(hit.any(-1).all()):
            bad = sorted(set(y[~hit.any(-1)].tolist()))
            raise ValueError(f"labels {bad} are outside this generator's classes {list(self.classes)}")
        return hit.int().argmax(-1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if z.dim() != 2 or z.shape[1] != s.latent_dim or y.shape != z.shape[:1]:
            raise ValueError(f"expected z [B, {s.latent_dim}] and y [B], got {tuple(z.shape)} and {tuple(y.shape)}")
        return self.from_onehot(z, F.one_hot(self.local_labels(y), len(self.classes)).to(z.dtype))

    def from_onehot(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The forward from a one-hot over this generator's classes (no label lookup: vmap-able)."""
        s = self.spec
        h = self.fc(torch.cat([z, onehot], dim=1)).view(-1, s.widths[0], s.init_size, s.init_size)
        h = F.leaky_relu(self.bn0(h), LEAKY_SLOPE)
        for conv, bn in zip(self.convs, self.bns):
            h = F.leaky_relu(bn(conv(F.interpolate(h, scale_factor=2, mode="nearest"))), LEAKY_SLOPE)
        h = torch.tanh(self.out(h))
        if self.out_scale is not None:
            h = F.batch_norm(h, None, None, self.out_scale, None, training=True, eps=OUT_BN_EPS)
        return h
