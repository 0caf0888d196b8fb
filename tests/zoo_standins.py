"""Stand-ins for the zoo's BatchNorm flavours, for `make test` (which has neither timm nor torchvision).

Each behaves as the real class does (checked against the real ones by `make test-zoo`) and
carries the real class's module path and name, which is how fastdfd recognises them:

- timm ``BatchNormAct2d``: an ``nn.BatchNorm2d`` whose forward normalises, then applies
  ``self.drop`` and ``self.act`` (both submodules);
- timm ``FrozenBatchNormAct2d``: a plain module with weight, bias and running statistics as
  buffers, normalising with them, then ``act(drop(.))``;
- torchvision ``FrozenBatchNorm2d``: the same without the epilogue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, act_layer=nn.SiLU, drop_layer=None):
        super().__init__(num_features, eps=eps)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or self.running_mean is None
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, factor,
                         self.eps)
        return self.act(self.drop(x))


class FrozenBatchNormAct2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, act_layer=nn.ReLU):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return self.act(self.drop(x * scale + shift))


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


for _cls in (BatchNormAct2d, FrozenBatchNormAct2d):
    _cls.__module__ = "timm.layers.norm_act"
FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A user's subclass that overrides forward (fastdfd cannot know what it does)."""

    def forward(self, x):
        return 0.5 * super().forward(x) + 0.25


def randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random, plausible statistics and affine values on every BN-like layer (buffers or parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is None:
                continue
            n = m.running_mean.numel()
            m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def flavour_net(num_classes: int = 7) -> nn.Sequential:
    """A small CNN with one layer of every flavour, plus BatchNorm1d on the features."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.SiLU),
        nn.Conv2d(8, 8, 3, padding=1), FrozenBatchNormAct2d(8), nn.SiLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1), FrozenBatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, num_classes),
    )
