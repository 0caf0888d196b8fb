"""The tap's activation epilogue, y = a(BN(x)), on every backend against float64 definitions.

Forward (y and the sums) and the one-pass backward (dx, and the BN affine's gradients a user training the
teacher would get), odd shapes, both layouts, every activation. Values are kept away from the kinks
(|z| >= 1e-2 from 0 and 6) so that the fp32 and float64 masks agree.
"""

import pytest
import torch
import torch.nn.functional as F

import fastdfd
from fastdfd.ops import moment_tap
from fastdfd.ops.dispatch import unavailable
from fastdfd.ops.moment.activation import ACTIVATIONS, Activation, as_activation
from fastdfd.ops.moment.decomposition import tap as traced_tap

from ..conftest import require_backend
from .test_fused_backends import reference64

ACTS = [Activation("identity"), Activation("relu"), Activation("relu6"), Activation("leaky_relu", 0.2),
        Activation("silu")]
SHAPES = [(2, 3, 5, 7), (6, 17, 4, 4), (4, 5), (3, 4, 9)]


def _torch64(name: str, slope: float, z: torch.Tensor) -> torch.Tensor:
    """The definitions, written out (not the module under test)."""
    if name == "identity":
        return z
    if name == "relu":
        return z.clamp_min(0)
    if name == "relu6":
        return z.clamp(0, 6)
    if name == "leaky_relu":
        return torch.where(z > 0, z, slope * z)
    return z / (1 + torch.exp(-z))


def _inputs(shape, groups, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[0] * groups, shape[1]
    mean, var = 0.5 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)
    w, b = 1 + 0.5 * torch.randn(c, generator=g), 2 * torch.randn(c, generator=g)  # z spans both kinks of relu6
    x = 0.3 + 3 * torch.randn((n,) + tuple(shape[1:]), generator=g, dtype=torch.float64)
    view = (1, c) + (1,) * (x.dim() - 3 + 1)
    z = (x - mean.double().view(view)) * torch.rsqrt(var.double().view(view) + 1e-3) * w.double().view(view) \
        + b.double().view(view)
    # nudge values off the kinks (in x, so the tap sees the nudged input)
    for kink in (0.0, 6.0):
        near = (z - kink).abs() < 1e-2
        x = torch.where(near, x + 0.05 * torch.sign(w.double().view(view)).expand_as(x), x)
    x = x.float()
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, mean, var, w, b


def _reference(x, mean, var, w, b, eps, groups, act):
    z, s1, s2 = reference64(x, mean, var, w, b, eps, groups)  # the BN output and sums, from the definitions
    return _torch64(act.name, act.negative_slope, z), s1, s2


def _backend(name: str) -> str:
    if name == "traced":
        return name
    return require_backend(name, unavailable("moment_tap", name, torch.empty(0)))


def _run(backend, x, mean, var, w, b, eps, groups, act):
    if backend == "traced":  # the form torch.compile traces (aten ops, one-pass backward), run eagerly
        return traced_tap(x, mean, var, w, b, eps, groups, True, act.name, act.negative_slope)
    with fastdfd.backend(backend):
        return moment_tap(x, mean, var, w, b, eps, groups, act)


CASES = [(s, cl) for s in SHAPES for cl in (False, True) if not cl or len(s) == 4]
# the Triton interpreter is slow: one case per layout (CPU tensors: on a card the triton cases skip)
TRITON_CASES = [((2, 3, 5, 7), False), ((6, 17, 4, 4), True)]
PARAMS = [(b, shape, cl) for b in ("torch", "cpp", "traced", "triton")
          for shape, cl in (TRITON_CASES if b == "triton" else CASES)]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("backend,shape,channels_last", PARAMS, ids=str)
