"""Settings: one frozen, validated dataclass per concern, passed whole (:mod:`.field` says how a field is made).

- :class:`ArchitectureSettings`, :class:`LossSettings`, :class:`OptimizerSettings`: the generators;
- :class:`ExecutionSettings`: where and how a generator step runs;
- :class:`LoopSettings`: seed, logs, checkpoints, progress (every loop);
- :class:`DistillSettings`: the student's loss, optimiser and batches;
- :class:`TeacherSettings`: supervised teacher training on real data;
- :class:`TurnsSettings`: the generators and the student in turns, sharing a pool of images;
- :func:`preset`: the paper's generator settings beside the library's.

The CLI flags (:mod:`.cli`), the recipe keys (:mod:`fastdfd.recipes.schema`) and the trainers' ``config()``
are made from these fields; no other list of their names exists.
"""

from .distill import AUGMENTS, DISTILL_OPTIMIZERS, MIXES, STUDENT_BN, DistillSettings
from .execution import ExecutionSettings
from .field import REQUIRED, Settings, Spec, setting
from .generator import NORMALIZATIONS, SCOPES, ArchitectureSettings, LossSettings, OptimizerSettings
from .loop import LoopSettings
from .presets import PRESETS, GeneratorSettings, preset, split_settings
from .teacher import TeacherSettings
from .turns import TurnsSettings

# the settings of the generator stage (the ensemble's architecture and the trainer's four) and of the
# distillation stage, in the order the CLI shows them; their field names are disjoint
GENERATOR_STAGE = (ArchitectureSettings, LossSettings, OptimizerSettings, ExecutionSettings, LoopSettings)
DISTILL_STAGE = (DistillSettings, LoopSettings)

__all__ = [
    "AUGMENTS", "DISTILL_OPTIMIZERS", "DISTILL_STAGE", "GENERATOR_STAGE", "MIXES", "NORMALIZATIONS", "PRESETS",
    "REQUIRED", "SCOPES", "STUDENT_BN",
    "ArchitectureSettings", "DistillSettings", "ExecutionSettings", "GeneratorSettings", "LoopSettings",
    "LossSettings", "OptimizerSettings", "Settings", "Spec", "TeacherSettings", "TurnsSettings", "preset", "setting",
    "split_settings",
]
