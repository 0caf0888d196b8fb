import os

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It must be
# switched on before triton is first imported (nothing imports it at collection time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Plausible, non-trivial running statistics and affine parameters on every BN layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if m.affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def digits_teacher():
    from fastdfd.models import create_model

    return randomize_bn_stats(create_model("digits_teacher", num_classes=10))
