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
device's free memory: a GPU's free memory, or on a CPU the host's available memory as
``/proc/meminfo`` or psutil tell it) and refuses a configuration in which even one generator per step
does not fit, naming the figures. On a CPU the automatic chunk is also capped at
:data:`CPU_STEP_BYTES` of per-step memory: there a larger step is slower per image, not faster
(see the constant). It is an estimate from shapes, not a measurement: the
allocator's fragmentation and the kernels' workspaces come on top, hence the margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modes import in_mode

GIB = 2**30


# On a CPU a bigger step buys no parallelism and costs fresh memory: its activations are allocated (mmap) and
# page-faulted anew every step once each tensor passes glibc's mmap threshold. Measured on the 2-core development
# machine, 1000 one-class generators on the pretrained EfficientNet-Lite0 at 32 px, 8 images each: 35.5 ms per
# generator-step with 25 or 50 generators per step (0.6 / 1.2 GiB a step), 44.6 ms with 100 or 200, 114 ms with the
# 666 that fill the host's memory (half of it kernel time), against 36.5 ms for 10 generators
# (benchmarks/imagenet_ensemble.py, docs/imagenet-scale.md). One machine's figure: a host with more cores may
# profit from bigger steps.
CPU_STEP_BYTES = 1 * GIB


class MemoryPlanError(RuntimeError):
    """A configuration that cannot fit the device's memory, with the figures."""


@dataclass(frozen=True)
class MemoryPlan:
    chunk: int  # generators per step
    total_bytes: int
    budget_bytes: int | None
    resident_bytes: int  # ensemble + Adam moments + teacher
    per_generator_bytes: int  # one more generator in the step: its images' activations, parameter copy, grads
    cpu_capped: bool = False  # the chunk is the CPU's step cap (CPU_STEP_BYTES), not the most that fits

    def describe(self) -> str:
        budget = f" of a {self.budget_bytes / GIB:.2f} GiB budget" if self.budget_bytes is not None else ""
        cap = (f"; capped at {CPU_STEP_BYTES / GIB:.0f} GiB a step on a CPU, where larger steps are slower per image"
               if self.cpu_capped else "")
        return (f"{self.chunk} generators per step need about {self.total_bytes / GIB:.2f} GiB{budget} "
                f"({self.resident_bytes / GIB:.2f} GiB resident + {self.per_generator_bytes / 2**20:.1f} MiB "
                f"per generator in the step){cap}")


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


def host_available_bytes() -> int | None:
    """The host memory the kernel says a new allocation can take without swapping (``MemAvailable`` in
    ``/proc/meminfo``; psutil's ``available`` elsewhere), or None where neither is readable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _bytes_on(tensors, device: torch.device) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)


def plan_generator_memory(teacher: nn.Module, ensemble, batch_size: int, *, budget_bytes: int | None = None,
                          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                          chunk: int | None = None, offload: bool = False,
                          allocated_bytes: int | None = None) -> MemoryPlan:
    """The memory a step needs on ``device`` (where the step runs; default the ensemble's), and the chunk size to
    use (``chunk``, or the largest that fits).

    ``offload``: the ensemble and its Adam moments live in host memory and only each step's chunk comes to the
    device (its parameters, gradients and Adam rows), so the device holds the teacher and the chunk. Without a
    ``budget_bytes``, the budget is 90% of the device's free memory (a GPU's, or the host's available memory) plus
    ``allocated_bytes``, what this run already holds there when the free memory is read (default: the teacher's
    and the ensemble's tensors on that device), which the plan counts as resident itself.
    """
    device = torch.device(device) if device is not None else ensemble.fc_z.device
    if budget_bytes is None:
        free = None
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        elif device.type == "cpu":
            free = host_available_bytes()
        if free is not None:
            if allocated_bytes is None:
                allocated_bytes = _bytes_on([*teacher.parameters(), *teacher.buffers(), *ensemble.parameters()],
                                            device)
            budget_bytes = int(0.9 * (free + allocated_bytes))
    element = torch.finfo(dtype).bits // 8
    k = ensemble.num_generators
    ens_bytes = sum(p.numel() * p.element_size() for p in ensemble.parameters())
    teacher_bytes = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    # offload: the ensemble and Adam stay on the host; a step brings its rows of parameters, gradients and moments
    resident = teacher_bytes if offload else 3 * ens_bytes + teacher_bytes
    spec = ensemble.spec
    per_image = _teacher_activation_bytes(teacher, (spec.channels, spec.image_size, spec.image_size), dtype)
    per_image += _generator_activation_bytes(spec, element)
    per_generator = batch_size * per_image + (4 if offload else 2) * ens_bytes // k

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
    cpu_cap = max(1, CPU_STEP_BYTES // per_generator) if device.type == "cpu" else k
    if budget_bytes is None:
        return MemoryPlan(min(k, cpu_cap), total(min(k, cpu_cap)), None, resident, per_generator, cpu_cap < k)
    fits = min(k, (budget_bytes - resident) // per_generator) if budget_bytes > resident else 0
    if fits < 1:
        raise MemoryPlanError(
            f"this configuration does not fit: {resident / GIB:.2f} GiB resident "
            f"({'teacher' if offload else 'ensemble, Adam moments, teacher'}) "
            f"+ {per_generator / GIB:.3f} GiB for one generator's step > the {budget_bytes / GIB:.2f} GiB budget; "
            "use fewer images per generator, bf16, or more processes (each holds K / world generators)"
        )
    chunk = int(min(fits, cpu_cap))
    return MemoryPlan(chunk, total(chunk), budget_bytes, resident, per_generator, cpu_cap < fits)
