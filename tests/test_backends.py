"""Backend dispatch: context manager, environment variable, fallback."""

import pytest
import torch

import fastdfd
from fastdfd.ops import dispatch as backends


def test_default_cpu_backend_is_available():
    name, _ = backends.resolve("moment_sums", torch.zeros(1))
    assert name in backends.available("moment_sums", "cpu")


def test_context_manager_selects_and_restores(monkeypatch):
    monkeypatch.delenv("FASTDFD_BACKEND", raising=False)
    assert backends.requested_backend() is None
    with fastdfd.backend("torch"):
        assert backends.requested_backend() == "torch"
        assert backends.resolve("moment_tap", torch.zeros(1))[0] == "torch"
        with fastdfd.backend(None):
            assert backends.requested_backend() is None
    assert backends.requested_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTDFD_BACKEND", "torch")
    assert backends.requested_backend() == "torch"
    monkeypatch.setenv("FASTDFD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTDFD_BACKEND"):
        backends.requested_backend()


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        with fastdfd.backend("tpu"):
            pass


def test_unavailable_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "demo_op", {})
    backends.register("demo_op", "torch")(lambda: "torch")
    backends.register("demo_op", "cpp", check=lambda d: "not built")(lambda: "cpp")
    backends._WARNED.discard(("cpp", "not built"))
    with fastdfd.backend("cpp"):
        with pytest.warns(RuntimeWarning, match="not built"):
            assert backends.resolve("demo_op", torch.zeros(1))[1]() == "torch"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert backends.resolve("demo_op", torch.zeros(1))[0] == "torch"  # warned once only
