"""The generator op's dispatch entries: which backend implements ``ensemble_forward``, and when.

``torch`` is the reference (:mod:`.reference`); ``triton`` and ``cpp`` run the fused
composition of :mod:`.custom_op` with their own launchers, each behind its backend's
``check`` (``backends/<name>.py``).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..dispatch import register
from .backends import cpp, triton
from .custom_op import fused_ensemble_forward
from .reference import ensemble_forward_reference

register("ensemble_forward", "torch")(ensemble_forward_reference)


def _register_fused(name: str, check: Callable[[Tensor], str | None]) -> None:
    @register("ensemble_forward", name, check=check)
    def ensemble_forward(params, spec, z, local):
        return fused_ensemble_forward(params, spec, z, local, name)


_register_fused("triton", triton.check)
_register_fused("cpp", cpp.check)
