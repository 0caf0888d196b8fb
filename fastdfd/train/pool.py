"""A pool of generated images and the teacher's logits on them, filled by generator training, drawn by distillation.

Each generator step already runs the teacher on its images: keeping those images (detached, in the
teacher's input space) and the logits it computed costs a copy, and gives the student targets with no
teacher pass of its own. Distilling from the pool (``Distiller(..., pool=pool)``) then costs one student
forward and backward per step, where sampling fresh images costs a generator forward and a teacher
forward besides; and the pool holds images from the generators' whole recent trajectory, not only their
current state (FastDFKD, Fang et al. 2022, and CMI, Fang et al. 2021, keep such a memory of synthesised
images; NAYER too).

The pool is a ring buffer of ``capacity`` images, preallocated on first use on the images' device: a push
copies into it (the position is a Python integer; no host sync), a draw gathers random rows.
"""

from __future__ import annotations

import torch


class ImagePool:
    """Ring buffer of (image [C, H, W], teacher logits [classes]) pairs.

    Args:
        capacity: images kept (the oldest are overwritten).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"pool capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.images: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.size = 0  # rows filled
        self._next = 0  # where the next push starts
        self.pushed = 0  # images pushed in all

    def push(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        """Add a batch: ``images`` [N, C, H, W] and ``logits`` [N, classes] (detached; stored in their dtypes)."""
        if images.shape[0] != logits.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {logits.shape[0]} rows of logits")
        images, logits = images.detach(), logits.detach()
        if self.images is None:
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.logits = logits.new_empty((self.capacity, *logits.shape[1:]))
        elif images.shape[1:] != self.images.shape[1:] or logits.shape[1:] != self.logits.shape[1:]:
            raise ValueError(f"pool holds images {tuple(self.images.shape[1:])} and logits "
                             f"{tuple(self.logits.shape[1:])}; got {tuple(images.shape[1:])} and "
                             f"{tuple(logits.shape[1:])}")
        n = images.shape[0]
        if n >= self.capacity:  # only the newest capacity rows survive
            images, logits, n = images[-self.capacity:], logits[-self.capacity:], self.capacity
        first = min(n, self.capacity - self._next)
        self.images[self._next:self._next + first] = images[:first]
        self.logits[self._next:self._next + first] = logits[:first]
        if first < n:  # wrap around
            self.images[:n - first] = images[first:]
            self.logits[:n - first] = logits[first:]
        self._next = (self._next + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.pushed += int(images.shape[0])

    def draw(self, n: int, rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` rows drawn uniformly with replacement: (images [n, C, H, W], logits [n, classes]).
        RuntimeError on an empty pool."""
        if self.size == 0:
            raise RuntimeError("the image pool is empty: train the generators (with this pool) before drawing")
        device = self.images.device
        rows = torch.randint(0, self.size, (n,), generator=rng, device=device)
        return self.images.index_select(0, rows), self.logits.index_select(0, rows)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ImagePool(capacity={self.capacity}, size={self.size}, pushed={self.pushed})"


__all__ = ["ImagePool"]
