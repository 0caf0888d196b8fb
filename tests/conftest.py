import os

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It must be
# switched on before triton is first imported (nothing imports it at collection time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_backend(name: str, why: str | None, what: str = "backend") -> str:
    """``name`` if it can run here (``why`` is None); else skip the test with the backend's own reason."""
    if why is None:
        return name
    pytest.skip(f"{name} {what} unavailable here: {why}")


def randomize_bn_stats(model: nn.Module, seed: int = 0, calibrate: torch.Tensor | None = None) -> nn.Module:
    """Plausible, non-trivial running statistics and affine parameters on every BN layer.

    With ``calibrate`` (an input batch), the statistics are first measured on it, as a
    trained teacher's would be, then perturbed: a deep network then stays well-conditioned
    (purely random statistics make a ResNet-34's activations explode, and any two fp32
    computations of it disagree in the third digit).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            if m.affine:
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
        if calibrate is not None:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
            model.train()(calibrate)
            for m in bns:
                m.momentum = 0.1
        for m in bns:
            n = m.num_features
            if calibrate is None:
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            else:
                m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(n, generator=g))
                m.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=g))
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def digits_teacher():
    from fastdfd.models import create_model

    return randomize_bn_stats(create_model("digits_teacher", num_classes=10))


@pytest.fixture
def teacher_file(tmp_path):
    """A digits teacher with plausible BN statistics, saved as a state_dict (what the CLI loads)."""
    from fastdfd.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(randomize_bn_stats(create_model("digits_teacher", num_classes=10)).state_dict(), path)
    return path
