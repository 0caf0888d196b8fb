import os

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It must be
# switched on before triton is first imported (nothing imports it at collection time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _required_backends() -> frozenset[str]:
    """FASTDFD_REQUIRE_BACKENDS=cpp,triton: backends that must run here (CI sets it; see require_backend)."""
    from fastdfd.ops.dispatch import BACKENDS

    names = {n.strip().lower() for n in os.environ.get("FASTDFD_REQUIRE_BACKENDS", "").split(",") if n.strip()}
    unknown = names - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"FASTDFD_REQUIRE_BACKENDS names unknown backends {sorted(unknown)}; "
                                f"expected a comma-separated subset of {BACKENDS}")
    return frozenset(names)


REQUIRED_BACKENDS = _required_backends()


def require_backend(name: str, why: str | None, what: str = "backend") -> str:
    """``name`` if it can run here (``why`` is None); else skip the test, or fail it when
    FASTDFD_REQUIRE_BACKENDS names the backend, with the backend's own reason either way.

    A missing optional backend is no reason to fail on a user's machine, but on CI (which
    requires cpp and triton) a build that stopped working must turn the run red, not skip.
    """
    if why is None:
        return name
    message = f"{name} {what} unavailable here: {why}"
    if name in REQUIRED_BACKENDS:
        pytest.fail(f"{message} (FASTDFD_REQUIRE_BACKENDS requires it)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_triton() -> None:
    """For a test (or, called at import, a test module) that needs the triton package itself."""
    from fastdfd.ops.triton_runtime import triton_missing

    require_backend("triton", triton_missing())


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


def pytest_configure(config):
    # registered here rather than in pyproject.toml beside triton_heavy: the Makefile reinstalls on any pyproject change
    config.addinivalue_line("markers", "scale_scripts: the ImageNet-scale benchmark scripts end to end on the "
                                       "pretrained Lite0, run by make test-scale")
