"""Public moment ops: one function per op, the backend chosen by :mod:`fastdfd.ops.dispatch`.

``moment_sums`` / ``moment_tap`` / ``moment_finalize`` are the building blocks the
MomentMatcher runs in a training step; ``bn_moment_loss`` is the one-call drop-in loss.
Shapes and values are checked here, once, so every backend sees valid input.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..dispatch import resolve
from . import dispatch  # noqa: F401  (registers every backend's entries)
from .activation import Activation, as_activation
from .packed import PackedLayout
from .reference import KINDS

REDUCTIONS = ("sum", "mean", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_moment_input(x: torch.Tensor, channels: int, groups: int, what: str = "x") -> None:
    """Shape/dtype checks that need no device synchronisation."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be a floating tensor (fp16, bf16, fp32 or fp64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{what} must be [N, C, *spatial], got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{what} has {x.shape[1]} channels but the running statistics have {channels}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if x.shape[0] % groups != 0 or x.shape[0] == 0:
        raise ValueError(f"batch size {x.shape[0]} is not a positive multiple of groups={groups}")
    if x.numel() == 0:  # N > 0 and C matched: a zero spatial dim or zero channels
        raise ValueError(
            f"{what} of shape {tuple(x.shape)} has no elements per channel; batch statistics of an empty input "
            "are undefined"
        )


# Statistics tensors already validated, with the stamp they had then (see _stamp): a repeated
# check of an unchanged tensor reads nothing back from the device. Weakly keyed by the tensor
# object itself (by identity, so a freed tensor's id is never mistaken for a live one).
_VALID_MEANS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_VALID_VARS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _stamp(t: torch.Tensor) -> tuple | None:
    """What identifies a tensor's current values without reading them, or None if it cannot be told.

    ``_version`` is bumped by every in-place op on the tensor or on a view sharing its
    version counter (``fill_``, ``copy_``, ``mul_``, indexing assignment, an optimizer step);
    data_ptr, shape, strides, dtype and device catch ``set_``/``.data =`` swaps. Invisible:
    writes through ``.data`` (a separate version counter) and BN's own running-average update
    (``F.batch_norm`` in training mode writes the buffers without bumping their version).
    Inference-mode tensors have no version counter and are validated every time.
    """
    try:
        return (t._version, t.data_ptr(), t.device, tuple(t.shape), t.stride(), t.dtype)
    except (RuntimeError, NotImplementedError):  # inference tensors, fake/functional tensors
        return None


def _is_validated(cache: WeakIdKeyDictionary, t: torch.Tensor) -> tuple | None:
    """t's stamp if t was validated (into ``cache``) and has not changed since, else None."""
    stamp = _stamp(t)
    if stamp is None:
        return None
    return stamp if cache.get(t) == stamp else None


def _remember(cache: WeakIdKeyDictionary, t: torch.Tensor) -> None:
    stamp = _stamp(t)
    if stamp is not None:
        cache[t] = stamp


def check_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, name: str = "") -> None:
    """Value checks on running statistics.

    The value checks synchronise with the device, so each statistics tensor is checked once
    and remembered (weakly, with its version counter): a repeated call on unchanged
    statistics only checks shapes and reads nothing back from the device; an in-place
    change (which bumps the tensor's version) makes the next call check it again.

    Not seen as a change: writes through ``.data`` (a separate version counter) and a
    BatchNorm layer's own running-average update in train mode (PyTorch's batch_norm
    writes the buffers without bumping their version). Those statistics are then not
    checked again; the values used are always the current ones.
    """
    where = f" of {name}" if name else ""
    if running_mean is None or running_var is None:
        raise ValueError(f"BatchNorm layer{where} has no running statistics (track_running_stats=False)")
    if running_mean.shape != running_var.shape or running_mean.dim() != 1:
        raise ValueError(
            f"running_mean{where} {tuple(running_mean.shape)} and running_var {tuple(running_var.shape)} "
            "must be 1-D of the same length"
        )
    mean_ok = _is_validated(_VALID_MEANS, running_mean) is not None
    var_ok = _is_validated(_VALID_VARS, running_var) is not None
    if mean_ok and var_ok:
        return
    if (not mean_ok and not bool(torch.isfinite(running_mean).all())) or (
        not var_ok and not bool(torch.isfinite(running_var).all())
    ):
        raise ValueError(f"running statistics{where} contain NaN or Inf")
    if not var_ok and bool((running_var < 0).any()):
        raise ValueError(f"running_var{where} has negative entries; a variance cannot be negative")
    _remember(_VALID_MEANS, running_mean)
    _remember(_VALID_VARS, running_var)


