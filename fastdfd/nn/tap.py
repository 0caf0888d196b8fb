"""BNTap: stands in for a teacher's BatchNorm layer while a MomentMatcher is attached.

It computes the eval-mode BN output and the layer's moment sums in one op
(``fastdfd.ops.moment_tap``), so a fused backend reads the activation once for both.
It registers the *same* Parameter and buffer objects as the BN layer under the same
names: the teacher's ``state_dict``, ``parameters()`` and ``.to()`` behave as before, and
the values are never written (no running-stat update, no momentum).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..ops import moment_tap
from ..ops.reference import eval_batch_norm

if TYPE_CHECKING:
    from .matcher import MomentMatcher

_STATE = ("weight", "bias")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class BNTap(nn.Module):
    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, slot: int, matcher: "MomentMatcher"):
        super().__init__()
        self.eps = float(bn.eps)
        self.num_features = bn.num_features
        self.slot = slot
        # Plain attributes (not submodules): the teacher's module tree must not grow.
        object.__setattr__(self, "original", bn)
        object.__setattr__(self, "_matcher", matcher)
        for name in _STATE:
            self._parameters[name] = bn._parameters.get(name)
        for name in _BUFFERS:
            if name in bn._buffers:
                self._buffers[name] = bn._buffers[name]
        self.training = bn.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matcher = self._matcher
        if not matcher.enabled:
            return eval_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        groups = matcher.active_groups
        y, s1, s2 = moment_tap(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps, groups)
        matcher._record(self.slot, s1, s2, x.numel() // (x.shape[1] * groups))
        return y

    def restore(self) -> nn.modules.batchnorm._BatchNorm:
        """Hand the current parameter/buffer objects back (``.to()`` may have replaced them)."""
        bn = self.original
        for name in _STATE:
            bn._parameters[name] = self._parameters.get(name)
        for name in _BUFFERS:
            if name in self._buffers:
                bn._buffers[name] = self._buffers[name]
        bn.train(self.training)  # the teacher's mode may have been switched while attached
        return bn

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__}({self.num_features}, eps={self.eps}), slot={self.slot}"
