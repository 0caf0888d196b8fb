"""Many processes (torchrun; NCCL on GPUs, gloo on CPUs): the ensemble sharded over ranks.

Each rank owns a contiguous block of generators and their Adam states; nothing of a
generator crosses ranks. The one collective of a generator-training step is for
``scope="ensemble"``: the teacher's per-layer power sums S1, S2 are additive over images,
so summing the packed [1, C_total] buffers of all ranks gives the *exact* statistics of the
global batch, and every rank then evaluates the same global moment loss. Its gradient with
respect to a rank's own sums is the gradient with respect to the global sums (the sum's
Jacobian is the identity), so the backward of that all-reduce is the identity: no second
collective. Bytes per step: 2 x 4 x C_total (C_total = the teacher's BN channels, 3-27k:
tens of kilobytes), against a step of tens of milliseconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size and the process group."""

    rank: int = 0
    world: int = 1
    group: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, num_generators: int) -> tuple[int, int]:
        """[lo, hi) of the generators this rank owns: contiguous, equal blocks."""
        if num_generators % self.world:
            raise ValueError(
                f"{num_generators} generators cannot be split evenly over {self.world} processes; "
                f"use a multiple of {self.world}"
            )
        per = num_generators // self.world
        return self.rank * per, (self.rank + 1) * per

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def all_gather_object(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def local_device(name: str | torch.device | None = None) -> torch.device:
    """``name``, else this process's GPU (LOCAL_RANK under torchrun), else the CPU; a CUDA
    device is made current, so kernels and NCCL of this process land on it.

    ``"cuda"`` without an index is this process's GPU (LOCAL_RANK, else 0). ValueError, in one line,
    for a name torch does not know (``"gpu"``), a CUDA device on a machine without one, or an index
    beyond the GPUs present.
    """
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"unknown device {str(name)!r}: expected cpu, cuda, cuda:N or another torch "
                             f"device type ({' '.join(str(e).split())[:160]})") from None
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r}: this machine has no CUDA device (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is None:  # torch.cuda.set_device refuses a device without an index
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)
    return device


def init_from_env(device: torch.device | str | None = None) -> DistContext:
    """Join the run torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...); a single process otherwise.

    NCCL for CUDA devices, gloo for CPUs. Idempotent: an initialised default group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), None)


def shutdown() -> None:
    """Destroy the default process group if one was initialised (after DDP models are freed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: every rank computes the same loss of the sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_ranks(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of ``x`` over all ranks, differentiable as described in the module docstring."""
    return x if ctx.world == 1 else _SumOverRanks.apply(x, ctx.group)
