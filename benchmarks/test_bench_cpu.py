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
from .providers import bn_layer_step, generator_step, memory_floor_step, randomize_bn

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


@pytest.mark.parametrize("provider", CPU_PROVIDERS + ["fastdfd-cpp-compiled"])
def test_generator_training_step(benchmark, provider):
    """Digits teacher, 10 generators x 16 images at 16 px: moment loss + CE -> generator grads."""
    torch.manual_seed(0)
    teacher = randomize_bn(create_model("digits_teacher"))
    ens = GeneratorEnsemble(10, 10, image_size=16, channels=1, latent_dim=64, widths=(32, 16), output_bn=False)
    step, cleanup = generator_step(provider, teacher, ens, batch=16)
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
