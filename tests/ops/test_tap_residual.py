"""The tap's residual epilogue, y = a(BN(x) + r), on every backend against float64 definitions.

Forward (y and the sums) and the one-pass backward (dx, dr, and the BN affine's gradients), odd shapes, both
layouts, every activation, a residual with other strides than x. Values of u = BN(x) + r are kept away from
the kinks (|u| >= 1e-2 from 0 and 6) so that the fp32 and float64 masks agree.
"""

import pytest
import torch

import fastdfd
from fastdfd.ops import moment_tap
from fastdfd.ops.dispatch import unavailable
from fastdfd.ops.moment.activation import Activation
from fastdfd.ops.moment.decomposition import tap as traced_tap

from ..conftest import require_backend
from .test_fused_backends import reference64
from .test_tap_activation import ACTS, _inputs, _torch64

SHAPES = [(2, 3, 5, 7), (6, 17, 4, 4), (4, 5), (3, 4, 9)]


def _residual(x, mean, var, w, b, eps, seed=3, strides_of_x=True):
    """r with u = BN(x) + r off the kinks (the nudge is in r, so every backend sees the same r)."""
    g = torch.Generator().manual_seed(seed)
    r = 2 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    z, _, _ = reference64(x.detach(), mean, var, w, b, eps, 1)
    for kink in (0.0, 6.0):
        r = torch.where(((z + r) - kink).abs() < 1e-2, r + 0.05, r)
    r = r.float()
    if strides_of_x:
        return torch.empty_like(x.detach()).copy_(r)  # x's layout (channels_last too)
    return r.contiguous()


def _reference(x, mean, var, w, b, eps, groups, act, r):
    z, s1, s2 = reference64(x, mean, var, w, b, eps, groups)
    return _torch64(act.name, act.negative_slope, z + r), s1, s2


def _backend(name: str) -> str:
    if name == "traced":
        return name
    return require_backend(name, unavailable("moment_tap", name, torch.empty(0)))


def _run(backend, x, mean, var, w, b, eps, groups, act, r):
    if backend == "traced":
        return traced_tap(x, mean, var, w, b, eps, groups, True, act.name, act.negative_slope, r)
    with fastdfd.backend(backend):
        return moment_tap(x, mean, var, w, b, eps, groups, act, residual=r)


CASES = [(s, cl) for s in SHAPES for cl in (False, True) if not cl or len(s) == 4]
TRITON_CASES = [((2, 3, 5, 7), False), ((6, 17, 4, 4), True)]  # the interpreter is slow: one case per layout
PARAMS = [(b, shape, cl) for b in ("torch", "cpp", "traced", "triton")
          for shape, cl in (TRITON_CASES if b == "triton" else CASES)]


def _check_all(backend, act, x, mean, var, w, b, r, groups, eps=1e-3):
    x, w, b, r = (t.detach().clone().requires_grad_(True) for t in (x, w, b, r))
    y, s1, s2 = _run(backend, x, mean, var, w, b, eps, groups, act, r)
    x64, w64, b64, r64 = (t.detach().double().requires_grad_(True) for t in (x, w, b, r))
    ry, r1, r2 = _reference(x64, mean, var, w64, b64, eps, groups, act, r64)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1.double(), r1, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(s2.double(), r2, rtol=1e-5, atol=1e-3)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=g)
    d1, d2 = torch.randn(s1.shape, generator=g) * 1e-2, torch.randn(s2.shape, generator=g) * 1e-3
    got = torch.autograd.grad((y * dy).sum() + (s1 * d1).sum() + (s2 * d2).sum(), (x, w, b, r))
    ref = (ry * dy.double()).sum() + (r1 * d1.double()).sum() + (r2 * d2.double()).sum()
    want = torch.autograd.grad(ref, (x64, w64, b64, r64))
    for name, a, e in zip("xwbr", got, want):
        assert a.shape == e.shape, name
        scale = e.abs().max().item()
        assert (a.double() - e).abs().max().item() <= 1e-5 * max(scale, 1.0), (backend, act, name)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("backend,shape,channels_last", PARAMS, ids=str)
def test_forward_and_gradients_match_float64(backend, act, shape, channels_last):
    backend = _backend(backend)
    x, mean, var, w, b = _inputs(shape, 2, channels_last)
    r = _residual(x, mean, var, w, b, 1e-3)
    _check_all(backend, act, x, mean, var, w, b, r, 2)


