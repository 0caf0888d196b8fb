"""The moment ops' dispatch entries: which backend implements each op, and when it can serve.

``torch`` is the reference (:mod:`.reference`, any device and dtype); ``triton``, ``cpp`` and
``cuda`` run the custom ops of :mod:`.custom_op` with their own launchers, each behind its
backend's ``check`` (``backends/<name>.py``). :mod:`fastdfd.ops.dispatch` picks among them per
call (context manager, ``FASTDFD_BACKEND``, then the device's order of preference).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from ..dispatch import register
from . import decomposition, reference
from .activation import IDENTITY, Activation
from .backends import cpp, cuda, triton
from .custom_op import finalize_forward, tap_forward
from .packed import PackedLayout

register("moment_sums", "torch")(reference.moment_sums_torch)
register("moment_tap", "torch")(reference.moment_tap_torch)
register("moment_finalize", "torch")(reference.moment_finalize_torch)


def _register_fused(name: str, check: Callable[[Tensor], str | None],
                    check_finalize: Callable[[Tensor], str | None], eager: dict[str, Callable] | None = None,
                    fuses_activation: bool = False, fuses_residual: bool = False) -> None:
    """Register ``name``'s implementations of the three dispatched moment ops: eager, the backend's own
    dispatcher ops where it registers them (``eager``); while torch.compile traces, the tap as aten ops
    (:mod:`.decomposition`) or the Python custom ops with impl=name. A backend whose kernels have no
    activation epilogue (``fuses_activation`` False) gets the tap alone, and the activation runs after it
    as a torch op (exact, one more pass); likewise the residual add where its kernels do not take one
    (``fuses_residual``). The traced form always fuses both."""

    def eager_now(x: Tensor) -> bool:
        # The dispatcher ops have no fake kernels and call their kernels directly: any tracer (dynamo, make_fx
        # with fake or real tensors, a torch_function/dispatch mode, functorch's wrappers) gets the custom ops.
        return (eager is not None and type(x) is Tensor and not torch.compiler.is_compiling()
                and _current_dispatch_mode() is None and not torch._C._is_torch_function_mode_enabled()
                and not torch._C._functorch.is_functorch_wrapped_tensor(x))

    def tap(x, mean, var, weight, bias, eps, groups, write_y, activation: Activation = IDENTITY, residual=None):
        eps, groups = float(eps), int(groups)
        if decomposition.decomposes(name):  # traced by torch.compile: aten ops inductor fuses with the neighbours
            return decomposition.tap(x, mean, var, weight, bias, eps, groups, write_y, activation.name,
                                     activation.negative_slope, residual)
        if residual is not None and not fuses_residual:  # the add and activation after the tap
            y, s1, s2 = tap(x, mean, var, weight, bias, eps, groups, write_y)
            return activation(y + residual), s1, s2
        if not fuses_activation and not activation.is_identity:
            y, s1, s2 = tap(x, mean, var, weight, bias, eps, groups, write_y)
            return activation(y), s1, s2
        if eager_now(x):
            return eager["tap"](x, mean, var, weight, bias, eps, groups, write_y, activation.id,
                                activation.negative_slope, residual)
        return tap_forward(x, mean, var, weight, bias, eps, groups, write_y, name, activation.id,
                           activation.negative_slope, residual)

    @register("moment_tap", name, check=check)
    def moment_tap(x, running_mean, running_var, weight, bias, eps, groups, activation=IDENTITY, residual=None):
        return tap(x, running_mean, running_var, weight, bias, eps, groups, True, activation, residual)

    @register("moment_sums", name, check=check)
    def moment_sums(x, shift, groups):
        # the sums-only tap: the same kernel without the BN output (var is not read)
        _, s1, s2 = tap(x, shift, shift, None, None, 0.0, groups, False)
        return s1, s2

    @register("moment_finalize", name, check=check_finalize)
    def moment_finalize(s1, s2, count, layout: PackedLayout, kind: str):
        # the one place where the layout meets the sums' dtype (a no-op for the matcher's own layouts)
        if eager_now(s1):
            return eager["finalize"](s1, s2, count, layout.running_var, layout.eps, layout.offsets, kind)
        return finalize_forward(s1, s2, count.to(s1.dtype).contiguous(), layout.running_var.to(s1.dtype).contiguous(),
                                layout.eps.to(s1.dtype).contiguous(), layout.offsets.contiguous(), kind, name)


_register_fused("triton", triton.check, triton.check_finalize, fuses_activation=triton.FUSES_ACTIVATION,
                fuses_residual=triton.FUSES_RESIDUAL)
_register_fused("cpp", cpp.check, cpp.check, cpp.EAGER, fuses_activation=cpp.FUSES_ACTIVATION,
                fuses_residual=cpp.FUSES_RESIDUAL)
_register_fused("cuda", cuda.check, cuda.check_finalize, fuses_activation=cuda.FUSES_ACTIVATION,
                fuses_residual=cuda.FUSES_RESIDUAL)
