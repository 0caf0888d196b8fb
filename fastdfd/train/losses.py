"""Small loss terms of generator training and distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-image anisotropic total variation (mean |dx| + mean |dy|), [N, C, H, W] -> [N]."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1) if x.shape[2] > 1 else x.new_zeros(x.shape[0])
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1) if x.shape[3] > 1 else x.new_zeros(x.shape[0])
    return dh + dw


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(T/tau) || softmax(S/tau)) * tau^2 (Hinton et al. 2015), logits [N, classes] (computed in fp32).

    ``reduction="batchmean"``: averaged over the batch, a scalar; ``"none"``: one value per image, [N].
    """
    t = float(temperature)
    if reduction not in ("batchmean", "none"):
        raise ValueError(f"reduction must be 'batchmean' or 'none', got {reduction!r}")
    per_class = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="none",
        log_target=True,
    )
    per_image = per_class.sum(1) * (t * t)
    return per_image.mean() if reduction == "batchmean" else per_image


def mode_seeking(images: torch.Tensor, latents: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The mode-seeking term of Mao et al. (2019), per generator: images [k, B, ...] made from latents [k, B, Z].

    The batch is paired first half against second half (B // 2 pairs) and
    ``mean over pairs of mean|z_i - z_j| / (mean|x_i - x_j| + eps)`` is returned, [k] (fp32): small when
    images differ as much as their latents. B < 2 is a ValueError.
    """
    b = images.shape[1]
    if b < 2:
        raise ValueError(f"mode seeking pairs images: a batch of {b} has no pair")
    half = b // 2
    x = images.float().flatten(2)
    z = latents.float().flatten(2)
    dx = (x[:, :half] - x[:, half:2 * half]).abs().mean(2)
    dz = (z[:, :half] - z[:, half:2 * half]).abs().mean(2)
    return (dz / (dx + eps)).mean(1)