@pytest.mark.parametrize("backend", ["cpp", "traced"])
def test_a_residual_in_another_layout_than_x(backend):
    """x channels_last, r contiguous (and the reverse): the kernels read r in x's layout (a copy when it is not)."""
    backend = _backend(backend)
    x, mean, var, w, b = _inputs((6, 17, 4, 4), 1, True)
    r = _residual(x, mean, var, w, b, 1e-3, strides_of_x=False)
    assert r.is_contiguous() and not x.is_contiguous()
    _check_all(backend, Activation("relu"), x, mean, var, w, b, r, 1)
    _check_all(backend, Activation("relu"), x.contiguous(), mean, var, w, b,
               r.contiguous(memory_format=torch.channels_last), 1)


@pytest.mark.parametrize("backend", ["cpp", "traced"])
@pytest.mark.parametrize("act", [Activation("relu"), Activation("identity")], ids=lambda a: a.name)
def test_only_one_side_needs_a_gradient(backend, act):
    """r without requires_grad (a block input that is data), or x without it: the other still gets its gradient
    (with the identity, dr is dy itself, and r is not kept for the backward)."""
    backend = _backend(backend)
    x, mean, var, w, b = _inputs((2, 6, 5, 5), 1, False)
    r = _residual(x, mean, var, w, b, 1e-3)
    for needs in ("x", "r"):
        xx = x.clone().requires_grad_(needs == "x")
        rr = r.clone().requires_grad_(needs == "r")
        y, _, _ = _run(backend, xx, mean, var, w, b, 1e-3, 1, act, rr)
        (g,) = torch.autograd.grad(y.square().sum(), xx if needs == "x" else rr)
        x64, r64 = (t.detach().double().requires_grad_(True) for t in (xx, rr))
        ry, _, _ = _reference(x64, mean, var, w, b, 1e-3, 1, act, r64)
        (e,) = torch.autograd.grad(ry.square().sum(), x64 if needs == "x" else r64)
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpp", "traced"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs_match_float64(backend, dtype):
    """fp16/bf16 x and r: y, dx and dr against float64 on the same rounded inputs, within the dtype's rounding
    of the outputs (the math runs in fp32)."""
    backend = _backend(backend)
    act = Activation("silu")
    x, mean, var, w, b = _inputs((6, 17, 4, 4), 2, False)
    r = _residual(x, mean, var, w, b, 1e-3)
    x, r = x.to(dtype).requires_grad_(True), r.to(dtype).requires_grad_(True)
    y, _, s2 = _run(backend, x, mean, var, w, b, 1e-3, 2, act, r)
    assert y.dtype == dtype
    x64, r64 = (t.detach().double().requires_grad_(True) for t in (x, r))
    ry, _, r2 = _reference(x64, mean, var, w, b, 1e-3, 2, act, r64)
    eps = torch.finfo(dtype).eps
    assert (y.double() - ry).abs().max() <= 2 * eps * ry.abs().max()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    gx, gr = torch.autograd.grad((y * dy).sum() + 1e-3 * s2.sum(), (x, r))
    ex, er = torch.autograd.grad((ry * dy.double()).sum() + 1e-3 * r2.sum(), (x64, r64))
    assert (gx.double() - ex).abs().max() <= 2 * eps * ex.abs().max()
    assert (gr.double() - er).abs().max() <= 2 * eps * er.abs().max()


def test_the_cpp_kernels_read_the_residual_in_their_pass(monkeypatch):
    """Eager cpp with a residual is one call of the library op with the residual (no add after the tap)."""
    _backend("cpp")
    from fastdfd.ops.moment.backends import cpp

    seen = []
    real = cpp.EAGER["tap"]

    def spy(*args):
        seen.append(args[-1] is not None)
        return real(*args)

    monkeypatch.setitem(cpp.EAGER, "tap", spy)
    x, mean, var, w, b = _inputs((2, 4, 3, 3), 1, False)
    r = _residual(x, mean, var, w, b, 1e-3)
    with fastdfd.backend("cpp"):
        y, _, _ = moment_tap(x, mean, var, w, b, 1e-3, 1, "relu", residual=r)
    assert seen == [True]
    ry, _, _ = _reference(x, mean, var, w, b, 1e-3, 1, Activation("relu"), r)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)


def test_the_library_op_refuses_a_residual_of_another_dtype():
    _backend("cpp")
    from fastdfd.ops import extensions

    extensions.load("cpu")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.fastdfd_cpu.tap(x, torch.zeros(3), torch.ones(3), None, None, 1e-5, 1, True, 1, 0.0,
                                  x.double())
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.fastdfd_cpu.tap(x, torch.zeros(3), torch.ones(3), None, None, 1e-5, 1, True, 1, 0.0, x[:, :, :2])


