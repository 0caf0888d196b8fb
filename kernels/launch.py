"""What every launcher of ``kernels/`` does before a launch: check its operands, pick the device.

The kernels address memory raw (a pointer and the sizes they are handed), so a wrong shape,
dtype, device or stride reads or writes past a buffer instead of raising. Each launcher
therefore checks every operand first, with an error that names the operand, what was
expected and what came (stylegan2-ada's ``bias_act`` does the same), and launches on the
operands' GPU rather than the current one. Plain torch: importing this imports no triton.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def on_device(t: torch.Tensor):
    """Launch on t's GPU, not the current one (nothing to do for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
            torch.int32: "int32", torch.int64: "int64"}.get(dtype, str(dtype))


def check_operand(where: str, name: str, t, *, device: torch.device, dtypes: Iterable[torch.dtype] | None = None,
                  shape: tuple | None = None, numel: int | None = None, contiguous: bool = False,
                  error: type[Exception] = RuntimeError) -> None:
    """Raise ``error`` naming ``name`` unless t is a tensor on ``device`` with these dtypes, shape/size, contiguity.

    ``None`` for t passes (an optional operand the caller left out).
    """
    if t is None:
        return
    dtypes = tuple(dtypes) if dtypes is not None else None
    ok = isinstance(t, torch.Tensor) and t.device == device
    ok = ok and (dtypes is None or t.dtype in dtypes)
    ok = ok and (shape is None or tuple(t.shape) == tuple(shape))
    ok = ok and (numel is None or t.numel() == numel)
    ok = ok and (not contiguous or t.is_contiguous())
    if ok:
        return
    want = ["a contiguous" if contiguous else "a"]
    if dtypes is not None:
        want.append("/".join(_dtype_name(d) for d in dtypes))
    want.append("tensor")
    if shape is not None:
        want.append(str(tuple(shape)))
    if numel is not None:
        want.append(f"of {numel} values")
    got = (f"{_dtype_name(t.dtype)} {tuple(t.shape)}{'' if t.is_contiguous() else ' (strided)'} on {t.device}"
           if isinstance(t, torch.Tensor) else type(t).__name__)
    raise error(f"{where}: {name} must be {' '.join(want)} on {device}, got {got}")
