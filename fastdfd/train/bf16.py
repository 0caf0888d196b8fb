"""Whether bf16 autocast pays on this CPU, and the warning where it does not.

A forward under bf16 autocast is faster on a CPU only where oneDNN computes in bf16: x86 with AVX-512 (BW, VL,
DQ; the BF16 extension and AMX faster still) or Arm with BF16. Elsewhere oneDNN runs bf16 convolutions by a
slow reference path: on a 2-core AMD EPYC with AVX2 (no AVX-512) the CIFAR-10 benchmark's distillation step
took 3,273 ms with the teacher's labels in bf16 against 717 ms in fp32, 4.6x slower (``python -m
benchmarks.distill_step --rounds 3 --steps 3``, 2026-12-07; on an AVX-512 EPYC the same bf16 labels were 1.24x
faster). The check is PyTorch's own (the one ``torch.autocast`` consults before oneDNN's bf16 kernels).
"""

from __future__ import annotations

import functools
import warnings

import torch


@functools.cache
def cpu_computes_bf16() -> bool:
    """True where this CPU computes bf16 convolutions and matmuls natively (oneDNN's bf16 check: x86 AVX-512
    BW/VL/DQ, or Arm BF16); False where bf16 autocast would be slower than fp32. Read once per process."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:  # a build without oneDNN: fall through to the capability's name
            pass
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def warn_if_bf16_is_slow(device: torch.device | str, what: str, stacklevel: int = 3) -> bool:
    """Warn (``UserWarning``) that ``what`` runs under bf16 autocast on a CPU that does not compute in bf16
    (:func:`cpu_computes_bf16`); True when it warned. A CUDA device or a bf16-capable CPU: no warning, False."""
    if torch.device(device).type != "cpu" or cpu_computes_bf16():
        return False
    warnings.warn(f"fastdfd: {what} runs under bf16 autocast on a CPU without bf16 instructions "
                  f"({torch.backends.cpu.get_cpu_capability()}): oneDNN's slow path, several times slower than "
                  f"fp32 (4.6x for the CIFAR-10 benchmark's step on an AVX2 EPYC); turn autocast off",
                  stacklevel=stacklevel)
    return True
