"""CUDA-graph capture of a fixed-shape training step (PyTorch's whole-network capture pattern).

A :class:`GraphedStep` runs ``fn()``, a step that reads its per-step inputs only from
*static buffers* (tensors whose storage never changes) and returns one small tensor. Each
call first copies the new inputs into the buffers (device-to-device, no host sync), then:

1. the first ``warmup`` calls run ``fn`` eagerly on a side stream (these are real training
   steps; they also compile Triton kernels, pick cuBLAS/cuDNN algorithms and fill the moment
   matcher's layout cache, so nothing in the capture allocates host memory or syncs);
2. the next call captures ``fn`` once with ``torch.cuda.graph`` (capture records, it does not
   execute) and replays it for that step;
3. every later call is one ``graph.replay()``.

The graph's output is a static tensor that the next replay overwrites, so each call returns
a clone (a tiny device copy): callers may keep the returned tensors (the loop's pending loss
terms) and read them back whenever they like.

What may run inside ``fn``: device kernels and allocations (they come from the graph's
private memory pool). What must not: host syncs (``.item()``, ``.cpu()``, ``torch.nonzero``,
``bool(tensor)``), data-dependent shapes, host-to-device copies of new host data, Python
decisions that differ from step to step (Python runs once, at capture: every value it
computes there is baked in), and draws from a private ``torch.Generator`` (the draws happen
outside, into the buffers).

``capture`` is the seam that tests use: :func:`cuda_capture` on a GPU. Two stand-ins run on
any device: :func:`direct_capture` calls ``fn`` again at every "replay" and writes the result
into one static output tensor (checks the buffer plumbing); :func:`fx_capture` has a CUDA
graph's semantics: ``fn``'s Python runs once, on fake tensors (nothing executes, a host read
of a tensor fails as it would in a capture), and every replay re-runs the recorded tensor
ops on the real buffers and states, so a value that Python computed at capture time stays
baked in, as it would in a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

Capture = Callable[[Callable[[], torch.Tensor], Sequence[torch.Tensor]], Callable[[], torch.Tensor]]


def cuda_capture(fn: Callable[[], torch.Tensor], state: Sequence[torch.Tensor] = ()) -> Callable[[], torch.Tensor]:
    """Capture ``fn`` into a CUDA graph (private memory pool); return its replay. Nothing runs at capture."""
    graph = torch.cuda.CUDAGraph()
    # torch.cuda.graph synchronises, collects garbage and empties the allocator's cache first,
    # so the memory the eager warm-up steps cached goes back to the device for the graph's pool
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    replay.graph = graph  # keeps the graph alive with its replay
    return replay


def direct_capture(fn: Callable[[], torch.Tensor], state: Sequence[torch.Tensor] = ()) -> Callable[[], torch.Tensor]:
    """A stand-in for capture on any device: each replay calls ``fn`` and overwrites one static output."""
    out: list[torch.Tensor] = []

    def replay() -> torch.Tensor:
        new = fn()
        if not out:
            out.append(new)
        else:
            out[0].copy_(new)
        return out[0]

    return replay


def fx_capture(fn: Callable[[], torch.Tensor], state: Sequence[torch.Tensor] = ()) -> Callable[[], torch.Tensor]:
    """A CPU stand-in with capture semantics: trace ``fn`` once (fake tensors), replay the recorded ops.

    The tensors fn reads (buffers, parameters, optimizer states) become the traced module's
    constants, by reference, and their in-place updates are recorded. An op whose inputs are
    all such real tensors is also *executed* while tracing (a CUDA capture executes nothing):
    ``state``, the persistent tensors fn updates in place, is put back as it was afterwards.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    saved = [t.detach().clone() for t in state]
    try:
        gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)()
    finally:
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)
    return direct_capture(lambda: _run_traced(gm))


def _run_traced(gm) -> torch.Tensor:
    with torch.no_grad():  # the recorded graph holds the backward's ops; no autograd at replay
        return gm()


class GraphedStep:
    """Static input buffers + eager warm-up + one capture + replays of ``fn``.

    Args:
        fn: the step; reads its inputs only from ``buffers`` (and from persistent state
            updated in place: parameters, optimizer moments); returns one tensor.
        buffers: name -> static tensor (None for an input that is absent, e.g. the rows of
            an unchunked step); ``__call__(**inputs)`` copies each input into its buffer.
        state: the persistent tensors ``fn`` updates in place (parameters, optimizer moments,
            step counts); a capture must leave them as they were (see :func:`fx_capture`).
        warmup: eager calls before the capture (PyTorch recommends a few; at least 1).
        capture: :func:`cuda_capture` (default) or :func:`direct_capture`.
    """

    def __init__(self, fn: Callable[[], torch.Tensor], buffers: Mapping[str, torch.Tensor | None], *,
                 state: Sequence[torch.Tensor] = (), warmup: int = 3, capture: Capture = cuda_capture):
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (the first eager steps prepare the capture)")
        self.fn, self.buffers, self.state = fn, dict(buffers), list(state)
        self.warmup, self.capture = int(warmup), capture
        self.calls = 0
        self.replay: Callable[[], torch.Tensor] | None = None
        first = next(t for t in self.buffers.values() if t is not None)
        self.device = first.device
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def captured(self) -> bool:
        return self.replay is not None

    def _fill(self, inputs: Mapping[str, torch.Tensor | None]) -> None:
        if set(inputs) != set(self.buffers):
            raise ValueError(f"inputs {sorted(inputs)} do not match the static buffers {sorted(self.buffers)}")
        for name, value in inputs.items():
            buf = self.buffers[name]
            if (buf is None) != (value is None) or (buf is not None and buf.shape != value.shape):
                got = None if value is None else tuple(value.shape)
                want = None if buf is None else tuple(buf.shape)
                raise ValueError(f"input {name!r} has shape {got}, the static buffer {want}")
            if buf is not None:
                buf.copy_(value, non_blocking=True)

    def _eager(self) -> torch.Tensor:
        if self._side is None:
            return self.fn().clone()
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)  # the buffers were filled on the current stream
        with torch.cuda.stream(self._side):
            out = self.fn()
        current.wait_stream(self._side)
        return out.clone()  # on the current stream, after the side stream's work

    def __call__(self, **inputs: torch.Tensor | None) -> torch.Tensor:
        self._fill(inputs)
        self.calls += 1
        if self.replay is None:
            if self.calls <= self.warmup:
                return self._eager()
            self.replay = self.capture(self.fn, self.state)
        return self.replay().clone()
