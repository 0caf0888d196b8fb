"""Whether bf16 autocast pays on this CPU, and the warning where it does not.

A forward under bf16 autocast is faster on a CPU only where oneDNN's bf16 kernels run on bf16 instructions. Where
PyTorch's own check says oneDNN cannot take bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: on x86 it
needs AVX-512), the bf16 convolutions fall back to PyTorch's native kernels instead: on a 2-core AMD EPYC with
AVX2 (no AVX-512) the CIFAR-10 benchmark's distillation step took 3,273 ms with the teacher's labels in bf16
against 717 ms in fp32, 4.6x slower (``python -m benchmarks.distill_step --rounds 3 --steps 3``, 2026-12-07).
It was measured faster only on an AVX-512 BF16 EPYC (1.24x, the same day), so on x86 :func:`cpu_computes_bf16`
asks for the BF16 extension (or AMX) too: an AVX-512 CPU without it converts to and from bf16 in software, which
is unmeasured here. Arm CPUs get oneDNN's answer alone (unmeasured).
"""

from __future__ import annotations

import functools
import platform
import warnings

import torch

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@functools.cache
def cpu_computes_bf16() -> bool:
    """True where bf16 autocast is expected to be faster than fp32 on this CPU: oneDNN is built in and takes bf16
    (PyTorch's ``torch.ops.mkldnn._is_mkldnn_bf16_supported``), and on x86 the CPU has AVX-512 BF16 or AMX
    (``torch.cpu.get_capabilities``). False otherwise, where the bf16 path is slower (4.6x for the CIFAR-10
    benchmark's step on an AVX2 EPYC) or unmeasured. Read once per process."""
    if not torch.backends.mkldnn.is_available():
        return False  # bf16 convolutions never reach oneDNN
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None or not check():
        return False
    if platform.machine().lower() in _X86:
        capabilities = getattr(torch.cpu, "get_capabilities", dict)()
        return any(capabilities.get(flag, False) for flag in ("avx512_bf16", "amx_bf16", "amx_tile"))
    return True


def warn_if_bf16_is_slow(device: torch.device | str, what: str, stacklevel: int = 3) -> bool:
    """Warn (``UserWarning``) that ``what`` runs under bf16 autocast on a CPU where that is not expected to pay
    (:func:`cpu_computes_bf16` False); True when it warned. A CUDA device, or a CPU that computes in bf16: no
    warning, False. ``stacklevel`` is :func:`warnings.warn`'s, from inside this function (3: the line that called its caller)."""
    if torch.device(device).type != "cpu" or cpu_computes_bf16():
        return False
    warnings.warn(f"fastdfd: {what} runs under bf16 autocast on a CPU without bf16 instructions "
                  f"({torch.backends.cpu.get_cpu_capability()}): slower than fp32 there (the CIFAR-10 benchmark's "
                  f"distillation step 4.6x slower on an AVX2 EPYC); turn autocast off", stacklevel=stacklevel)
    return True
