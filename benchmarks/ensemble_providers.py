"""Providers for K generators at once: the anchors of docs/method.md section 8 and fastdfd's kernels.

Every provider runs the same K generators (weights of one :class:`GeneratorEnsemble`) on
the same latents and labels, and returns images [K, B, C, S, S] (``sample``) or the
gradient of <images, dy> with respect to every generator parameter (``train``):

- ``python-loop``: K standalone ``Generator`` modules called one after another;
- ``python-loop-graph``: the same loop captured once in a CUDA graph and replayed (CUDA only);
- ``vmap``: ``torch.func.stack_module_state`` + ``vmap`` + ``functional_call`` over the K modules;
- ``grouped-eager``: fastdfd's ``torch`` backend (batch-major activations, grouped conv, K*C-channel BN);
- ``grouped-compiled``: the same under ``torch.compile`` (inductor);
- ``fastdfd-triton``: the fused Triton kernels (kernels/generator/linear_gather.py, conv.py);
- ``fastdfd-cpp``: the CPU extension (csrc/generator/generator_cpu.cpp: sub-pixel im2col + sgemm per generator).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

import fastdfd
from fastdfd import GeneratorEnsemble
from fastdfd.models.generator import Generator
from fastdfd.ops.generator import ensemble_forward

ENSEMBLE_PROVIDERS = ("python-loop", "python-loop-graph", "vmap", "grouped-eager", "grouped-compiled",
                      "fastdfd-triton", "fastdfd-cpp")


class _OneHotGenerator(torch.nn.Module):
    """Generator.from_onehot as a module's forward (vmap cannot run the label lookup's check)."""

    def __init__(self, gen: Generator):
        super().__init__()
        self.gen = gen

    def forward(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return self.gen.from_onehot(z, onehot)


def ensemble_step(provider: str, ensemble: GeneratorEnsemble, batch: int, mode: str,
                  seed: int = 0) -> tuple[Callable, Callable[[], list[torch.Tensor]]]:
    """(step, params): ``step()`` returns images (sample) or gradients in ensemble layout (train)."""
    if mode not in ("sample", "train"):
        raise ValueError(f"mode must be 'sample' or 'train', got {mode!r}")
    dev = ensemble.fc_z.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    z, y, local = ensemble.draw(batch, None, gen)
    z = z.to(ensemble.fc_z.dtype)
    k, spec = ensemble.num_generators, ensemble.spec
    dy = torch.randn((k, batch, spec.channels, spec.image_size, spec.image_size), generator=gen, device=dev,
                     dtype=z.dtype)
    train = mode == "train"

    if provider in ("grouped-eager", "grouped-compiled", "fastdfd-triton", "fastdfd-cpp"):
        params = ensemble.stacked()
        names = list(params)
        backend = provider.split("-", 1)[1] if provider.startswith("fastdfd-") else "torch"

        def run(z, local, *tensors):
            with fastdfd.backend(backend):
                out = ensemble_forward(dict(zip(names, tensors)), spec, z, local)
            if not train:
                return out
            return torch.autograd.grad(out, tensors, dy)

        if provider == "grouped-compiled":
            run = torch.compile(run)
        tensors = [params[n] for n in names]

        def step():
            if train:
                return list(run(z, local, *tensors))
            with torch.no_grad():
                return run(z, local, *tensors)

        return step, (lambda: tensors)

    gens = [g.to(dev, ensemble.fc_z.dtype).requires_grad_(train) for g in ensemble.unbind()]
    if provider == "vmap":
        wrapped = [_OneHotGenerator(g) for g in gens]
        base = copy.deepcopy(wrapped[0]).to("meta")
        stacked, buffers = torch.func.stack_module_state(wrapped)
        onehot = F.one_hot(local, ensemble.classes_per_generator).to(z.dtype)

        def one(p, b, z_k, oh_k):
            return torch.func.functional_call(base, (p, b), (z_k, oh_k))

        vmapped = torch.vmap(one)
        tensors = list(stacked.values())

        def step():
            if not train:
                with torch.no_grad():
                    return vmapped(stacked, buffers, z, onehot)
            out = vmapped(stacked, buffers, z, onehot)
            return list(torch.autograd.grad(out, tensors, dy))

        return step, (lambda: tensors)

    if provider not in ("python-loop", "python-loop-graph"):
        raise ValueError(f"unknown provider {provider!r}; expected one of {ENSEMBLE_PROVIDERS}")
    gen_params = [list(g.parameters()) for g in gens]
    flat = [p for ps in gen_params for p in ps]

    def loop():
        outs = [g(z[i], y[i]) for i, g in enumerate(gens)]
        if not train:
            return torch.stack(outs)
        return list(torch.autograd.grad(outs, flat, list(dy.unbind(0))))

    if provider == "python-loop":
        def step():
            if train:
                return loop()
            with torch.no_grad():
                return loop()

        return step, (lambda: flat)

    if dev.type != "cuda":
        raise RuntimeError("python-loop-graph needs a CUDA device")
    # CUDA graphs: warm up on a side stream, capture once, replay (static inputs and outputs).
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    ctx = torch.no_grad() if not train else torch.enable_grad()
    with torch.cuda.stream(stream), ctx:
        for _ in range(2):
            loop()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), ctx:
        static_out = loop()

    def step():
        graph.replay()
        return static_out

    return step, (lambda: flat)


def grad_checksum(grads) -> float:
    """sqrt(sum of squares) over every gradient: the same in any parameter layout (loop or stacked)."""
    return float(torch.sqrt(sum(g.detach().double().square().sum() for g in grads)))
