"""What every moment kernel takes: the distance kinds, and the strided layout of x, y, dy and dx.

The contract of the Triton kernels here (``tap.py``, ``finalize.py``) and of the C++ and CUDA
kernels of ``csrc/moment/``; their launchers check it before raw addressing. Plain torch, no
triton: the package's ops/moment/ imports it without importing triton.

Distance kinds: the finalize kernels take a kind as an integer (the ``KIND`` constexpr of
``finalize.py``, the ``kind`` argument of ``csrc/moment/``), its index in :data:`KINDS`.
"""

from __future__ import annotations

import torch

KINDS = ("kl", "kl_reverse", "l2", "mse")
KIND_IDS = {kind: i for i, kind in enumerate(KINDS)}  # the integer the compiled kernels take

# The tap's activation epilogue, y = act(BN(x)), numbered as the compiled kernels take it (the ``act``
# argument of csrc/moment/); "leaky_relu" also takes its negative slope. The math of each, forward and
# derivative, is fastdfd/ops/moment/activation.py's.
ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu")
ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


def is_dense(x: torch.Tensor) -> bool:
    """True when x is non-overlapping and dense: its strides are a permutation of a contiguous layout's.

    Every element of x's storage span then belongs to exactly one index of x, so a tensor
    allocated with x's strides (``torch.empty_like`` does exactly that for such x) has
    the same footprint, and a kernel may address x, y, dy and dx with one set of strides.
    Size-1 dims never move the address and are ignored. Slices (``x[:, :8]``, ``x[::2]``)
    and expands (stride 0) are not dense.
    """
    if x.numel() == 0:
        return True  # nothing to address
    dims = sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def flat_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_p) when x's spatial dims flatten to one strided axis, else None.

    Kernels address element (n, c, p) of an [N, C, *spatial] tensor at
    n*stride_n + c*stride_c + p*stride_p: NCHW has stride_p == 1, channels_last stride_c == 1.
    This says nothing about whether x is dense (see :func:`kernel_layout`).
    """
    sizes, strides = x.shape, x.stride()
    spatial = [(s, st) for s, st in zip(sizes[2:], strides[2:]) if s != 1]
    for (_, outer), (size, inner) in zip(spatial, spatial[1:]):
        if outer != inner * size:
            return None
    stride_p = spatial[-1][1] if spatial else 1
    return strides[0], strides[1], stride_p


def _kernel_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """x's flat strides if every kernel may use x in place, else None."""
    if not is_dense(x):
        return None
    strides = flat_strides(x)
    if strides is None:
        return None
    _, stride_c, stride_p = strides
    # the CPU kernels' inner loops run along p (NCHW-like) or along c (channels_last-like)
    if stride_p != 1 and not (stride_c == 1 and x.shape[1] > 1):
        return None
    return strides


def kernel_layout(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x as the kernels may address it, and its flat strides (n, c, p).

    x is kept as it is only when it is non-overlapping and dense, its spatial dims flatten,
    and either p (NCHW, [N, C, L], ...) or c (channels_last, [N, C], [N, L, C] transposed)
    is its unit-stride axis; anything else (slices, batch strides, expands, permuted
    spatial dims) is copied to contiguous. Outputs allocated with :func:`empty_kernel_like`
    then have exactly x's strides, so the kernels' one set of strides is valid for x, y,
    dy and dx alike.
    """
    strides = _kernel_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = _kernel_strides(x)
        assert strides is not None, f"contiguous x {tuple(x.shape)} {x.stride()} has no kernel layout"
    return x, strides


def kernel_output_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped as x with the strides :func:`kernel_layout` gives x (y, dx).

    Also what the custom ops' fake (meta) implementations return, so torch.compile sees
    the strides the kernels really produce.
    """
    if _kernel_strides(x) is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)  # kernel_layout's contiguous copy
    return empty_kernel_like(x)


def empty_kernel_like(x: torch.Tensor) -> torch.Tensor:
    """An output for a kernel-layout x (as :func:`kernel_layout` returns it): exactly x's strides."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def check_kernel_layout(x: torch.Tensor, strides: tuple[int, int, int], *others: torch.Tensor | None) -> None:
    """Launchers' last check before raw addressing: x dense with these strides, others exactly alike."""
    if _kernel_strides(x) != tuple(strides):  # None (not dense, or no flat layout) never matches
        raise RuntimeError(f"fastdfd: x {tuple(x.shape)} with strides {x.stride()} is not in kernel layout "
                           f"{tuple(strides)} (call kernel_layout first)")
    for t in others:
        if t is not None and (t.shape != x.shape or t.stride() != x.stride() or t.dtype != x.dtype
                              or t.device != x.device):
            raise RuntimeError(f"fastdfd: a {t.dtype} tensor {tuple(t.shape)} with strides {t.stride()} does not "
                               f"match x's layout ({x.dtype} {tuple(x.shape)} strides {x.stride()})")


def like_strides(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` (e.g. dy) with exactly x's shape, strides and dtype (x in kernel layout), copied only when needed.

    dy from autograd can have any strides (an expand from ``y.sum()``, a slice, ...); the
    kernels index it with x's.
    """
    if t is None:
        return None
    if t.shape != x.shape:
        raise ValueError(f"fastdfd: gradient of shape {tuple(t.shape)} for an input of shape {tuple(x.shape)}")
    if t.stride() == x.stride() and t.dtype == x.dtype and t.device == x.device:
        return t
    return empty_kernel_like(x).copy_(t)
