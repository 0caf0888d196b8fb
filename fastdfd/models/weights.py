"""Load a trained network's state_dict into a model, with errors that name the file.

Accepted layouts (the ones fastdfd, torchvision and timm write):

- a plain state_dict (``torch.save(model.state_dict(), f)``: fastdfd's teacher.pt/student.pt,
  torchvision's published ``.pth`` files, a timm model's ``pytorch_model.bin``);
- a checkpoint dict holding it under ``state_dict``, ``model`` or ``student`` (fastdfd's and
  most training scripts'), or ``state_dict_ema`` / ``model_ema`` alone (timm's ``train.py``
  writes ``state_dict`` and, with ``--model-ema``, ``state_dict_ema`` beside it: the first
  found in this order is used, so the plain weights win over the EMA copy);
- timm's training checkpoints, which also keep ``args`` (an ``argparse.Namespace``): allowed
  through ``torch.load(weights_only=True)``, nothing else is unpickled;
- ``.safetensors`` files (timm's hub format), when the ``safetensors`` package is installed;
- keys prefixed ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (torch.compile), which
  are stripped when the model has no such prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
from pathlib import Path

import torch
from torch import nn

STATE_KEYS = ("state_dict", "model", "student", "state_dict_ema", "model_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _torchvision_names(state: dict, model: nn.Module) -> dict:
    """torchvision's ResNets call the residual projection ``downsample``; ours call it
    ``shortcut`` (same modules, same order), so torchvision checkpoints load unchanged."""
    own = model.state_dict()
    if any(".downsample." in k for k in own) or not any(".downsample." in k for k in state):
        return state
    return {k.replace(".downsample.", ".shortcut."): v for k, v in state.items()}


def _unwrapped_names(state: dict, model: nn.Module) -> dict:
    """Strip DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes the model does not have."""
    own = model.state_dict()
    out = state
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out) and not any(k.startswith(prefix) for k in own):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _read(path: Path, what: str):
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{what} weights {path} are a .safetensors file, which needs the safetensors "
                              "package: pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"{what} weights {path} cannot be read as safetensors: {type(e).__name__}: {e}") from e
    try:
        # timm's train.py keeps its argparse.Namespace in the checkpoint ('args'); allow that one class
        allow = getattr(torch.serialization, "safe_globals", None)
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe, text = _unsafe_globals(path), " ".join(str(e).split())
        if not unsafe and "Unsupported global" not in text:  # not a pickle torch.save wrote
            detail = text.partition("WeightsUnpickler error:")[2].partition(" Check the documentation")[0].strip()
            raise ValueError(f"{what} weights {path} are not a readable torch file: "
                             f"{(detail or text)[:300]}") from e
        raise ValueError(f"{what} weights {path} hold more than tensors and cannot be loaded safely "
                         f"(torch.load weights_only){unsafe}; save the state_dict alone: "
                         f"torch.save(model.state_dict(), FILE)") from e
    except Exception as e:  # noqa: BLE001  (a file that is not a torch file: KeyError, EOFError, RuntimeError...)
        raise ValueError(f"{what} weights {path} are not a readable torch file: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from e


def _unsafe_globals(path: Path) -> str:
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        names = find(str(path)) if find is not None else []
    except Exception:  # noqa: BLE001
        names = []
    return f": it holds {', '.join(names[:5])}" if names else ""


def load_weights(model: nn.Module, path: str | Path, what: str) -> nn.Module:
    """Load a state dict (see the module's docstring for the layouts) into ``model``, in place.

    FileNotFoundError names a missing file; ValueError names a file that is not a checkpoint,
    or a checkpoint that does not fit the architecture (missing or unexpected keys, or a
    shape), before any work is done.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    state = _read(path, what)
    if isinstance(state, dict):
        for key in STATE_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise TypeError(f"{what} weights {path} hold a {type(state).__name__}, not a state_dict")
    if state and not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} weights {path} hold no tensors (keys {', '.join(map(repr, list(state)[:8]))}): "
                         f"not a state_dict, nor a checkpoint with one under {', '.join(STATE_KEYS)}")
    try:
        model.load_state_dict(_torchvision_names(_unwrapped_names(state, model), model))
    except RuntimeError as e:
        detail = " ".join(str(e).split())  # torch's message spans lines; keep the first few hundred chars
        raise ValueError(f"{what} weights {path} do not match the architecture: {detail[:400]}") from e
    return model
