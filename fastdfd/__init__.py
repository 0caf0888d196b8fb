"""fastdfd: fast generative data-free knowledge distillation (Luo, Sandler et al., 2020)."""

from . import models
from .ops.dispatch import backend
from .nn import GeneratorEnsemble, MomentMatcher
from .ops import KINDS, bn_moment_loss
from .train import Distiller, GeneratorTrainer, NonFiniteLossError
from .version import __version__

__all__ = [
    "KINDS", "Distiller", "GeneratorEnsemble", "GeneratorTrainer", "MomentMatcher", "NonFiniteLossError",
    "backend", "bn_moment_loss", "models", "__version__",
]
