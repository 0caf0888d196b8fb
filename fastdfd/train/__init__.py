"""Training: the generator trainer, the distiller, and what they share."""

from ..checkpoint import CheckpointError, CheckpointRotation, atomic_save
from .distiller import Distiller
from .evaluate import evaluate_accuracy
from .generator_trainer import GeneratorTrainer
from .modes import frozen, in_mode
from .losses import distillation_kl, total_variation
from .metrics import MetricsLog, NonFiniteLossError
from .optim import StackedAdam
from .schedule import ChunkSchedule

__all__ = [
    "CheckpointError", "CheckpointRotation", "ChunkSchedule", "Distiller", "GeneratorTrainer", "MetricsLog",
    "NonFiniteLossError", "StackedAdam", "atomic_save", "distillation_kl", "evaluate_accuracy", "frozen", "in_mode",
    "total_variation",
]
