"""bn_moment_loss validates running statistics once, not on every call.

The value checks (NaN/Inf, negative variance) read a result back from the device: on a GPU
each is a host-device synchronisation. They run the first time a statistics tensor is
seen and again only after it changed (an in-place write bumps its version counter, a
``.data =`` swap changes its storage); a repeated call on unchanged statistics reads nothing
back, which these tests prove by making every host read raise around the repeated call.
"""

import contextlib
import gc
import weakref

import pytest
import torch

import fastdfd
from fastdfd.ops import PackedLayout, bn_moment_loss, check_running_stats
from fastdfd.ops.dispatch import resolve, unavailable
from fastdfd.ops.moment import api

from ..conftest import require_backend


def _stats(c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)


def _x(c=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.3 + torch.randn(6, c, 3, 3, generator=g)).requires_grad_(True)


def _refuse(*_args, **_kwargs):
    raise AssertionError("host read of a tensor (a device synchronisation on a GPU)")


HOST_READS = ["__bool__", "item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "__array__",
              "__len__", "__iter__"]


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every way of reading a tensor's values back to Python raises, as do the value checks and a rebuild."""
    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, _refuse)
        m.setattr(torch, "isfinite", _refuse)  # the validation itself must not even be computed again
        # nor a layout built from host lists (a blocking host->device copy waits for the stream)
        m.setattr(PackedLayout, "build", staticmethod(_refuse))
        m.setattr(torch, "tensor", _refuse)
        yield


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    return require_backend(request.param, unavailable("moment_sums", request.param, torch.empty(0)))


# ----------------------------------------------------------------- first call validates
@pytest.mark.parametrize("bad, match", [
    (lambda m, v: (m.fill_(float("nan")), v), "NaN or Inf"),
    (lambda m, v: (m, v.index_fill_(0, torch.tensor([2]), float("inf"))), "NaN or Inf"),
    (lambda m, v: (m, v.index_fill_(0, torch.tensor([1]), -0.25)), "negative"),
], ids=["nan-mean", "inf-var", "negative-var"])
def test_first_call_validates(bad, match):
    rm, rv = bad(*_stats())
    with pytest.raises(ValueError, match=match):
        bn_moment_loss(_x(), rm, rv)
    with pytest.raises(ValueError, match=match):  # a failed check is not remembered
        check_running_stats(rm, rv, "layer1")


@pytest.mark.parametrize("change, match", [
    (lambda m, v: m.fill_(float("nan")), "NaN or Inf"),
    (lambda m, v: v.mul_(-1.0), "negative"),
    (lambda m, v: v.copy_(torch.full_like(v, float("inf"))), "NaN or Inf"),
    (lambda m, v: v.detach()[3:].fill_(-1.0), "negative"),  # through a view: same version counter
    (lambda m, v: setattr(v, "data", torch.full_like(v, -1.0)), "negative"),  # a storage swap
], ids=["fill-mean", "mul-var", "copy-var", "view-write", "data-swap"])
def test_a_change_after_validation_is_caught(change, match):
    rm, rv = _stats()
    x = _x()
    bn_moment_loss(x, rm, rv)  # validated and remembered
    bn_moment_loss(x, rm, rv)
    with torch.no_grad():
        change(rm, rv)
    with pytest.raises(ValueError, match=match):
        bn_moment_loss(x, rm, rv)
    with pytest.raises(ValueError, match=match):
        check_running_stats(rm, rv)


def test_a_changed_value_gives_the_new_loss():
    """Remembering that statistics were valid never freezes their values: an update is used."""
    rm, rv = _stats()
    x = _x()
    before = bn_moment_loss(x, rm, rv)
    with torch.no_grad():
        rm.add_(0.5)
        rv.mul_(2.0)
    after = bn_moment_loss(x, rm, rv)
    fresh = bn_moment_loss(x, rm.clone(), rv.clone())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)


def test_error_messages_name_the_layer():
    rm, rv = _stats()
    rv[0] = -1.0
    with pytest.raises(ValueError, match="running_var of features.3 has negative entries"):
        check_running_stats(rm, rv, "features.3")
    with pytest.raises(ValueError, match="no running statistics"):
        check_running_stats(None, rv, "features.3")
    with pytest.raises(ValueError, match="1-D of the same length"):
        check_running_stats(rm[:3], rv)


# ---------------------------------------------------------- repeated calls read nothing
@pytest.mark.parametrize("kind", fastdfd.KINDS)
def test_repeated_call_reads_nothing_back(kind, backend, monkeypatch):
    rm, rv = _stats()
    x = _x()
    with fastdfd.backend(backend):
        assert resolve("moment_sums", x)[0] == backend
        want = bn_moment_loss(x, rm, rv, kind=kind, groups=2)  # the first call validates
        (want_grad,) = torch.autograd.grad(want, x)
        with no_host_reads(monkeypatch):
            for reduction in ("sum", "none"):
                got = bn_moment_loss(x, rm, rv, kind=kind, groups=2, reduction=reduction)
            check_running_stats(rm, rv, "layer")
            (grad,) = torch.autograd.grad(got.sum(), x)  # the backward reads nothing back either
    torch.testing.assert_close(got.sum(), want)
    torch.testing.assert_close(grad, want_grad)


def test_the_guard_really_refuses_host_reads(monkeypatch):
    """The patching above would catch the old per-call checks (each a bool() of a device result)."""
    rm, rv = _stats()
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="host read"):
        bool(rv.sum() > 0)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", _refuse)
        with pytest.raises(AssertionError, match="host read"):
            check_running_stats(torch.zeros(3), torch.ones(3))  # fresh tensors: validated, so read


def test_bn_module_statistics_and_matcher_style_names(monkeypatch):
    bn = torch.nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.copy_(_stats()[0])
        bn.running_var.copy_(_stats()[1])
    x = _x()
    bn_moment_loss(x, bn.running_mean, bn.running_var)
    with no_host_reads(monkeypatch):
        check_running_stats(bn.running_mean, bn.running_var, "bn")  # as the matcher calls it at attach
        bn_moment_loss(x, bn.running_mean, bn.running_var)


def test_validation_memo_does_not_keep_tensors_alive():
    rm, rv = _stats()
    check_running_stats(rm, rv)
    bn_moment_loss(_x(), rm, rv)
    refs = [weakref.ref(rm), weakref.ref(rv)]
    assert rm in api._VALID_MEANS and rv in api._VALID_VARS
    del rm, rv
    gc.collect()
    assert all(r() is None for r in refs)


def test_inference_tensors_are_checked_every_time():
    """Inference-mode tensors have no version counter: never remembered, always validated."""
    with torch.inference_mode():
        rm, rv = _stats()
    check_running_stats(rm, rv)
    assert rv not in api._VALID_VARS
    with torch.inference_mode():
        rv[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_running_stats(rm, rv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA's sync debug mode)")
def test_repeated_call_does_not_synchronise_on_cuda():
    """On a GPU, CUDA's own sync detector: a repeated forward and backward must not block the host."""
    rm, rv = (t.cuda() for t in _stats())
    x = _x().detach().cuda().requires_grad_(True)
    loss = bn_moment_loss(x, rm, rv)
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = bn_moment_loss(x, rm, rv)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
