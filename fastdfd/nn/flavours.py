"""Which modules of a teacher are BatchNorm layers, and how a tap stands in for each.

The zoos a teacher comes from do not all use ``nn.BatchNorm2d``:

- torchvision's ``FrozenBatchNorm2d`` (detection and segmentation backbones) is a plain
  ``nn.Module`` whose weight, bias and running statistics are *buffers*;
- timm's ``BatchNormAct2d`` subclasses ``nn.BatchNorm2d`` and applies its dropout/drop-path
  and activation inside its own ``forward`` (EfficientNet, RegNet, MobileNetV3, ...), as
  ``SyncBatchNormAct`` does after ``SyncBatchNorm``; ``FrozenBatchNormAct2d`` is the frozen
  form of it.

A tap that only normalises would silently distill from another network. Each layer gets
a :class:`Flavour`:

- ``fused``: the module's own forward is eval-mode BN (maybe followed by ``drop`` then
  ``act``, the *epilogue*), which the fused tap reproduces from one read of its input;
- ``own_forward``: anything else that carries running statistics and overrides ``forward``
  (a user's subclass), or a BN layer in training mode. The tap calls the module's own
  forward for the output and takes the moment sums from its input: exact, one more read.

Modules are recognised by the class whose ``forward`` runs (the first in the MRO that defines
one), named by module path and class name, so that neither timm nor torchvision has to be
imported to find their layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..ops.moment.activation import Activation

_BN = nn.modules.batchnorm._BatchNorm

# class (module path, name) -> (frozen: statistics in buffers and no train mode, has an epilogue)
_ZOO: dict[tuple[str, str], tuple[bool, bool]] = {}
for _path in ("timm.layers.norm_act", "timm.models.layers.norm_act"):  # timm >= 0.9, and older timm
    _ZOO[(_path, "BatchNormAct2d")] = (False, True)
    _ZOO[(_path, "SyncBatchNormAct")] = (False, True)
    _ZOO[(_path, "FrozenBatchNormAct2d")] = (True, True)
_ZOO[("torchvision.ops.misc", "FrozenBatchNorm2d")] = (True, False)

# torch's own forwards that are plain BN (BatchNorm1d/2d/3d and the lazy forms inherit _BatchNorm's)
_TORCH_FORWARDS = (_BN.forward, nn.SyncBatchNorm.forward)


@dataclass(frozen=True)
class Flavour:
    """How a tap stands in for one BN layer."""

    name: str  # "batchnorm", "batchnorm_act", "frozen_batchnorm", "frozen_batchnorm_act", "own_forward"
    fused: bool  # the fused tap computes the output (else the module's own forward does)
    frozen: bool  # statistics are buffers and the layer has no train mode
    epilogue: bool  # drop then act after the normalisation (timm's norm + act layers)

    def apply_epilogue(self, module: nn.Module, y):
        """timm's order: ``act(drop(y))``; SyncBatchNormAct may lack either attribute."""
        if not self.epilogue:
            return y
        drop, act = getattr(module, "drop", None), getattr(module, "act", None)
        if drop is not None:
            y = drop(y)
        if act is not None:
            y = act(y)
        return y


# Activation modules a tap can apply in its own pass (fastdfd.ops.moment.activation), by exact class (a
# subclass may compute something else): timm's norm + act layers hold one as ``act``, and a teacher's forward
# may call one after a BN layer (.epilogue).
_ACTIVATION_MODULES = {
    nn.ReLU: lambda m: Activation("relu"),
    nn.ReLU6: lambda m: Activation("relu6"),
    nn.SiLU: lambda m: Activation("silu"),
    nn.LeakyReLU: lambda m: Activation("leaky_relu", m.negative_slope),
    nn.Hardtanh: lambda m: Activation("relu6") if (m.min_val, m.max_val) == (0.0, 6.0) else None,
}


def module_activation(module: nn.Module | None) -> Activation | None:
    """The :class:`Activation` an activation module computes, or None when the taps do not fuse it."""
    make = _ACTIVATION_MODULES.get(type(module))
    return None if make is None else make(module)


def fusable_epilogue(module: nn.Module, flavour: "Flavour") -> Activation | None:
    """For a norm + act layer (timm's): its ``act`` when the tap can apply it in its pass (no drop, or an
    identity one), else None (the tap's output then goes through the layer's own drop and act)."""
    if not flavour.epilogue:
        return None
    drop = getattr(module, "drop", None)
    if drop is not None and type(drop) is not nn.Identity:
        return None
    return module_activation(getattr(module, "act", None))


def _forward_owner(module: nn.Module) -> type:
    for cls in type(module).__mro__:
        if "forward" in cls.__dict__:
            return cls
    return nn.Module


def flavour_of(module: nn.Module) -> Flavour | None:
    """The flavour of a BN layer, or None when ``module`` is not one."""
    owner = _forward_owner(module)
    zoo = _ZOO.get((owner.__module__, owner.__qualname__))
    if zoo is not None:
        frozen, epilogue = zoo
        name = ("frozen_" if frozen else "") + ("batchnorm_act" if epilogue else "batchnorm")
        return Flavour(name, fused=True, frozen=frozen, epilogue=epilogue)
    if not isinstance(module, _BN):
        return None
    if owner.__dict__["forward"] in _TORCH_FORWARDS:
        return Flavour("batchnorm", fused=True, frozen=False, epilogue=False)
    return Flavour("own_forward", fused=False, frozen=False, epilogue=False)


def is_uninitialized_lazy(module: nn.Module) -> bool:
    """A lazy BN that has not seen an input yet (its statistics have no shape), converted or not."""
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in tensors)


def class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


__all__ = ["Flavour", "class_name", "flavour_of", "fusable_epilogue", "is_uninitialized_lazy", "module_activation"]
