"""Benchmark providers: the same work done the field's way and fastdfd's way.

Every provider builds a step function over identical inputs and returns the same
quantities, so that results can be checked against each other before they are timed.

- ``hooks``: DeepInversion's pattern in eager PyTorch -- the teacher's BN in eval mode and
  a forward hook per BN layer computing mean, permute/contiguous/var and the norms (extra
  passes over every BN input, and their backward).
- ``hooks-compiled``: the same under ``torch.compile`` (inductor).
- ``fastdfd-torch`` / ``fastdfd-triton`` / ``fastdfd-cpp`` / ``fastdfd-cuda``: the
  MomentMatcher on that backend (one tap per BN layer, one packed finalize).
- ``fastdfd-cpp-compiled`` (generator step only): the same under ``torch.compile``, so that the
  teacher's convolutions are compiled as they are for ``hooks-compiled``.
- any generator-step provider with ``-cl`` appended (``hooks-compiled-cl``, ``fastdfd-cpp-cl``, ...): the same
  with the teacher's 4-D weights and the generated images channels_last (``ExecutionSettings.channels_last``:
  oneDNN's faster convolution layout on the CPU, cuDNN's on a card), so that a layout is compared with a layout.
- any fastdfd generator-step provider with ``-gen`` appended (before ``-cl`` where both are): the generators on
  fastdfd's own dispatch (the ``cpp`` kernels on the CPU, the library's default there) instead of the grouped
  convolutions every other provider shares: the step as a fastdfd user runs it.

Two workloads: one BN layer forward+backward (the upstream gradient dy of the BN output
is given, as inside a network), and a whole generator-training step (ensemble -> teacher
-> moment loss + cross-entropy -> gradients of every generator parameter).
"""

from __future__ import annotations

import contextlib
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import fastdfd
from fastdfd import GeneratorEnsemble, MomentMatcher
from fastdfd.nn import ensemble_forward, epilogue
from fastdfd.train.modes import channels_last_weights

PROVIDERS = ("hooks", "hooks-compiled", "fastdfd-torch", "fastdfd-triton", "fastdfd-cpp", "fastdfd-cuda")


def r_feature(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's per-layer loss, verbatim (fp32 statistics of the layer input)."""
    nch = x.shape[1]
    x = x.float()
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


class HookLoss:
    """DeepInversion's forward hooks on every BN layer of a model."""

    def __init__(self, model: nn.Module):
        self.values: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _hook(self, module, inputs, output):
        self.values.append(r_feature(module, inputs[0]))

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.values).sum()
        self.values = []
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _backend_of(provider: str) -> str | None:
    return provider.split("-", 1)[1] if provider.startswith("fastdfd-") else None


def _matcher(provider: str, model: nn.Module) -> tuple[MomentMatcher, str | None]:
    """A fastdfd provider's matcher (DeepInversion's l2) and backend:
    ``fastdfd-<backend>[-unfused|-actonly][-compiled]``, where ``-unfused`` leaves the activations and residual
    adds after the BN layers as their own ops (the A/B of the taps' epilogues) and ``-actonly`` fuses the
    activations but no residual add (the A/B of the residual epilogue alone)."""
    name = provider.removesuffix("-compiled")
    if name.endswith("-actonly"):
        # benchmark-only: the fusion's trace finds no residual add, so each BN + add + act stays as it was
        with mock.patch.object(epilogue, "residual_of", lambda node, source: None):
            matcher = MomentMatcher(model, kind="l2")
        return matcher, _backend_of(name.removesuffix("-actonly"))
    matcher = MomentMatcher(model, kind="l2", fuse_epilogues=not name.endswith("-unfused"))
    return matcher, _backend_of(name.removesuffix("-unfused"))


