"""The execution plan of a generator run: decided once, before the first step, frozen, and printed.

Where the step runs, how many generators it takes, what memory that needs, and whether it is replayed from
a CUDA graph, each with its reason. :class:`fastdfd.train.GeneratorTrainer` makes it at construction from
its :class:`fastdfd.settings.ExecutionSettings`; ``plan.describe()`` is what the CLI prints.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..settings import ExecutionSettings
from .memory import MemoryPlan, plan_generator_memory

__all__ = ["ExecutionPlan", "graph_obstacles", "plan_chunk", "resolve_graph"]


@dataclass(frozen=True)
class ExecutionPlan:
    """What a run does with its :class:`ExecutionSettings`, and why."""

    device: torch.device  # the ensemble's: latents, labels and chunks are drawn here
    compute_device: torch.device  # the teacher's: the step runs here (differs from device under offload)
    chunk: int  # generators per step (per process)
    num_generators: int  # in this process
    memory: MemoryPlan | None  # the planner's estimate (None on a CPU without "auto")
    cuda_graph: bool
    graph_reason: str | None  # why not, when cuda_graph is off (None when on)
    settings: ExecutionSettings

    @property
    def offloaded(self) -> bool:
        return self.compute_device != self.device

    def describe(self) -> str:
        """One line per decision: placement, chunk, memory, precision, graph."""
        s = self.settings
        lines = [(f"generator parameters and Adam moments in host memory, each step's chunk streamed to "
                  f"{self.compute_device}" if self.offloaded else
                  f"generator parameters and Adam moments on {self.device}"),
                 f"{self.chunk} of {self.num_generators} generators per step"
                 + (" (the largest the memory planner fits)" if s.generators_per_step == "auto" else "")]
        if self.memory is not None:
            lines.append(f"memory: {self.memory.describe()}")
        if s.autocast or s.channels_last:
            lines.append("teacher " + " and ".join(w for w, on in (("under bf16 autocast", s.autocast),
                                                                  ("channels_last for the run", s.channels_last)) if on))
        if self.cuda_graph:
            lines.append("step captured in a CUDA graph (after the eager warm-up steps)")
        elif s.cuda_graph != "off":  # asked for (auto) and refused: say why
            lines.append(f"CUDA graph off: {self.graph_reason}")
        return "; ".join(lines)


def plan_chunk(teacher: nn.Module, ensemble, batch_size: int, generators_per_step, *,
               compute_device: torch.device | None = None, allocated_bytes: int | None = None,
               ) -> tuple[int | None, MemoryPlan | None]:
    """The chunk to train (None: every generator) and the memory plan behind it, on ``compute_device`` (where the
    step runs: the teacher's under offload, else the ensemble's).

    ``"auto"``: the largest chunk the planner fits (on a CPU, in the host's available memory, capped where bigger
    steps are slower). An explicit chunk on a GPU is refused only if one generator cannot fit, and warned about if
    the chunk may not."""
    dtype = ensemble.fc_z.dtype
    device = ensemble.fc_z.device if compute_device is None else torch.device(compute_device)
    offload = device != ensemble.fc_z.device
    plan = functools.partial(plan_generator_memory, teacher, ensemble, batch_size, dtype=dtype, device=device,
                             offload=offload, allocated_bytes=allocated_bytes)
    if generators_per_step == "auto":
        memory = plan()
        return memory.chunk, memory
    if device.type != "cuda":
        return generators_per_step, None
    memory = plan()  # raises if none fits
    wanted = ensemble.num_generators if generators_per_step is None else int(generators_per_step)
    if wanted > memory.chunk:
        warnings.warn(f"fastdfd: {wanted} generators per step may not fit: the planner estimates that "
                      f"{memory.describe()}; pass generators_per_step='auto' to use that", RuntimeWarning, stacklevel=4)
    return generators_per_step, memory


def graph_obstacles(*, compute_device: torch.device, device: torch.device, offload: bool, world: int, scope: str,
                    pool: bool, optimizer_obstacle: str | None) -> list[str]:
    """Why a step cannot be captured in a CUDA graph (empty: it can)."""
    reasons = []
    if compute_device.type != "cuda":
        reasons.append(f"the step runs on {compute_device}, not on a CUDA device")
    offloaded = offload or compute_device != device
    if offloaded:
        reasons.append("offload=True streams each chunk between host and device memory (host-side copies "
                       "and syncs every step)")
    if world > 1 and scope == "ensemble":
        reasons.append(f"scope='ensemble' over {world} processes all-reduces the moment sums "
                       "inside the step (no collectives in a captured graph here; use scope='generator')")
    if pool:
        reasons.append("a pool is filled at a position that moves every step (a graph replays one copy)")
    if not offloaded and optimizer_obstacle is not None:
        reasons.append(optimizer_obstacle)
    return reasons


def resolve_graph(switch: str, reasons: list[str]) -> tuple[bool, str | None]:
    """``switch`` (off / auto / on) against the obstacles: (on?, why not). ``on`` with an obstacle is refused."""
    if switch == "off":
        return False, "cuda_graph=off"
    if not reasons:
        return True, None
    why = "; ".join(reasons)
    if switch == "on":
        raise ValueError(f"cuda_graph=True, but the step cannot be captured in a CUDA graph: {why}")
    return False, why
