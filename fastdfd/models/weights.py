"""Load a trained network's state_dict into a registry model, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _torchvision_names(state: dict, model: nn.Module) -> dict:
    """torchvision's ResNets call the residual projection ``downsample``; ours call it
    ``shortcut`` (same modules, same order), so torchvision checkpoints load unchanged."""
    own = model.state_dict()
    if any(".downsample." in k for k in own) or not any(".downsample." in k for k in state):
        return state
    return {k.replace(".downsample.", ".shortcut."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, what: str) -> nn.Module:
    """Load a state dict (plain, or under 'state_dict'/'model'/'student') into ``model``.

    FileNotFoundError names a missing file; ValueError names a checkpoint that does not fit
    the architecture (missing or unexpected keys, or a shape), before any work is done.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model", "student"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise TypeError(f"{what} weights {path} hold a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(_torchvision_names(state, model))
    except RuntimeError as e:
        detail = " ".join(str(e).split())  # torch's message spans lines; keep the first few hundred chars
        raise ValueError(f"{what} weights {path} do not match the architecture: {detail[:400]}") from e
    return model