# ------------------------------------------------------------------------- one BN layer
class ResidualBN(nn.Module):
    """``relu(bn(x) + x)``: a basic block's second BN, its residual add and ReLU, with the block's input as the
    residual (so dx sums the tap's gradient and the residual's)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(x) + x)


def bn_layer_step(provider: str, bn: nn.BatchNorm2d, activation: nn.Module | None = None,
                  residual: bool = False) -> tuple[Callable, Callable]:
    """Returns (step(x, dy) -> (moment loss, dx), cleanup). The BN layer is frozen, as a teacher's is.
    ``activation``: a module after the BN (the matcher fuses it into the tap; ``-unfused`` providers do not);
    ``residual``: the layer is :class:`ResidualBN` instead (the tap fuses the add and the ReLU)."""
    if residual:
        model = ResidualBN(bn).eval().requires_grad_(False)
    else:
        model = nn.Sequential(bn, *([activation] if activation is not None else [])).eval().requires_grad_(False)
    if provider.startswith("hooks"):
        hooks = HookLoss(model)

        def forward(x):
            y = model(x)
            return hooks.pop(), y

        if provider == "hooks-compiled":
            forward = torch.compile(forward)
        cleanup = hooks.remove
    else:
        matcher, backend = _matcher(provider, model)

        def forward(x):
            with fastdfd.backend(backend):
                y = model(x)
                return matcher.loss(), y

        cleanup = matcher.remove

    def step(x, dy):
        loss, y = forward(x)
        (dx,) = torch.autograd.grad([loss, y], [x], [torch.ones_like(loss), dy])
        return loss.detach(), dx

    return step, cleanup


def memory_floor_step(fresh_outputs: bool) -> Callable:
    """Copies with a fused tap's least traffic (5 tensors of x's size): the bench's memory floor.

    Not a provider (it computes no loss): a copy for the forward (read x, write y) and an add for
    the backward (read x and dy, write dx), ATen's parallel, vectorised kernels. With
    ``fresh_outputs=False`` they write into buffers allocated once: bytes moved over the copy
    bandwidth, the floor proper. With ``True`` they allocate y and dx on every call, as every
    provider must (autograd's outputs are new tensors): what that adds is the allocator's (glibc
    serves allocations above its mmap threshold, 32 MiB at most, with fresh pages, each one
    faulted in and zeroed by the kernel on first write), the same for every provider.
    """
    buffers: dict[str, torch.Tensor] = {}

    def step(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if fresh_outputs:
            return x.clone(), torch.add(x, dy)
        if not buffers:
            buffers.update(y=torch.empty_like(x), dx=torch.empty_like(x))
        return buffers["y"].copy_(x), torch.add(x, dy, out=buffers["dx"])

    return step


# ------------------------------------------------------------------- generator step
def generator_step(provider: str, teacher: nn.Module, ensemble: GeneratorEnsemble, batch: int,
                   seed: int = 0, generator_backend: str | None = "torch") -> tuple[Callable, Callable]:
    """Returns (step() -> (loss, grads), cleanup): one generator-training step, fixed inputs.

    The loss is DeepInversion's (l2 moments over the whole batch) plus cross-entropy, so
    that every provider computes the same number. The teacher is frozen, as in training.
    ``generator_backend`` runs the K generators: ``torch`` (grouped convolutions, the same
    for every provider, so that the moment loss is what differs) or ``triton`` (step 4's kernels).
    A provider ending in ``-cl`` holds ``teacher``'s 4-D weights channels_last until ``cleanup`` puts the
    original tensors back (``fastdfd.train.modes.channels_last_weights``, as the generator trainer does); a
    fastdfd provider ending in ``-gen`` (before any ``-cl``) runs the generators on fastdfd's automatic dispatch
    instead (the ``cpp`` kernels on the CPU, unless ``FASTDFD_BACKEND`` forces another).
    """
    teacher.eval().requires_grad_(False)
    channels_last = provider.endswith("-cl")
    provider = provider.removesuffix("-cl")
    if provider.endswith("-gen"):
        if not provider.startswith("fastdfd-"):
            raise ValueError(f"{provider}-gen: only a fastdfd provider runs fastdfd's generators")
        provider, generator_backend = provider.removesuffix("-gen"), None
    # as GeneratorTrainer with ExecutionSettings.channels_last: the weights once, the images at each step
    layout = contextlib.ExitStack()
    layout.enter_context(channels_last_weights(teacher, channels_last))
    gen = torch.Generator(device=ensemble.fc_z.device).manual_seed(seed)
    z, y, local = ensemble.draw(batch, None, gen)
    params = ensemble.stacked()
    names = list(params)
    k = ensemble.num_generators

    def images():
        with fastdfd.backend(generator_backend):
            x = ensemble_forward(params, ensemble.spec, z, local)
        x = x.reshape(k * batch, *x.shape[2:])
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    if provider.startswith("hooks"):
        hooks = HookLoss(teacher)

        def forward():
            logits = teacher(images())
            return hooks.pop() + F.cross_entropy(logits.float(), y.reshape(-1))

        if provider == "hooks-compiled":
            forward = torch.compile(forward)
        remove = hooks.remove
    else:
        matcher, backend = _matcher(provider, teacher)

        def forward():
            with fastdfd.backend(backend):
                logits = teacher(images())
                return matcher.loss() + F.cross_entropy(logits.float(), y.reshape(-1))

        if provider.endswith("-compiled"):  # the fused ops are custom ops: one graph, the teacher compiled around them
            forward = torch.compile(forward)
        remove = matcher.remove

    def cleanup():
        remove()
        layout.close()

    def step():
        loss = forward()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        return loss.detach(), grads

    return step, cleanup


# ------------------------------------------------------- the whole-step cases (issue 22)
# (generators, images each, classes, image size, channels, latent size, generator widths): the digits CNN with the
# demo's generator, ResNet-56 with the library's default generator, Lite0 with the Lite0 study's smaller one
WHOLE_STEPS = {"digits": (10, 16, 10, 16, 1, 64, (32, 16)), "resnet56": (10, 25, 10, 32, 3, 100, (128, 64)),
               "lite0": (10, 8, 1000, 64, 3, 100, (32, 16))}
#: each case's teacher architecture: create_model's name (efficientnet-lite0: efficientnet_lite_pytorch's)
WHOLE_STEP_ARCHITECTURES = {"digits": "digits_teacher", "resnet56": "cifar_resnet56", "lite0": "efficientnet-lite0"}


def whole_step_teacher(name: str) -> nn.Module:
    """A teacher of the whole-step cases. Speed does not depend on the weights' values: the pretrained ones where
    they are here (ResNet-56 from ``FASTDFD_CIFAR10_DIR`` or ../shared/data/cifar10), else the architecture with
    plausible BN statistics. Lite0 needs ``efficientnet-lite-pytorch`` (ImportError without it)."""
    from fastdfd.models import create_model

    if name == "digits":
        return randomize_bn(create_model(WHOLE_STEP_ARCHITECTURES[name]))
    if name == "resnet56":
        import os
        from pathlib import Path

        teacher = create_model(WHOLE_STEP_ARCHITECTURES[name], num_classes=10)
        data = os.environ.get("FASTDFD_CIFAR10_DIR", Path(__file__).resolve().parents[2] / "shared/data/cifar10")
        path = Path(data) / "resnet56.th"
        if path.is_file():
            from fastdfd.models.weights import load_weights

            return load_weights(teacher, path, "teacher").eval()
        return randomize_bn(teacher)
    if name == "lite0":
        from efficientnet_lite_pytorch import EfficientNet

        return randomize_bn(EfficientNet.from_name(WHOLE_STEP_ARCHITECTURES[name]))
    raise ValueError(f"unknown whole-step teacher {name!r}; expected one of {sorted(WHOLE_STEPS)}")


def whole_step_models(name: str, device="cpu") -> tuple[nn.Module, GeneratorEnsemble, int]:
    """(teacher, ensemble, images per generator) of a whole-step case, seeded, on ``device``."""
    k, batch, classes, size, channels, latent, widths = WHOLE_STEPS[name]
    torch.manual_seed(0)
    teacher = whole_step_teacher(name).to(device)
    ens = GeneratorEnsemble(k, classes, image_size=size, channels=channels, latent_dim=latent, widths=widths,
                            output_bn=False).to(device)
    return teacher, ens, batch


def whole_step(name: str, provider: str, device="cpu") -> tuple[Callable, Callable]:
    """(step, cleanup) of one provider on a whole-step case (a fresh teacher: one matcher per teacher)."""
    teacher, ens, batch = whole_step_models(name, device)
    return generator_step(provider, teacher, ens, batch=batch)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Plausible running statistics (a trained teacher's stand-in), in place; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()
