"""Modules: the moment matcher (teacher side) and the batched generator ensemble."""

from .ensemble import GeneratorEnsemble, ensemble_forward, load_ensemble, save_ensemble
from .matcher import SCOPES, MomentMatcher
from .tap import BNTap

__all__ = ["BNTap", "GeneratorEnsemble", "MomentMatcher", "SCOPES", "ensemble_forward", "load_ensemble", "save_ensemble"]
