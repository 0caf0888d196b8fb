"""CPU benchmarks (``make bench``): providers compared in one process on the same inputs.

Read the ratios printed at the end, not the absolute times: this is a shared 2-core machine.
The Triton provider is not timed here (on a CPU it runs in Triton's interpreter); the cpp
provider is fastdfd's CPU default.
"""

import pytest
import torch
from torch import nn

from fastdfd import GeneratorEnsemble
from fastdfd.models import create_model

from .ensemble_providers import ensemble_step
from .providers import (WHOLE_STEPS, bn_layer_step, memory_floor_step, randomize_bn, whole_step,
                        whole_step_models)

CPU_PROVIDERS = ["hooks", "hooks-compiled", "fastdfd-torch", "fastdfd-cpp"]
# (channels, spatial) of CIFAR ResNet-34 BN inputs at batch 256
LAYERS = [(64, 32), (128, 16), (256, 8), (512, 4)]
BATCH = 256


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("channels,size", LAYERS, ids=[f"c{c}s{s}" for c, s in LAYERS])
def test_bn_layer_forward_backward(benchmark, provider, channels, size):
    bn = randomize_bn(nn.BatchNorm2d(channels))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, channels, size, size, generator=g).requires_grad_(True)
    dy = torch.randn(BATCH, channels, size, size, generator=g)
    step, cleanup = bn_layer_step(provider, bn)
    step(x, dy)  # warm-up (and compilation for hooks-compiled, the extension build for fastdfd-cpp)
    benchmark.group = f"bn-layer c{channels} s{size} b{BATCH}"
    benchmark(step, x, dy)
    cleanup()


@pytest.mark.parametrize("epilogue", ["relu", "add+relu"])
@pytest.mark.parametrize("provider", ["hooks", "hooks-compiled", "fastdfd-cpp-unfused", "fastdfd-cpp"])
@pytest.mark.parametrize("channels,size", LAYERS[:2], ids=[f"c{c}s{s}" for c, s in LAYERS[:2]])
def test_bn_epilogue_layer_forward_backward(benchmark, provider, channels, size, epilogue):
    """BN then ReLU, and relu(BN(x) + x) (issue 22's epilogues): fastdfd-cpp applies the ReLU (and adds the
    residual) in the tap's pass, -unfused after it."""
    bn = randomize_bn(nn.BatchNorm2d(channels))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, channels, size, size, generator=g).requires_grad_(True)
    dy = torch.randn(BATCH, channels, size, size, generator=g)
    if epilogue == "relu":
        step, cleanup = bn_layer_step(provider, bn, nn.ReLU(inplace=True))
    else:
        step, cleanup = bn_layer_step(provider, bn, residual=True)
    step(x, dy)
    benchmark.group = f"bn+{epilogue} layer c{channels} s{size} b{BATCH}"
    benchmark(step, x, dy)
    cleanup()


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_bn_layer_call_overhead(benchmark, provider):
    """A tiny layer (2 x 16 x 4 x 4), forward and backward: what a call costs beyond its bytes (issue 22's
    per-call cost; fastdfd-cpp's eager path is the dispatcher op of csrc/moment/moment_library_cpu.cpp)."""
    bn = randomize_bn(nn.BatchNorm2d(16))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=g).requires_grad_(True)
    dy = torch.randn(2, 16, 4, 4, generator=g)
    step, cleanup = bn_layer_step(provider, bn)
    step(x, dy)
    step(x, dy)
    benchmark.group = "bn-layer call overhead c16 s4 b2"
    benchmark(step, x, dy)
    cleanup()


