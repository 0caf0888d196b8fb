"""Benchmark providers: the same work done the field's way and fastdfd's way.

``hooks``: DeepInversion's pattern -- eval BN, and a forward hook computing mean,
permute/contiguous/var and the norms (extra passes over every BN input).
``fastdfd-torch``: the MomentMatcher on the torch backend (tap + one packed finalize).
Later steps add ``hooks-compiled``, ``fastdfd-triton``, ``fastdfd-cuda`` here.
"""

from __future__ import annotations

import torch
from torch import nn

import fastdfd


def hook_r_feature(module: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


def bn_layer_hooks(bn: nn.BatchNorm2d):
    """One BN layer forward+backward with DeepInversion's hook; returns a step function."""

    def step(x: torch.Tensor) -> torch.Tensor:
        y = bn(x)
        loss = hook_r_feature(bn, x) + y.float().square().mean()
        (g,) = torch.autograd.grad(loss, x)
        return g

    return step


def bn_layer_fastdfd(bn: nn.BatchNorm2d):
    """The same work through a MomentMatcher attached to a one-layer 'teacher'."""
    wrapper = nn.Sequential(bn)
    matcher = fastdfd.MomentMatcher(wrapper, kind="l2")

    def step(x: torch.Tensor) -> torch.Tensor:
        y = wrapper(x)
        loss = matcher.loss() + y.float().square().mean()
        (g,) = torch.autograd.grad(loss, x)
        return g

    step.matcher = matcher
    return step


PROVIDERS = {"hooks": bn_layer_hooks, "fastdfd-torch": bn_layer_fastdfd}
