"""CPU benchmarks (``make bench``): providers compared in one process on the same inputs.

Read the ratios, not the absolute times: this is a shared 2-core machine.
"""

import pytest
import torch
from torch import nn

from fastdfd import GeneratorEnsemble

from .providers import PROVIDERS

# (channels, spatial) of CIFAR ResNet-34 BN inputs; batch kept at 64 so a CPU run stays short
LAYERS = [(64, 32), (128, 16), (256, 8), (512, 4)]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("channels,size", LAYERS, ids=[f"c{c}s{s}" for c, s in LAYERS])
def test_bn_layer_forward_backward(benchmark, provider, channels, size):
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(64, channels, size, size, requires_grad=True)
    step = PROVIDERS[provider](bn)
    benchmark.group = f"bn-layer c{channels} s{size} b64"
    benchmark(step, x)


@pytest.mark.parametrize("provider", ["python-loop", "batched"])
def test_generator_ensemble_forward_backward(benchmark, provider):
    """The digits demo's generator, K = 64, B = 8: a loop over modules vs one batched pass."""
    ens = GeneratorEnsemble(64, 64, image_size=16, channels=1, latent_dim=64, widths=(32, 16), output_bn=False)
    z, y, _ = ens.draw(8, None, torch.Generator().manual_seed(0))
    if provider == "batched":
        def step():
            ens(z, y).square().mean().backward()
    else:
        gens = ens.unbind()

        def step():
            sum(g(z[k], y[k]).square().mean() for k, g in enumerate(gens)).backward()

    benchmark.group = "generator ensemble K64 B8 16px fwd+bwd"
    benchmark(step)