def test_forward_and_gradients_match_float64(backend, act, shape, channels_last):
    backend = _backend(backend)
    groups = 2
    x, mean, var, w, b = _inputs(shape, groups, channels_last)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y, s1, s2 = _run(backend, x, mean, var, w, b, 1e-3, groups, act)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ry, r1, r2 = _reference(x64, mean, var, w64, b64, 1e-3, groups, act)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1.double(), r1, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(s2.double(), r2, rtol=1e-5, atol=1e-3)

    g = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=g)
    d1, d2 = torch.randn(s1.shape, generator=g) * 1e-2, torch.randn(s2.shape, generator=g) * 1e-3
    loss = (y * dy).sum() + (s1 * d1).sum() + (s2 * d2).sum()
    gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
    ref = (ry * dy.double()).sum() + (r1 * d1.double()).sum() + (r2 * d2.double()).sum()
    rx, rw, rb = torch.autograd.grad(ref, (x64, w64, b64))
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 1e-5 * max(scale, 1.0), (backend, act, shape)


@pytest.mark.parametrize("backend", ["cpp", "traced"])
def test_sums_only_backward_and_no_affine(backend):
    """Without weight and bias, and with only the sums used (dy absent), the epilogue changes nothing."""
    backend = _backend(backend)
    x, mean, var, _, _ = _inputs((3, 5, 4, 4), 1, False)
    x.requires_grad_(True)
    y, s1, s2 = _run(backend, x, mean, var, None, None, 1e-5, 1, Activation("relu"))
    ry, r1, r2 = _reference(x.detach(), mean, var, torch.ones(5), torch.zeros(5), 1e-5, 1, Activation("relu"))
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(s2.sum(), x)
    d = x.detach().double() - mean.double().view(1, -1, 1, 1)
    torch.testing.assert_close(gx.double(), 2 * d, rtol=1e-5, atol=1e-5)


def test_a_planted_error_in_the_derivative_is_caught(monkeypatch):
    """The gradient check can fail: a wrong relu6 derivative (1 above 6) is seen."""
    from fastdfd.ops.moment import activation as module

    real = module.activation_derivative

    def wrong(name, slope, z):
        return (z > 0).to(z.dtype) if name == "relu6" else real(name, slope, z)

    monkeypatch.setattr("fastdfd.ops.moment.decomposition.activation_derivative", wrong)
    with pytest.raises(AssertionError):
        test_forward_and_gradients_match_float64("traced", Activation("relu6"), (6, 17, 4, 4), False)


def test_activation_argument_is_checked():
    assert as_activation(None).is_identity and as_activation("relu") == Activation("relu")
    assert tuple(ACTIVATIONS) == ("identity", "relu", "relu6", "leaky_relu", "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        Activation("gelu")
    with pytest.raises(ValueError, match="takes no negative_slope"):
        Activation("relu", 0.1)
    with pytest.raises(ValueError, match="finite"):
        Activation("leaky_relu", float("nan"))
    with pytest.raises(TypeError, match="activation must be"):
        as_activation(F.relu)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown activation"):
        moment_tap(x, torch.zeros(3), torch.ones(3), None, None, 1e-5, 1, "swish")


@pytest.mark.parametrize("backend", ["torch", "cpp", "traced"])
@pytest.mark.parametrize("act", ACTS[1:], ids=lambda a: a.name)
def test_values_and_gradients_at_the_kinks_are_torchs(backend, act):
    """z exactly at 0 and 6 (fp64, unit BN so that z = x bit for bit): the tap's a(z) and dy a'(z) are torch's."""
    backend = _backend(backend)
    z = torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.0, -0.0], dtype=torch.float64).view(1, 1, 6)
    x = z.clone().requires_grad_(True)
    y, _, _ = _run(backend, x, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), None, None,
                   0.0, 1, act)
    (gx,) = torch.autograd.grad(y.sum(), x)
    ref = z.clone().requires_grad_(True)
    torch_act = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu,
                 "leaky_relu": lambda t: F.leaky_relu(t, act.negative_slope)}[act.name]
    ry = torch_act(ref)
    (rg,) = torch.autograd.grad(ry.sum(), ref)
    torch.testing.assert_close(y, ry, rtol=0, atol=0)
    torch.testing.assert_close(gx, rg, rtol=0, atol=0)


