"""Augmentation of generated images, batched: one gather per batch.

- In distillation, the standard CIFAR random crop and flip (:func:`random_crop_flip`). The teacher and
  the student see the same augmented view (a consistent view, as Beyer et al., "Knowledge distillation:
  A good teacher is patient and consistent", 2022, recommend), so the teacher's targets stay exact; what
  it adds is more distinct inputs per generated image.
- In the generators' step, DeepInversion's random jitter and flip (Yin et al., "Dreaming to Distill",
  CVPR 2020; its released code rolls the batch with ``torch.roll`` and flips it with ``torch.flip``):
  each image rolled cyclically by a random offset and flipped at random before the teacher sees it
  (DeepInversion draws one offset and one flip per batch; here every image draws its own), so that the
  generator cannot satisfy the teacher with features tied to exact pixel positions
  (:func:`draw_jitter_flip`, :func:`jitter_flip`). The draws are separate from the apply, so that a
  captured CUDA graph replays the apply on each step's fresh draws.
- In distillation, mixing pairs of a step's images (:func:`mix_pairs`): mixup (Zhang et al., "mixup: Beyond
  Empirical Risk Minimization", ICLR 2018) or CutMix (Yun et al., "CutMix", ICCV 2019). The mixed image is
  off every generator's manifold, so no stored label fits it: the teacher labels it (function matching,
  Beyer et al. 2022), and the shares of the two images need not be returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..settings import AUGMENTS, MIXES  # the choices live with the settings


def random_crop_flip(x: torch.Tensor, padding: int, rng: torch.Generator | None = None) -> torch.Tensor:
    """Per image, a random ``H x W`` crop of ``x`` zero-padded by ``padding`` pixels, then a horizontal flip
    with probability 1/2 (torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip``, for a
    whole batch in one gather). ``x`` [N, C, H, W] (any float dtype and device), same shape out; the draws
    come from ``rng`` (on x's device), so a run stays reproducible."""
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip takes [N, C, H, W] images, got {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=rng, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=rng, device=dev)
    flip = torch.rand(n, 1, 1, generator=rng, device=dev) < 0.5
    cols = _flipped_columns(w, flip) + dx  # flip the crop's columns: the same as flipping after
    rows = torch.arange(h, device=dev).view(1, h, 1) + dy
    padded = F.pad(x, (padding, padding, padding, padding))
    return _gather_pixels(padded, rows, cols, (h, w))


def _flipped_columns(w: int, flip: torch.Tensor) -> torch.Tensor:
    """Column indices [N, 1, W]: 0..W-1, reversed where ``flip`` ([N, 1, 1] bool) is set."""
    cols = torch.arange(w, device=flip.device).view(1, 1, w)
    return torch.where(flip, w - 1 - cols, cols)


def _gather_pixels(src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Out [N, C, H, W] (H, W = ``size``) with out[i, :, r, c] = src[i, :, rows[i, r, c], cols[i, r, c]]: one gather
    for the batch. ``rows`` and ``cols`` broadcast to [N, H, W] and index ``src`` [N, C, H', W']."""
    n, c, w_src = src.shape[0], src.shape[1], src.shape[3]
    h, w = size
    index = (rows * w_src + cols).expand(n, h, w).reshape(n, 1, h * w).expand(n, c, h * w)
    return src.flatten(2).gather(2, index).view(n, c, h, w)


def draw_jitter_flip(n: int, jitter: int, flip: bool, rng: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Per image, a cyclic shift (dy, dx), each uniform in [-jitter, jitter], and a horizontal flip with
    probability 1/2 when ``flip``: int64 [n, 3] (dy, dx, flipped in {0, 1}) on ``device``, from ``rng``."""
    if isinstance(jitter, bool) or not isinstance(jitter, int):
        raise TypeError(f"jitter must be an int (pixels), got {jitter!r}")
    if n < 0 or jitter < 0:
        raise ValueError(f"n and jitter must be >= 0, got n={n}, jitter={jitter}")
    shifts = torch.randint(-jitter, jitter + 1, (n, 2), generator=rng, device=device)
    flips = (torch.rand(n, 1, generator=rng, device=device) < 0.5).long() if flip else shifts.new_zeros(n, 1)
    return torch.cat([shifts, flips], 1)


def jitter_flip(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``x`` [N, C, H, W] with image i rolled by ``params[i, :2]`` pixels along H and W (``torch.roll``'s
    direction: pixel r moves to r + dy mod H), then flipped left-right where ``params[i, 2]`` is non-zero
    (DeepInversion's roll then flip, per image). Same shape, dtype and device; differentiable in ``x`` (a
    permutation of each image's pixels). ``params``: int64 [N, 3] from :func:`draw_jitter_flip`."""
    if x.dim() != 4:
        raise ValueError(f"jitter_flip takes [N, C, H, W] images, got {tuple(x.shape)}")
    n, _, h, w = x.shape
    if params.shape != (n, 3) or params.dtype != torch.int64:
        raise ValueError(f"params must be int64 [{n}, 3] (dy, dx, flipped), got {params.dtype} {tuple(params.shape)}")
    if params.device != x.device:
        raise ValueError(f"params on {params.device}, images on {x.device}")
    dy, dx, flipped = (params[:, i].view(n, 1, 1) for i in range(3))
    cols = _flipped_columns(w, flipped.bool())  # flip after the roll: out[c] = rolled[W-1-c]
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    return _gather_pixels(x, (rows - dy) % h, (cols - dx) % w, (h, w))


def mix_pairs(x: torch.Tensor, kind: str, rng: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``x`` [N, C, H, W] mixed with its partner ``x[perm[i]]`` (``perm`` a random permutation of
    the batch), by a share ``l_i ~ U(0, 1)`` drawn per image (Beta(1, 1), both papers' CIFAR setting):

    - ``"mixup"``: ``out_i = l_i * x_i + (1 - l_i) * x_perm[i]``;
    - ``"cutmix"``: ``out_i = x_i`` with a box of ``x_perm[i]`` pasted in: sides ``sqrt(1 - l_i)`` times the
      image's, centre uniform over the image, clipped at the border (so the pasted area is about ``1 - l_i``
      or less); a pixel is inside when its centre is.

    Same shape, dtype and device as ``x``; the draws come from ``rng`` (on x's device: permutation, shares,
    then the box centres), in one batched pass with no host sync. Mixup is affine-invariant, so mixing
    normalised images equals normalising mixed pixels; CutMix copies pixels. ``kind = "none"`` returns ``x``.
    ValueError: ``x`` not 4-d, ``kind`` not one of :data:`MIXES`."""
    if kind not in MIXES:
        raise ValueError(f"mix kind {kind!r}: expected one of {', '.join(MIXES)}")
    if x.dim() != 4:
        raise ValueError(f"mix_pairs takes [N, C, H, W] images, got {tuple(x.shape)}")
    if kind == "none":
        return x
    n, _, h, w = x.shape
    dev = x.device
    partner = x.index_select(0, torch.randperm(n, generator=rng, device=dev))
    share = torch.rand(n, generator=rng, device=dev, dtype=torch.float32)
    if kind == "mixup":
        share = share.to(x.dtype).view(n, 1, 1, 1)
        return share * x + (1 - share) * partner
    centre = torch.rand(n, 2, 1, generator=rng, device=dev, dtype=torch.float32)  # (row, column), in [0, 1)
    half = 0.5 * torch.sqrt(1 - share).view(n, 1)  # half the box's side, in units of the image's side

    def inside(axis: int, size: int) -> torch.Tensor:  # [N, size]: pixel centres within the box along an axis
        centres = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size
        return (centres >= centre[:, axis] - half) & (centres < centre[:, axis] + half)

    box = inside(0, h).view(n, 1, h, 1) & inside(1, w).view(n, 1, 1, w)
    return torch.where(box, partner, x)


__all__ = ["AUGMENTS", "MIXES", "draw_jitter_flip", "jitter_flip", "mix_pairs", "random_crop_flip"]