@pytest.mark.parametrize("outputs", ["preallocated", "fresh"])
@pytest.mark.parametrize("channels,size", LAYERS, ids=[f"c{c}s{s}" for c, s in LAYERS])
def test_bn_layer_memory_floor(benchmark, channels, size, outputs):
    """The least any fused tap moves, timed like the providers (see providers.memory_floor_step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, channels, size, size, generator=g)
    dy = torch.randn(BATCH, channels, size, size, generator=g)
    step = memory_floor_step(fresh_outputs=outputs == "fresh")
    step(x, dy)
    benchmark.group = f"bn-layer c{channels} s{size} b{BATCH}"
    benchmark(step, x, dy)


# the whole step as a fastdfd user runs it on the CPU: its own generator kernels, the teacher channels_last
WHOLE_STEP_PROVIDERS = CPU_PROVIDERS + ["fastdfd-cpp-compiled", "fastdfd-cpp-gen-cl"]


@pytest.mark.parametrize("provider", WHOLE_STEP_PROVIDERS)
def test_generator_training_step(benchmark, provider):
    """Digits teacher, 10 generators x 16 images at 16 px: moment loss + CE -> generator grads."""
    step, cleanup = whole_step("digits", provider)
    step()
    benchmark.group = "generator step digits K10 B16"
    benchmark(step)
    cleanup()


@pytest.mark.parametrize("provider", ["python-loop", "vmap", "grouped-eager", "fastdfd-cpp"])
@pytest.mark.parametrize("mode", ["train", "sample"])
def test_generator_ensemble(benchmark, provider, mode):
    """The digits demo's generator, K = 64, B = 8: a loop over modules, vmap, grouped conv, the cpp kernels.

    ``train`` is forward + backward to every generator parameter; ``sample`` is forward only.
    The Triton kernels are not timed here (the interpreter), and grouped-compiled is left to
    the GPU suite (minutes of inductor compilation on two cores).
    """
    ens = GeneratorEnsemble(64, 64, image_size=16, channels=1, latent_dim=64, widths=(32, 16), output_bn=False)
    step, _ = ensemble_step(provider, ens, 8, mode)
    step()
    benchmark.group = f"generator ensemble K64 B8 16px {mode}"
    benchmark(step)


REAL_TEACHERS = ["resnet56", "lite0"]


def _need(teacher_name: str) -> None:
    if teacher_name == "lite0":
        pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")


@pytest.mark.parametrize("provider", WHOLE_STEP_PROVIDERS)
@pytest.mark.parametrize("teacher_name", REAL_TEACHERS)
def test_generator_training_step_real_teacher(benchmark, teacher_name, provider):
    """The whole generator step on real teachers (issue 22): the pretrained CIFAR ResNet-56 at 32 px, 10 generators
    x 25 images, and EfficientNet-Lite0 at 64 px, 10 generators x 8 images: ensemble -> teacher -> moment loss +
    cross-entropy -> gradients of every generator parameter."""
    _need(teacher_name)
    step, cleanup = whole_step(teacher_name, provider)
    step()
    step()  # compiled providers: the second call runs the compiled graph on its own
    k, batch, _, size = WHOLE_STEPS[teacher_name][:4]
    benchmark.group = f"generator step {teacher_name} K{k} B{batch} {size}px"
    benchmark.pedantic(step, rounds=5, iterations=1)
    cleanup()


@pytest.mark.parametrize("teacher_name", REAL_TEACHERS)
def test_distillation_step_real_teacher(benchmark, teacher_name):
    """For context beside the generator step: a distillation step on the same images (teacher forward, student
    forward and backward; the generators sample without gradients)."""
    from fastdfd.settings import DistillSettings
    from fastdfd.train import Distiller

    _need(teacher_name)
    teacher, ens, batch = whole_step_models(teacher_name)
    k, _, classes, size = WHOLE_STEPS[teacher_name][:4]
    student = create_model("cifar_resnet20", num_classes=classes)
    distiller = Distiller(teacher, student, ens, settings=DistillSettings(batch_size=batch), total_steps=100,
                          progress=False, log_every=1000)
    distiller.fit(1)
    benchmark.group = f"distillation step {teacher_name} K{k} B{batch} {size}px"
    benchmark.pedantic(lambda: distiller.fit(1), rounds=5, iterations=1)
