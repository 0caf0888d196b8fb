"""What the generator kernels take: shapes, dtypes and devices of every operand, checked.

The contract of the Triton kernels here (``linear_gather.py``, ``conv.py``) and of
``csrc/generator/generator_cpu.cpp``. The launchers copy each operand to contiguous, then
address it by these shapes: a wrong one would read past a buffer, so they check first (and
the custom ops of the package's ops/generator/ run the same checks for the C++ kernels).
Plain torch, no triton.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..launch import check_operand

WHERE = "generator op"
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take
SUMS = (torch.float32,)  # BN statistics, their gradients, and the prologue's scale and shift


def check_linear_gather(z: Tensor, wz: Tensor, wy: Tensor, local: Tensor, floats: tuple = FLOATS) -> None:
    """z [K, B, L], Wz [K, L, D], Wy [K, NCLS, D] (one float dtype), local [K, B] int64, one device."""
    if not all(isinstance(t, Tensor) and t.dim() == 3 for t in (z, wz, wy)):
        raise ValueError(f"{WHERE}: expected z [K, B, L], Wz [K, L, D], Wy [K, NCLS, D], got "
                         f"{', '.join(str(tuple(t.shape)) if isinstance(t, Tensor) else repr(t) for t in (z, wz, wy))}")
    k, b, lat = z.shape
    dev = z.device
    check_operand(WHERE, "Wz", wz, device=dev, dtypes=floats, shape=(k, lat, wz.shape[2]), error=ValueError)
    check_operand(WHERE, "z", z, device=dev, dtypes=(wz.dtype,), error=ValueError)
    check_operand(WHERE, "Wy", wy, device=dev, dtypes=(wz.dtype,), shape=(k, wy.shape[1], wz.shape[2]),
                  error=ValueError)
    check_operand(WHERE, "local", local, device=dev, dtypes=(torch.int64,), shape=(k, b), error=ValueError)


def check_conv(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
               upsample: int, y: Optional[Tensor] = None, dy: Optional[Tensor] = None, ds1: Optional[Tensor] = None,
               ds2: Optional[Tensor] = None, floats: tuple = FLOATS) -> None:
    """x [K, B, CIN, h, w], weight [K, COUT, CIN, 3, 3], scale/shift [K, CIN] fp32, bias [K, COUT], and for the
    backward y/dy [K, B, COUT, h*UP, w*UP] and dS1/dS2 [K, COUT] fp32; x, weight, bias, y, dy of one float dtype."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() == 5 and weight.dim() == 5
            and tuple(weight.shape[3:]) == (3, 3) and upsample in (1, 2)):
        raise ValueError(f"{WHERE}: expected x [K, B, CIN, h, w], weight [K, COUT, CIN, 3, 3] and upsample "
                         f"1 or 2, got {tuple(getattr(x, 'shape', ()))}, {tuple(getattr(weight, 'shape', ()))}, "
                         f"{upsample}")
    k, b, cin, h, w = x.shape
    cout = weight.shape[1]
    dev = x.device
    if (scale is None) != (shift is None):
        raise ValueError(f"{WHERE}: scale and shift come together")
    out = (k, b, cout, h * upsample, w * upsample)
    check_operand(WHERE, "x", x, device=dev, dtypes=floats, error=ValueError)
    act = (x.dtype,)
    for name, t, shape, dtypes in (("weight", weight, (k, cout, cin, 3, 3), act), ("scale", scale, (k, cin), SUMS),
                                   ("shift", shift, (k, cin), SUMS), ("bias", bias, (k, cout), act),
                                   ("y", y, out, act), ("dy", dy, out, act), ("dS1", ds1, (k, cout), SUMS),
                                   ("dS2", ds2, (k, cout), SUMS)):
        check_operand(WHERE, name, t, device=dev, dtypes=dtypes, shape=shape, error=ValueError)