def test_residual_argument_is_checked():
    x = torch.randn(2, 3, 4, 4)
    m, v = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="residual must be"):
        moment_tap(x, m, v, None, None, 1e-5, 1, "relu", residual=1.0)
    with pytest.raises(ValueError, match="x's shape, dtype and device"):
        moment_tap(x, m, v, None, None, 1e-5, 1, "relu", residual=torch.randn(1, 3, 4, 4))  # no broadcasting
    with pytest.raises(ValueError, match="x's shape, dtype and device"):
        moment_tap(x, m, v, None, None, 1e-5, 1, "relu", residual=x.double())  # no type promotion


def test_a_planted_error_in_the_residual_gradient_is_caught(monkeypatch):
    """The check can fail: a traced backward that drops a'(u) from dr (dr = dy) is seen."""
    from fastdfd.ops.moment import decomposition as dec

    real = dec._tap_backward_math

    def wrong(*args, **kwargs):
        dx, dz = real(*args, **kwargs)
        dy = args[1]
        return dx, None if dz is None else dy.to(dz.dtype)

    monkeypatch.setattr(dec, "_tap_backward_math", wrong)
    x, mean, var, w, b = _inputs((2, 6, 5, 5), 1, False)
    r = _residual(x, mean, var, w, b, 1e-3)
    with pytest.raises(AssertionError):
        _check_all("traced", Activation("relu"), x, mean, var, w, b, r, 1)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("act", [Activation("relu"), Activation("identity"), Activation("leaky_relu", 0.2)],
                         ids=lambda a: a.name)
def test_the_python_custom_op_takes_the_residual(impl, act):
    """The custom op (what torch.compile runs when a backend is kept opaque, and the triton backend's only way
    in) takes the residual to the launchers and gives dr from its backward (dy itself with the identity):
    against float64, x and r in different layouts."""
    _backend(impl)
    from fastdfd.ops.moment.custom_op import tap_forward

    x, mean, var, w, b = _inputs((6, 17, 4, 4), 2, True)
    r = _residual(x, mean, var, w, b, 1e-3, strides_of_x=False)
    x, w, r = (t.detach().clone().requires_grad_(True) for t in (x, w, r))
    y, s1, s2 = tap_forward(x, mean, var, w, b, 1e-3, 2, True, impl, act.id, act.negative_slope, r)
    x64, w64, r64 = (t.detach().double().requires_grad_(True) for t in (x, w, r))
    ry, _, r2 = _reference(x64, mean, var, w64, b, 1e-3, 2, act, r64)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((y * dy).sum() + 1e-3 * s2.sum(), (x, w, r))
    want = torch.autograd.grad((ry * dy.double()).sum() + 1e-3 * r2.sum(), (x64, w64, r64))
    for name, a, e in zip("xwr", got, want):
        assert (a.double() - e).abs().max().item() <= 1e-5 * max(e.abs().max().item(), 1.0), name


def test_a_backend_without_the_residual_gets_the_add_after_its_tap(monkeypatch):
    """The cuda kernels take no residual: its dispatch entry runs their tap, then the add and the activation.
    Checked on the CPU through the same registration with the cpp kernels standing in for them."""
    _backend("cpp")
    from fastdfd.ops.dispatch import _REGISTRY
    from fastdfd.ops.moment import dispatch as moment_dispatch
    from fastdfd.ops.moment.backends import cpp

    seen = []

    def eager_tap(x, mean, var, weight, bias, eps, groups, write_y, act=0, slope=0.0, residual=None):
        seen.append((act, residual is None))
        return cpp.EAGER["tap"](x, mean, var, weight, bias, eps, groups, write_y, act, slope, residual)

    saved = {op: dict(_REGISTRY[op]) for op in ("moment_tap", "moment_sums", "moment_finalize")}
    try:
        moment_dispatch._register_fused("cpp", cpp.check, cpp.check, {**cpp.EAGER, "tap": eager_tap},
                                        fuses_activation=False, fuses_residual=False)
        x, mean, var, w, b = _inputs((2, 4, 3, 3), 1, False)
        r = _residual(x, mean, var, w, b, 1e-3)
        with fastdfd.backend("cpp"):
            y, _, _ = moment_tap(x, mean, var, w, b, 1e-3, 1, "silu", residual=r)
    finally:
        for op, impls in saved.items():
            _REGISTRY[op].clear()
            _REGISTRY[op].update(impls)
    assert seen == [(0, True)]  # the kernels saw identity and no residual
    ry, _, _ = _reference(x, mean, var, w, b, 1e-3, 1, Activation("silu"), r)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)


def test_the_cuda_launchers_refuse_a_residual():
    from fastdfd.ops.moment.activation import refuse_epilogue

    with pytest.raises(ValueError, match="no residual"):
        refuse_epilogue("cuda", 0, torch.zeros(1))
