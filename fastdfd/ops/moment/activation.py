"""The tap's activation epilogue: ``y = act(BN(x))`` in the tap's own pass, forward and backward.

A teacher's BN layer is most often followed by an activation (ReLU in the CIFAR ResNets and the digits
CNN, ReLU6 in EfficientNet-Lite, SiLU in EfficientNet and RegNet, LeakyReLU in some detectors). Run as
an op of its own, the activation reads and writes the whole activation once more forward and three
more times backward. In the tap's pass it costs nothing: the forward applies it to z = BN(x) before the
store, and the backward recomputes z from x (which it reads anyway) for the derivative, so it still
reads x and dy once (docs/method.md section 8).

    identity    a(z) = z                          a'(z) = 1
    relu        a(z) = max(z, 0)                  a'(z) = [z > 0]
    relu6       a(z) = min(max(z, 0), 6)          a'(z) = [0 < z < 6]           (torch's hardtanh form)
    leaky_relu  a(z) = z if z > 0 else s z        a'(z) = 1 if z > 0 else s      (s: negative_slope)
    silu        a(z) = z sigmoid(z)               a'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))

The derivatives at the kinks are torch's (``threshold_backward``, ``hardtanh_backward``,
``leaky_relu_backward``), so a fused teacher's gradients are the unfused one's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdfd.kernels.moment.layout import ACTIVATION_IDS, ACTIVATIONS


@dataclass(frozen=True)
class Activation:
    """One activation epilogue of the tap.

    Args:
        name: one of :data:`ACTIVATIONS` (``identity``, ``relu``, ``relu6``, ``leaky_relu``, ``silu``).
        negative_slope: ``leaky_relu``'s slope for z <= 0 (a finite float); must be 0 for the others.

    Raises ValueError for an unknown name or a slope the activation does not take.
    """

    name: str = "identity"
    negative_slope: float = 0.0

    def __post_init__(self):
        if self.name not in ACTIVATION_IDS:
            raise ValueError(f"unknown activation {self.name!r}; expected one of {ACTIVATIONS}")
        slope = float(self.negative_slope)
        if slope != slope or slope in (float("inf"), float("-inf")):
            raise ValueError(f"negative_slope must be finite, got {self.negative_slope!r}")
        if self.name != "leaky_relu" and slope != 0.0:
            raise ValueError(f"{self.name} takes no negative_slope (got {self.negative_slope!r})")
        object.__setattr__(self, "negative_slope", slope)

    @property
    def id(self) -> int:
        """The integer the compiled kernels take (:data:`ACTIVATION_IDS`)."""
        return ACTIVATION_IDS[self.name]

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """a(z) in plain torch (differentiable; the reference and the unfused fallback)."""
        return apply_activation(self.name, self.negative_slope, z)

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        """a'(z), elementwise, in z's dtype: what the one-pass backward multiplies dy by."""
        return activation_derivative(self.name, self.negative_slope, z)


# Plain functions of (name, slope) as well as the dataclass's methods: torch.compile traces these with the
# name and slope as constants (the traced tap, .decomposition), where a user dataclass could break the graph.
def apply_activation(name: str, negative_slope: float, z: torch.Tensor) -> torch.Tensor:
    """a(z) for the activation ``name`` (see the module's table)."""
    if name == "identity":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "relu6":
        return F.hardtanh(z, 0.0, 6.0)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if name == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_derivative(name: str, negative_slope: float, z: torch.Tensor) -> torch.Tensor:
    """a'(z) for the activation ``name``, torch's values at the kinks."""
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if name == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


IDENTITY = Activation()


def refuse_epilogue(backend: str, act: int, residual=None) -> None:
    """For the launchers of a backend whose kernels have no epilogue (the dispatch applies the activation, and
    adds a residual, after their tap): ValueError if one reaches them anyway."""
    if act:
        raise ValueError(f"the {backend} tap kernels take no activation epilogue (got id {act})")
    if residual is not None:
        raise ValueError(f"the {backend} tap kernels take no residual")


def as_activation(activation: Activation | str | None) -> Activation:
    """``None`` -> identity, a name -> :class:`Activation` (``leaky_relu`` with torch's default slope, 0.01), an
    :class:`Activation` as is.

    Raises TypeError for anything else, ValueError for an unknown name.
    """
    if activation is None:
        return IDENTITY
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        return Activation(activation, 0.01 if activation == "leaky_relu" else 0.0)
    raise TypeError(f"activation must be an Activation, a name or None, got {type(activation).__name__}")


__all__ = ["ACTIVATIONS", "Activation", "IDENTITY", "activation_derivative", "apply_activation", "as_activation"]
