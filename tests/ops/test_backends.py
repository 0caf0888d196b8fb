"""Backend dispatch: the order of preference, the context manager, the environment variable, fallback."""

import types
import warnings

import pytest
import torch

import fastdfd
from fastdfd.ops import dispatch

from ..conftest import require_backend


def _device(kind: str):
    """An input on a device of this type; dispatch reads only x.device.type (no CUDA needed here)."""
    return types.SimpleNamespace(device=torch.device(kind))


@pytest.fixture
def demo_op(monkeypatch):
    """A fresh op ``demo_op`` with every backend registered; ``down`` holds the ones to report unavailable."""
    monkeypatch.setitem(dispatch._REGISTRY, "demo_op", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.delenv("FASTDFD_BACKEND", raising=False)
    down: dict[str, str] = {}
    for name in dispatch.BACKENDS:
        dispatch.register("demo_op", name, check=lambda x, name=name: down.get(name))(lambda name=name: name)
    return down


@pytest.mark.parametrize("device, order", [("cuda", ["triton", "cuda", "torch"]), ("cpu", ["cpp", "torch"]),
                                           ("meta", ["torch"])])
def test_the_fastest_available_backend_wins_in_order_of_preference(demo_op, device, order):
    x = _device(device)
    for i, expected in enumerate(order):
        name, fn = dispatch.resolve("demo_op", x)
        assert (name, fn()) == (expected, expected), f"with {sorted(demo_op)} down"
        demo_op[expected] = "down for the test" if i < len(order) - 1 else None
    # a backend outside the device's order is never chosen automatically, even when it could run
    assert dispatch.resolve("demo_op", _device("cpu"))[0] in ("cpp", "torch")
    demo_op.clear()
    assert dispatch.resolve("demo_op", _device("cpu"))[0] == "cpp"


def test_the_moment_and_generator_ops_register_every_backend():
    assert set(dispatch._REGISTRY["moment_sums"]) == {"torch", "triton", "cpp", "cuda"}
    assert set(dispatch._REGISTRY["moment_tap"]) == {"torch", "triton", "cpp", "cuda"}
    assert set(dispatch._REGISTRY["moment_finalize"]) == {"torch", "triton", "cpp", "cuda"}
    assert set(dispatch._REGISTRY["ensemble_forward"]) == {"torch", "triton", "cpp"}
    assert dispatch.unavailable("moment_tap", "nonesuch", torch.zeros(1)) == \
        "no moment_tap implementation registered for 'nonesuch'"


def test_the_cpu_default_is_cpp_when_it_builds(monkeypatch):
    monkeypatch.delenv("FASTDFD_BACKEND", raising=False)
    x = torch.zeros(2, 3)
    require_backend("cpp", dispatch.unavailable("moment_sums", "cpp", x))
    for op in ("moment_sums", "moment_tap", "moment_finalize"):
        assert dispatch.resolve(op, x)[0] == "cpp", op
        assert dispatch.resolve(op, x.double())[0] == "cpp", op  # the cpp kernels take fp64 too
    # the triton interpreter can serve CPU tensors, but is not in the CPU's order: never chosen automatically
    assert dispatch.resolve("moment_tap", x.half())[0] == "cpp"
    assert {"torch", "cpp"} <= set(dispatch.available("moment_tap", "cpu"))


def test_context_manager_selects_and_restores(demo_op):
    x = _device("cpu")
    assert dispatch.requested_backend() is None
    with fastdfd.backend("torch"):
        assert dispatch.requested_backend() == "torch"
        assert dispatch.resolve("demo_op", x)[0] == "torch"
        with fastdfd.backend(None):
            assert dispatch.requested_backend() is None
            assert dispatch.resolve("demo_op", x)[0] == "cpp"
        with fastdfd.backend("triton"):  # not in the CPU's order, but asked for and able: it runs
            assert dispatch.resolve("demo_op", x)[0] == "triton"
        assert dispatch.resolve("demo_op", x)[0] == "torch"
    assert dispatch.requested_backend() is None
    assert dispatch.resolve("demo_op", x)[0] == "cpp"


def test_environment_variable_overrides_the_default_and_the_context_manager_overrides_it(demo_op, monkeypatch):
    x = _device("cpu")
    monkeypatch.setenv("FASTDFD_BACKEND", " Torch ")
    assert dispatch.requested_backend() == "torch"
    assert dispatch.resolve("demo_op", x)[0] == "torch"
    with fastdfd.backend("triton"):
        assert dispatch.resolve("demo_op", x)[0] == "triton"
    assert dispatch.resolve("demo_op", x)[0] == "torch"
    # on a real op too: the environment wins over the fastest backend
    assert dispatch.resolve("moment_tap", torch.zeros(2, 3))[0] == "torch"
    monkeypatch.setenv("FASTDFD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"FASTDFD_BACKEND: unknown backend 'nonsense'; expected one of "
                                         r"\('torch', 'triton', 'cuda', 'cpp'\)"):
        dispatch.requested_backend()


def test_unknown_backend_names_are_refused_with_the_known_ones_listed():
    known = r"expected one of \('torch', 'triton', 'cuda', 'cpp'\)"
    with pytest.raises(ValueError, match=rf"fastdfd.backend: unknown backend 'tpu'; {known}"):
        with fastdfd.backend("tpu"):
            pass
    assert dispatch._OVERRIDE == [None]  # a refused name leaves no override behind
    with pytest.raises(ValueError, match=rf"unknown backend 'tpu'; {known}"):
        dispatch.register("demo_op", "tpu")
    with pytest.raises(KeyError, match="no implementation registered for op 'no_such_op'"):
        dispatch.resolve("no_such_op", torch.zeros(1))


def test_unavailable_backend_falls_back_in_order_with_one_warning(demo_op):
    demo_op["cuda"] = "not built"
    demo_op["triton"] = "not installed"
    with fastdfd.backend("cuda"):
        with pytest.warns(RuntimeWarning, match=r"backend 'cuda' unavailable \(not built\); falling back"):
            assert dispatch.resolve("demo_op", _device("cuda"))[1]() == "torch"  # triton is down too
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dispatch.resolve("demo_op", _device("cuda"))[0] == "torch"  # warned once only
        demo_op["triton"] = None
        assert dispatch.resolve("demo_op", _device("cuda"))[0] == "triton"  # the next in the device's order
