"""The batched generator-ensemble forward: one public function, the backend chosen by dispatch.

``torch`` (``reference.py``): grouped convolutions over batch-major activations, autograd
backward; the oracle and the fallback. ``triton`` (kernels/generator/): the fused kernels,
the CUDA default. ``cpp`` (csrc/generator/generator_cpu.cpp): the CPU default for fp32. The
two fused backends share one composition of custom ops (``custom_op.py``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...models.generator import GeneratorSpec
from ..dispatch import resolve
from . import dispatch  # noqa: F401  (registers every backend's entry)


def ensemble_forward(
    params: Mapping[str, torch.Tensor], spec: GeneratorSpec, z: torch.Tensor, local: torch.Tensor
) -> torch.Tensor:
    """K generators at once: z [k, B, latent], local label positions [k, B] -> images [k, B, C, S, S].

    ``params`` holds the stacked parameters of the k generators being run (all K of a
    :class:`fastdfd.GeneratorEnsemble`, or a chunk of them), as its ``stacked()`` returns.
    The backend is picked from the parameters' device and dtype.
    """
    _, fn = resolve("ensemble_forward", params["fc_z"])
    return fn(params, spec, z, local)
