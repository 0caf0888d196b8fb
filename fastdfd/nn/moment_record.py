"""MomentRecord: the buffer a teacher's BN taps write their moment sums into, owned by the MomentMatcher.

The taps (:mod:`.tap`) know only this buffer: whether to record, how many segments the batch splits into, the
shift each layer's sums are taken about, and where to put them. The matcher (:mod:`.matcher`) makes the buffer,
clears it at the start of every teacher forward and reads it in ``loss()``; neither module names the other's
internals.

A BN module called more than once in one forward (weight sharing) has every call counted: its sums and counts
are added, so the layer's batch statistics are those of all its inputs together, which is what its running
statistics describe. (DeepInversion's forward hook keeps only the last call; the earlier ones would drop out of
the loss without a word.)
"""

from __future__ import annotations

import torch

__all__ = ["MomentRecord"]


class MomentRecord:
    """Per BN layer (``slot``): the summed first and second moments of its inputs in this forward, and counts.

    Args:
        shifts: per slot, the running mean at attach time ([C] tensors): the shift the sums are taken about
            (the fused tap uses the layer's own running mean; a layer in training mode moves its own, the loss
            keeps this one).
    """

    def __init__(self, shifts: list[torch.Tensor]):
        self._shifts = [s.detach() for s in shifts]
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.enabled = True
        self.groups: int | None = 1  # segments of the batch (one per generator); None: not set yet
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        # set by every write, cleared by the reader when it has read: a flag, not a counter, so that the same
        # step sets the same Python values every time (torch.compile guards on them; a counter would recompile)
        self.changed = False
        # whether the taps apply the activations handed to them (.epilogue): on only inside the rewritten
        # forward, which left them out; the teacher's own forward (or a submodule called alone) applies them itself
        self.epilogues = False

    @property
    def active_groups(self) -> int:
        if self.groups is None:
            raise RuntimeError("scope='generator' needs matcher.groups (the number of generators in the batch)")
        return int(self.groups)

    def shift(self, slot: int, device: torch.device) -> torch.Tensor:
        """The slot's attach-time running mean on ``device`` (copied once per device)."""
        key = (slot, device)
        if key not in self._on_device:
            self._on_device[key] = self._shifts[slot].to(device)
        return self._on_device[key]

    def add(self, slot: int, s1: torch.Tensor, s2: torch.Tensor, count: int) -> None:
        """Record one call's sums ([groups, C] each) over ``count`` values per channel and segment; a second call
        of the same layer in this forward adds to the first."""
        if slot in self.sums:
            p1, p2, n = self.sums[slot]
            s1, s2, count = p1 + s1, p2 + s2, n + count
        self.sums[slot] = (s1, s2, count)
        self.changed = True

    def clear(self) -> None:
        self.sums = {}
        self.changed = True
