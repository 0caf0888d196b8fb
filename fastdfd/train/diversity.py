"""Diversity of images within a class, in the teacher's penultimate feature space.

A generator can satisfy its teacher (high top-1, low moment distance) with one image per class
repeated: a student learns nothing about a class from that. Two figures per class say how many
different images it really makes, on the features a classifier hands its last linear layer:

- ``spread``: the mean pairwise cosine distance ``1 - cos(f_i, f_j)`` over the class's images
  (i != j), in [0, 2]; 0 when every image is the same.
- ``effective_images``: the Vendi score (Friedman & Dieng, "The Vendi Score: A Diversity
  Evaluation Metric for Machine Learning", 2023) with the cosine kernel: ``exp(H(lambda))``, H the
  Shannon entropy of the eigenvalues of ``K / n``, ``K_ij = cos(f_i, f_j)``. It is the effective
  number of distinct images: 1 when all n are the same, n when their features are orthogonal.
  Penultimate features after a ReLU and a pool are non-negative, so even real images of one class
  stay well under n: compare against the same figure on real images of the class where they exist.

A class is called *collapsed* when ``effective_images < COLLAPSE_THRESHOLD`` (1.5: under one and
a half distinct images among its samples).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

COLLAPSE_THRESHOLD = 1.5

__all__ = ["COLLAPSE_THRESHOLD", "class_diversity", "diversity", "penultimate_features"]


@contextlib.contextmanager
def penultimate_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside, every forward of ``model`` appends to the yielded list the input of the last
    ``nn.Linear`` it called (flattened to [N, D], detached): the penultimate features of a classifier
    whose head is a linear layer (torchvision's ``fc``, timm's ``classifier``/``head.fc``,
    EfficientNet-Lite's ``_fc``). ValueError when the model has no ``nn.Linear``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: no penultimate features to read")
    last: list[torch.Tensor | None] = [None]

    def record(_module, args):
        last[0] = args[0]

    out: list[torch.Tensor] = []

    def finish(_module, _args, _output):
        if last[0] is not None:
            out.append(last[0].detach().flatten(1))
            last[0] = None

    handles = [m.register_forward_pre_hook(record) for m in linears]
    handles.append(model.register_forward_hook(finish))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def diversity(features: torch.Tensor) -> tuple[float, float]:
    """(spread, effective_images) of n feature rows [n, D] (see the module docstring); float64 inside.

    n = 1 gives (0.0, 1.0). ValueError for an empty or non-2-D input.
    """
    if features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be [n >= 1, D], got {tuple(features.shape)}")
    f = features.detach().to("cpu", torch.float64)
    n = f.shape[0]
    norms = f.norm(dim=1, keepdim=True)
    # an all-zero feature row (a dead ReLU everywhere) has no direction: count it as one shared point
    unit = torch.where(norms > 0, f / norms.clamp_min(1e-300), torch.full_like(f, f.shape[1] ** -0.5))
    k = unit @ unit.T
    if n == 1:
        return 0.0, 1.0
    spread = float((1 - k).sum() / (n * (n - 1)))  # the diagonal contributes 0
    eig = torch.linalg.eigvalsh(k / n).clamp_min(0)
    eig = eig / eig.sum()
    nz = eig[eig > 0]
    return spread, float(torch.exp(-(nz * nz.log()).sum()))


def class_diversity(features: torch.Tensor, labels: torch.Tensor) -> dict[int, dict[str, float]]:
    """Per class of ``labels`` [n]: ``{"spread", "effective_images", "images"}`` of its rows of ``features`` [n, D]."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    out = {}
    for c in sorted(set(labels.tolist())):
        rows = features[labels == c]
        spread, eff = diversity(rows)
        out[int(c)] = {"spread": spread, "effective_images": eff, "images": int(rows.shape[0])}
    return out
