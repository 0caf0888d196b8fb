"""The one way a loop borrows a model: a mode (and gradient flags) set for a block and restored after.

A trainer is handed the user's teacher (and a student): whatever it switches for a run, it switches back,
so the model leaves the run as it came in (mode, ``requires_grad`` flags, memory format).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["channels_last_params", "channels_last_weights", "frozen", "in_mode"]


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model.train(training)`` inside; the model's own mode (every submodule's) restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside (a teacher, or a student the generators play against);
    the modes and ``requires_grad`` flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with in_mode(model, False):
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


@contextlib.contextmanager
def channels_last_weights(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """The model's 4-D parameters and buffers in channels_last inside (cuDNN's fast layout with channels_last
    inputs); the original tensors put back after, so the conversion does not outlive the block. The model's
    weights must not be changed inside (a frozen teacher's are not)."""
    if not enabled:
        yield model
        return
    saved = [(t, t.data) for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    with torch.no_grad():
        for t, data in saved:
            t.data = data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, data in saved:
                t.data = data


@contextlib.contextmanager
def channels_last_params(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """The model's 4-D parameters and buffers channels_last inside, for a model that trains inside (a student):
    after the block each holds its values as they are then, in the contiguous format it came in with. The
    Parameter objects stay the same (an optimizer's references hold; its state keeps the layout it was made in).
    """
    if not enabled:
        yield model
        return
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4 and t.is_contiguous()]
    with torch.no_grad():
        for t in tensors:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        with torch.no_grad():
            for t in tensors:
                t.data = t.data.contiguous()