def test_the_python_custom_op_path_applies_the_epilogue():
    """The custom op (what torch.compile traces when a backend is kept opaque) takes act and slope to the cpp
    launchers and back through its autograd formula: the same numbers as the eager dispatcher op."""
    _backend("cpp")
    from fastdfd.ops.moment.custom_op import tap_forward

    x, mean, var, w, b = _inputs((2, 6, 5, 5), 2, False)
    act = Activation("leaky_relu", 0.3)
    outs = []
    for path in ("custom_op", "eager"):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if path == "custom_op":
            y, s1, s2 = tap_forward(xx, mean, var, ww, b, 1e-3, 2, True, "cpp", act.id, act.negative_slope)
        else:
            with fastdfd.backend("cpp"):
                y, s1, s2 = moment_tap(xx, mean, var, ww, b, 1e-3, 2, act)
        gx, gw = torch.autograd.grad(y.square().sum() + s2.sum(), (xx, ww))
        outs.append((y.detach(), gx, gw))
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_a_backend_without_the_epilogue_gets_the_activation_after_its_tap(monkeypatch):
    """The cuda kernels have no epilogue: its dispatch entry runs their tap, then the activation as a torch op.
    Checked on the CPU through the same registration with the cpp kernels standing in for them."""
    _backend("cpp")
    from fastdfd.ops.dispatch import _REGISTRY
    from fastdfd.ops.moment import dispatch as moment_dispatch
    from fastdfd.ops.moment.backends import cpp

    seen = []

    def eager_tap(x, mean, var, weight, bias, eps, groups, write_y, act=0, slope=0.0, residual=None):
        seen.append(act)
        return cpp.EAGER["tap"](x, mean, var, weight, bias, eps, groups, write_y, act, slope, residual)

    saved = {op: dict(_REGISTRY[op]) for op in ("moment_tap", "moment_sums", "moment_finalize")}
    try:
        moment_dispatch._register_fused("cpp", cpp.check, cpp.check, {**cpp.EAGER, "tap": eager_tap},
                                        fuses_activation=False)
        x, mean, var, w, b = _inputs((2, 4, 3, 3), 1, False)
        with fastdfd.backend("cpp"):
            y, _, _ = moment_tap(x, mean, var, w, b, 1e-3, 1, "silu")
    finally:
        for op, impls in saved.items():
            _REGISTRY[op].clear()
            _REGISTRY[op].update(impls)
    assert seen == [0]  # the kernels saw identity
    ry, _, _ = _reference(x, mean, var, w, b, 1e-3, 1, Activation("silu"))
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "traced", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", [Activation("relu6"), Activation("leaky_relu", 0.2), Activation("silu")],
                         ids=lambda a: a.name)
def test_half_precision_inputs_match_float64(backend, dtype, act):
    """fp16/bf16 x (the kernels' other instantiations): y and dx against float64 on the same rounded x, within
    the dtype's rounding of the outputs (the math runs in fp32)."""
    backend = _backend(backend)
    x, mean, var, w, b = _inputs((6, 17, 4, 4), 2, False)
    x = x.to(dtype).requires_grad_(True)
    y, s1, s2 = _run(backend, x, mean, var, w, b, 1e-3, 2, act)
    assert y.dtype == dtype
    x64 = x.detach().double().requires_grad_(True)
    ry, r1, r2 = _reference(x64, mean, var, w, b, 1e-3, 2, act)
    eps = torch.finfo(dtype).eps
    assert (y.double() - ry).abs().max() <= eps * ry.abs().max()
    torch.testing.assert_close(s1.double(), r1, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(s2.double(), r2, rtol=1e-4, atol=1e-3)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (gx,) = torch.autograd.grad((y * dy).sum() + 1e-3 * s2.sum(), x)
    (rg,) = torch.autograd.grad((ry * dy.double()).sum() + 1e-3 * r2.sum(), x64)
    assert (gx.double() - rg).abs().max() <= eps * rg.abs().max()
