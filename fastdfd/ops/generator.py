"""The batched generator-ensemble forward: one public function, backends behind dispatch.

``torch`` (ops/generator_reference.py): grouped convolutions over batch-major activations,
autograd backward; the oracle and the fallback. ``triton`` (ops/generator_triton.py): the
fused kernels of kernels/generator_fc.py and kernels/generator_conv.py, the CUDA default.
``cpp`` (ops/generator_cpp.py): csrc/generator_cpu.cpp, the CPU default for fp32. The two
fused backends share one composition of custom ops (ops/generator_fused.py).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..backends import resolve
from ..models.generator import GeneratorSpec
from . import generator_cpp, generator_reference, generator_triton  # noqa: F401  (register the backends)


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