def _single_layout(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> PackedLayout:
    """bn_moment_loss's one-layer PackedLayout, made on the device without host-to-device copies.

    ``PackedLayout.build`` copies small host tensors to the device, and PyTorch waits for the
    device's stream after a blocking copy from host memory: a per-call sync. One layer needs
    none of that: fills and a clone of the statistics (a snapshot, as build's copies are).
    """
    c, device = running_mean.numel(), running_mean.device
    return PackedLayout(
        running_mean=running_mean.detach().reshape(-1).to(dtype, copy=True),
        running_var=running_var.detach().reshape(-1).to(dtype, copy=True),
        eps=torch.full((c,), float(eps), dtype=dtype, device=device),
        layer=torch.zeros(c, dtype=torch.int64, device=device),
        channels=torch.full((1,), float(c), dtype=dtype, device=device),
        offsets=torch.arange(2, dtype=torch.int32, device=device) * c,
        num_layers=1,
    )


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown moment distance kind {kind!r}; expected one of {KINDS}")
    return kind


def moment_sums(x: torch.Tensor, shift: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted power sums S1 = sum(x - shift), S2 = sum((x - shift)^2) per (segment, channel).

    Returns two [groups, C] tensors in fp32 (fp64 for fp64 input), differentiable in x.
    """
    check_moment_input(x, shift.numel(), groups)
    return resolve("moment_sums", x)[1](x, shift, groups)


def moment_tap(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    groups: int = 1,
    activation: Activation | str | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode BN output and the running-mean-shifted sums, from one read of x.

    Args:
        x: the BN layer's input, [N, C, *spatial], fp16/bf16/fp32/fp64, any dense or strided layout.
        running_mean, running_var: [C], the layer's statistics (the shift of the sums and the BN's).
        weight, bias: [C] or None, the BN's affine.
        eps: the BN's eps.
        groups: N split into this many contiguous segments, sums per segment.
        activation: the epilogue ``y = a(BN(x))`` (:class:`fastdfd.ops.moment.activation.Activation` or its
            name: identity (None, the default), relu, relu6, leaky_relu, silu). The ``cpp`` backend and the
            form ``torch.compile`` traces apply it in the tap's pass, forward and backward; the others after it.
        residual: None, or a tensor of x's shape, dtype and device added to the BN output before the
            activation: ``y = a(BN(x) + residual)``, a basic block's ``relu(bn2(conv2(h)) + shortcut)``. The
            ``cpp`` and ``triton`` kernels and the traced form read it in the tap's pass and give its gradient
            ``dy a'(u)`` from the same backward pass; ``cuda`` adds it after its tap.

    Returns:
        y in x's dtype and shape (x's layout where the kernels take it), and S1, S2 [groups, C] in fp32
        (fp64 for fp64 x), differentiable in x (and the affine). docs/method.md section 8 states the math.

    Raises TypeError / ValueError for a bad x, groups, activation or residual (:func:`check_moment_input`;
    a residual must match x exactly: no broadcasting, no type promotion).
    """
    check_moment_input(x, running_mean.numel(), groups)
    act = as_activation(activation)
    if residual is not None:
        check_residual(residual, x)
        return resolve("moment_tap", x)[1](x, running_mean, running_var, weight, bias, eps, groups, act, residual)
    return resolve("moment_tap", x)[1](x, running_mean, running_var, weight, bias, eps, groups, act)


def check_residual(residual: torch.Tensor, x: torch.Tensor) -> None:
    """A residual of the tap must be a tensor of x's shape, dtype and device (TypeError / ValueError)."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} on {residual.device} must have x's "
                         f"shape, dtype and device ({x.dtype} {tuple(x.shape)} on {x.device})")


def moment_finalize(
    s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor, layout: PackedLayout, kind: str = "kl"
) -> torch.Tensor:
    """Every packed layer's distance at once: [G, C_total] sums -> [L, G] losses."""
    check_kind(kind)
    if s1.dim() != 2 or s1.shape != s2.shape:
        raise ValueError(f"s1 {tuple(s1.shape)} and s2 {tuple(s2.shape)} must both be [G, C_total]")
    c_total = s1.shape[1]
    if layout.running_var.numel() != c_total or layout.eps.numel() != c_total or count.numel() != c_total:
        raise ValueError(
            f"sums have {c_total} packed channels, but the layout has {layout.running_var.numel()} and count "
            f"{count.numel()}"
        )
    if layout.offsets.numel() != layout.num_layers + 1:
        raise ValueError(f"layout offsets {layout.offsets.numel()} do not match its {layout.num_layers} layers")
    return resolve("moment_finalize", s1)[1](s1, s2, count, layout, kind)


def bn_moment_loss(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    kind: str = "kl",
    groups: int = 1,
    eps: float = 1e-5,
    reduction: str = "sum",
) -> torch.Tensor:
    """Distance between the batch statistics of ``x`` and stored BN running statistics.

    Args:
        x: the BN layer's *input*, [N, C, *spatial] (BatchNorm1d/2d/3d; spatial may be empty).
        running_mean, running_var: the layer's stored statistics, [C].
        kind: ``kl`` (default, KL(N(batch) || N(running)) per channel, summed), ``kl_reverse``,
            ``l2`` (DeepInversion: ||var_r - var_b||_2 + ||mu_r - mu_b||_2) or ``mse``.
        groups: split N into this many contiguous equal segments, statistics per segment.
        eps: the BN layer's eps (used by the KL kinds).
        reduction: ``sum`` or ``mean`` over segments, or ``none`` for a [groups] tensor.

    Statistics are biased (as BN's) and accumulated in fp32 for fp16/bf16/fp32 input.
    """
    check_kind(kind)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if not isinstance(running_mean, torch.Tensor) or not isinstance(running_var, torch.Tensor):
        raise TypeError("running_mean and running_var must be tensors")
    check_moment_input(x, running_mean.numel(), groups)
    check_running_stats(running_mean, running_var)
    s1, s2 = moment_sums(x, running_mean, groups)
    layout = _single_layout(running_mean, running_var, eps, s1.dtype)
    count = x.numel() // (x.shape[1] * groups)
    per_group = moment_finalize(s1, s2, s1.new_full((s1.shape[1],), float(count)), layout, kind)[0]
    if reduction == "sum":
        return per_group.sum()
    if reduction == "mean":
        return per_group.mean()
    return per_group
