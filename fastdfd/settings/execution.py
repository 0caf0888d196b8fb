"""Where and how a generator step runs: chunking, offload, precision, memory format, CUDA graph.

None of these changes what a step computes but for ``autocast`` (bf16 rounding of the teacher's forward),
so none is part of what a checkpoint must match (``generators_per_step`` is, through the resolved chunk,
which the trainer records itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from .field import Settings, setting

__all__ = ["ExecutionSettings"]


@dataclass(frozen=True)
class ExecutionSettings(Settings):
    generators_per_step: int | str | None = setting(
        None, "generators per step in each process: an integer, all (unset), or auto (the largest chunk the "
              "memory planner fits in the device's free memory); chunks visit every generator evenly",
        kind="chunk", config=False)
    offload: bool = setting(False, "generators and Adam states in pinned host memory, each step's chunk streamed "
                                   "to the teacher's device (ensembles larger than the GPU)", kind="bool",
                            absent=False, config=False)
    autocast: bool = setting(False, "the teacher's forward under bf16 autocast (the moment sums stay fp32)",
                             kind="bool", absent=False, config=False)
    channels_last: bool = setting(False, "feed the teacher channels_last images (its weights are converted for the "
                                         "run and restored after)", kind="bool", absent=False, config=False)
    cuda_graph: str = setting("off", "capture the fixed-shape step in a CUDA graph: on (required; refused with the "
                                     "reason where it cannot be), auto (where the run allows it, else eager, the "
                                     "reason in the plan), off", kind="switch", absent="off", config=False)
