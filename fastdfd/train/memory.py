"""How much device memory a generator-training configuration needs, before it runs.

A step of ``chunk`` generators x ``batch`` images holds:

- resident: every generator's parameters and its two Adam moments (3 x the ensemble's
  bytes), and the frozen teacher's parameters and buffers;
- per step: the chunk's parameter copies and gradients (2 x chunk/K of the ensemble), and
  the activations autograd keeps for the backward, per image: every teacher module's output
  (measured by running the teacher once on a meta tensor: no memory, no compute) plus the
  generator's own (the first layer's output, and per conv layer its input, output and the
  activated copy the backward needs).

The planner picks the largest chunk whose total fits the budget (by default 90% of the
device's free memory) and refuses a configuration in which even one generator per step
does not fit, naming the figures. It is an estimate from shapes, not a measurement: the
allocator's fragmentation and the kernels' workspaces come on top, hence the margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modes import in_mode

GIB = 2**30


class MemoryPlanError(RuntimeError):
    """A configuration that cannot fit the device's memory, with the figures."""


@dataclass(frozen=True)
class MemoryPlan:
    chunk: int  # generators per step
    total_bytes: int
    budget_bytes: int | None
    resident_bytes: int  # ensemble + Adam moments + teacher
    per_generator_bytes: int  # one more generator in the step: its images' activations, parameter copy, grads

    def describe(self) -> str:
        budget = f" of a {self.budget_bytes / GIB:.2f} GiB budget" if self.budget_bytes is not None else ""
        return (f"{self.chunk} generators per step need about {self.total_bytes / GIB:.2f} GiB{budget} "
                f"({self.resident_bytes / GIB:.2f} GiB resident + {self.per_generator_bytes / 2**20:.1f} MiB "
                f"per generator in the step)")


def _teacher_activation_bytes(teacher: nn.Module, image_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of every module output for one image, from a forward on the meta device (no copy, no compute)."""
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * (torch.finfo(dtype).bits // 8)

    state = {n: torch.empty_like(t, device="meta") for n, t in [*teacher.named_parameters(), *teacher.named_buffers()]}
    handles = [m.register_forward_hook(hook) for m in teacher.modules() if not list(m.children())]
    try:
        with torch.no_grad(), in_mode(teacher, False):
            torch.func.functional_call(teacher, state, (torch.empty((1, *image_shape), device="meta", dtype=dtype),))
    finally:
        for h in handles:
            h.remove()
    return total


def _generator_activation_bytes(spec, element: int) -> int:
    """Per image: the first layer's output, and per conv its input, activated copy and output."""
    total = spec.fc_features * 3
    size = spec.init_size
    for out_c, in_c in spec.conv_shapes()[:-1]:
        size *= 2
        total += 3 * in_c * (size // 2) ** 2 + 2 * out_c * size**2
    total += 3 * spec.channels * spec.image_size**2
    return total * element


def plan_generator_memory(teacher: nn.Module, ensemble, batch_size: int, *, budget_bytes: int | None = None,
                          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                          chunk: int | None = None) -> MemoryPlan:
    """The memory a step needs, and the chunk size to use (``chunk``, or the largest that fits)."""
    device = torch.device(device) if device is not None else ensemble.fc_z.device
    if budget_bytes is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget_bytes = int(0.9 * free)
    element = torch.finfo(dtype).bits // 8
    k = ensemble.num_generators
    ens_bytes = sum(p.numel() * p.element_size() for p in ensemble.parameters())
    teacher_bytes = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    resident = 3 * ens_bytes + teacher_bytes
    spec = ensemble.spec
    per_image = _teacher_activation_bytes(teacher, (spec.channels, spec.image_size, spec.image_size), dtype)
    per_image += _generator_activation_bytes(spec, element)
    per_generator = batch_size * per_image + 2 * ens_bytes // k

    def total(c: int) -> int:
        return resident + c * per_generator

    if chunk is not None:
        if not 1 <= chunk <= k:
            raise ValueError(f"chunk must be in [1, {k}], got {chunk}")
        plan = MemoryPlan(chunk, total(chunk), budget_bytes, resident, per_generator)
        if budget_bytes is not None and plan.total_bytes > budget_bytes:
            raise MemoryPlanError(f"{plan.describe()}: it does not fit; use at most "
                                  f"{max(0, (budget_bytes - resident) // per_generator)} generators per step")
        return plan
    if budget_bytes is None:
        return MemoryPlan(k, total(k), None, resident, per_generator)
    fits = min(k, (budget_bytes - resident) // per_generator) if budget_bytes > resident else 0
    if fits < 1:
        raise MemoryPlanError(
            f"this configuration does not fit: {resident / GIB:.2f} GiB resident (ensemble, Adam moments, teacher) "
            f"+ {per_generator / GIB:.3f} GiB for one generator's step > the {budget_bytes / GIB:.2f} GiB budget; "
            "use fewer images per generator, bf16, or more processes (each holds K / world generators)"
        )
    return MemoryPlan(int(fits), total(int(fits)), budget_bytes, resident, per_generator)
