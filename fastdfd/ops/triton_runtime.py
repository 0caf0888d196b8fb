"""Whether the Triton kernels can serve a tensor here: shared by every op's ``triton`` backend.

They serve fp16/bf16/fp32 CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (how
the CPU CI runs them). Triton is imported on the first question, not before: importing
fastdfd never imports triton.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MISSING: list[str | None] = []  # memo (a plain global: torch.compile traces dispatch through here)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


# run eagerly under torch.compile's trace (the import would break the graph), kept as a constant
@torch.compiler.assume_constant_result
def triton_missing() -> str | None:
    """Why triton cannot be imported in this process, or None."""
    if not _MISSING:
        try:
            import triton  # noqa: F401

            _MISSING.append(None)
        except Exception as e:  # not installed, or broken for this platform
            _MISSING.append(f"triton is not importable ({type(e).__name__}: {e})")
    return _MISSING[0]


def unavailable(x: Tensor) -> str | None:
    """Why the Triton kernels cannot take x (its device and dtype) here, or None."""
    missing = triton_missing()
    if missing:
        return missing
    if x.dtype not in SUPPORTED_DTYPES:
        return f"{x.dtype} inputs (the kernels take fp16, bf16 and fp32)"
    if x.device.type == "cuda" or (x.device.type == "cpu" and interpreting()):
        return None
    return f"{x.device.type} tensors (needs CUDA, or CPU with TRITON_INTERPRET=1)"
