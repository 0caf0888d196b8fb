"""BNTap: stands in for a teacher's BatchNorm layer while a MomentMatcher is attached.

For the layers whose forward is eval-mode BN (``fused`` flavours, :mod:`.flavours`), it
computes the BN output and the layer's moment sums in one op (``fastdfd.ops.moment_tap``),
so a fused backend reads the activation once for both, then applies the layer's own
epilogue (timm's ``drop`` and ``act``). An activation that follows the layer in the teacher's
forward can be handed to the tap (:mod:`.epilogue`): the tap then applies it in the same pass, and so
the residual add of a basic block before it (the rewritten forward then passes the residual).
Any other layer, and any BN layer in training mode, runs its own forward for the output while
the sums are taken from its input: the teacher's outputs are exactly what they are without a
matcher, whatever the layer does.

It registers the *same* Parameter, buffer and submodule objects as the layer under the same
names: the teacher's ``state_dict``, ``parameters()`` and ``.to()`` behave as before, and the
matcher itself never writes a value (a layer in training mode updates its running statistics
as it would without the tap; the loss keeps the statistics seen at attach time).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import moment_sums, moment_tap
from ..ops.moment.activation import Activation
from ..ops.moment.reference import eval_batch_norm
from .flavours import Flavour, fusable_epilogue
from .moment_record import MomentRecord


class BNTap(nn.Module):
    def __init__(self, bn: nn.Module, slot: int, record: MomentRecord, flavour: Flavour):
        super().__init__()
        self.eps = float(bn.eps)
        self.num_features = int(bn.running_mean.numel())
        self.slot = slot
        self.flavour = flavour
        # Plain attributes (not submodules): the teacher's module tree must not grow.
        object.__setattr__(self, "original", bn)
        object.__setattr__(self, "_record", record)  # where the sums go (the matcher owns and reads it)
        # The same objects under the same names (timm keeps act/drop as submodules, torchvision
        # FrozenBatchNorm2d its weight and bias as buffers).
        self._parameters.update(bn._parameters)
        self._buffers.update(bn._buffers)
        self._modules.update(bn._modules)
        self._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
        self.training = bn.training
        # The activation that follows the layer in the teacher's forward (directly, or after a residual add
        # when the tap is called with a residual), applied here instead (set by .epilogue.fuse_epilogues, which
        # takes it out of the forward); None: no epilogue of that kind.
        self.activation: Activation | None = None
        # A norm + act layer's own act (timm), applied in the tap's pass when it can be (no drop layer)
        self.own_activation = fusable_epilogue(bn, flavour)

    def _affine(self, name: str) -> torch.Tensor | None:
        return self._parameters[name] if name in self._parameters else self._buffers.get(name)

    def _uses_batch_statistics(self) -> bool:
        # BN in training mode normalises with the batch's statistics and updates its own
        return self.training and not self.flavour.frozen

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:  # only the rewritten forward passes one (.epilogue): a(BN(x) + residual)
            return self._forward_residual(x, residual)
        return self._output(x, self.activation if self._record.epilogues else None)

    def _forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``activation(BN(x) + residual)``: the residual add (and the activation after it) that
        :func:`.epilogue.fuse_epilogues` took out of the teacher's forward, in the tap's pass where the
        residual matches x exactly; otherwise BN, then the add (broadcasting, type promotion) and the
        activation as torch ops, as the teacher's forward had them."""
        act = self.activation
        if (self.flavour.fused and not self._uses_batch_statistics() and self._record.enabled
                and self.own_activation is None and isinstance(residual, torch.Tensor)
                and residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device):
            return self._tap(x, act, residual)
        y = self._output(x, None) + residual
        return y if act is None else act(y)

    def _tap(self, x: torch.Tensor, act: Activation | None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The fused op on an eval-mode BN layer: its output with ``act`` (and ``residual``) applied in the same
        pass, its sums recorded."""
        record, groups = self._record, self._record.active_groups
        y, s1, s2 = moment_tap(x, self.running_mean, self.running_var, self._affine("weight"), self._affine("bias"),
                               self.eps, groups, act, residual=residual)
        record.add(self.slot, s1, s2, x.numel() // (x.shape[1] * groups))
        return y

    def _output(self, x: torch.Tensor, act: Activation | None) -> torch.Tensor:
        """The layer's output (its sums recorded when the matcher is enabled), then ``act`` if given."""
        record = self._record
        if self.flavour.fused and not self._uses_batch_statistics():
            if record.enabled:
                if self.own_activation is not None:  # the layer's act in the tap's pass (no teacher-level one)
                    return self._tap(x, self.own_activation)
                return self.flavour.apply_epilogue(self, self._tap(x, act))
            y = eval_batch_norm(x, self.running_mean, self.running_var, self._affine("weight"), self._affine("bias"),
                                self.eps)
            return self.flavour.apply_epilogue(self, y if act is None else act(y))
        if record.enabled:
            groups = record.active_groups
            s1, s2 = moment_sums(x, record.shift(self.slot, x.device), groups)
            record.add(self.slot, s1, s2, x.numel() // (x.shape[1] * groups))
        y = self._own_forward(x)
        return y if act is None else act(y)

    def _own_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.restore()(x)

    def restore(self) -> nn.Module:
        """The layer with the current parameter/buffer objects (``.to()`` may have replaced them) and
        mode: what its own forward runs with, and what goes back into the teacher on removal."""
        bn = self.original
        bn._parameters.update(self._parameters)
        bn._buffers.update(self._buffers)
        bn.train(self.training)  # the teacher's mode may have been switched while attached
        return bn

    def extra_repr(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation.name}"
        return (f"{type(self.original).__name__}({self.num_features}, eps={self.eps}), slot={self.slot}, "
                f"flavour={self.flavour.name}{act}")
