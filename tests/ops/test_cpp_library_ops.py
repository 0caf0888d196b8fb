"""The cpp backend's dispatcher ops (torch.ops.fastdfd_cpu.*, csrc/moment/moment_library_cpu.cpp), the eager
path of the cpp tap and finalize: the Python custom ops' numbers (forward and every gradient, the BN affine's
included), gradcheck in float64, every layout the layout rule admits or copies, and that the moment ops
really take this path eager and the custom ops under torch.compile."""

import pytest
import torch

import fastdfd
from fastdfd.ops import PackedLayout, moment_finalize, moment_sums, moment_tap
from fastdfd.ops.dispatch import unavailable
from fastdfd.ops.moment.custom_op import finalize_forward, tap_forward

from ..conftest import require_backend


@pytest.fixture(autouse=True)
def cpp():
    require_backend("cpp", unavailable("moment_tap", "cpp", torch.empty(0)))
    from fastdfd.ops import extensions

    extensions.load("cpu")
    return torch.ops.fastdfd_cpu


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"contiguous": x}
    if x.dim() == 4:
        out["channels_last"] = x.to(memory_format=torch.channels_last)
        out["slice"] = torch.cat([x, x], 1)[:, : x.shape[1]]  # not dense: copied by the layout rule
        out["permuted_spatial"] = x.transpose(2, 3).contiguous().transpose(2, 3)  # spatial dims do not flatten
    return out


@pytest.mark.parametrize("shape", [(4, 5, 7, 3), (6, 3), (2, 4, 9), (2, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_tap_matches_the_custom_op(cpp, shape, dtype, affine):
    g = torch.Generator().manual_seed(1)
    base = (0.3 + torch.randn(shape, generator=g)).to(dtype)
    c, groups = shape[1], 2
    mean, var = 0.5 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)
    w0 = 1 + 0.2 * torch.randn(c, generator=g) if affine else None
    b0 = 0.1 * torch.randn(c, generator=g) if affine else None
    gy = torch.randn(shape, generator=g).to(dtype)
    g1, g2 = torch.randn(groups, c, generator=g), torch.randn(groups, c, generator=g)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    for name, xl in _layouts(base).items():
        results = []
        for op in ("library", "custom"):
            x = xl.detach().clone() if name != "slice" else xl.detach()
            x.requires_grad_(True)
            w = None if w0 is None else w0.clone().requires_grad_(True)
            b = None if b0 is None else b0.clone().requires_grad_(True)
            if op == "library":
                y, s1, s2 = cpp.tap(x, mean, var, w, b, 1e-3, groups, True)
            else:
                y, s1, s2 = tap_forward(x, mean, var, w, b, 1e-3, groups, True, "cpp")
            loss = (y.float() * gy.float()).sum() + (s1 * g1).sum() + (s2 * g2).sum()
            grads = torch.autograd.grad(loss, [t for t in (x, w, b) if t is not None])
            results.append((y, s1, s2, *grads))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


def test_sums_only_and_no_upstream_gradient(cpp):
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    shift = torch.randn(3)
    y, s1, s2 = cpp.tap(x, shift, shift, None, None, 0.0, 2, False)
    assert y.numel() == 0 and s1.shape == (2, 3)
    (dx,) = torch.autograd.grad(s2.sum(), x)  # only S2 used: dS1 is zero, dy absent
    d = (x - shift.view(1, 3, 1, 1)).detach()
    torch.testing.assert_close(dx, 2 * d)


def test_gradcheck_float64(cpp):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(3, generator=g, dtype=torch.float64), 0.5 + torch.rand(3, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: cpp.tap(x, mean, var, w, b, 1e-3, 2, True), (x, w, b))
    layout = PackedLayout.build([mean[:2], mean[2:]], [var[:2], var[2:]], [1e-3, 1e-3], dtype=torch.float64)
    count = torch.full((3,), 12.0, dtype=torch.float64)
    s1 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s2 = (20 + torch.rand(2, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    for kind, kid in (("kl", 0), ("kl_reverse", 1), ("l2", 2), ("mse", 3)):
        def f(s1, s2, kid=kid):
            return cpp.finalize(s1, s2, count, layout.running_var, layout.eps, layout.offsets, kid)

        assert torch.autograd.gradcheck(f, (s1, s2)), kind
        torch.testing.assert_close(
            f(s1, s2), finalize_forward(s1, s2, count, layout.running_var, layout.eps, layout.offsets, kind, "cpp"))


def test_bad_input_is_refused(cpp):
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="groups"):
        cpp.tap(x, torch.zeros(3), torch.ones(3), None, None, 1e-5, 3, True)
    with pytest.raises(RuntimeError, match="mean must be"):
        cpp.tap(x, torch.zeros(4), torch.ones(3), None, None, 1e-5, 1, True)
    with pytest.raises(RuntimeError, match="gradient of shape"):
        cpp.tap_backward(x, torch.randn(4, 3, 5, 4), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(3),
                         torch.ones(3), None, None, 1e-5, 1)
    with pytest.raises(RuntimeError, match="unknown activation id 9"):
        cpp.tap(x, torch.zeros(3), torch.ones(3), None, None, 1e-5, 1, True, 9)


def test_the_moment_ops_take_the_library_path_eager_and_the_custom_ops_compiled(monkeypatch):
    """Eager, the cpp entries call torch.ops.fastdfd_cpu (never the Python custom op); traced by dynamo with the
    tap opted out of aten tracing, the custom ops (which have fake kernels) and never the library ops."""
    from fastdfd.ops.moment import decomposition, dispatch

    calls: list[str] = []
    real_tap, real_fin = dispatch.tap_forward, dispatch.finalize_forward

    def spy(name, fn):
        def wrapper(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(dispatch, "tap_forward", spy("custom_tap", real_tap))
    monkeypatch.setattr(dispatch, "finalize_forward", spy("custom_finalize", real_fin))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    layout = PackedLayout.build([rm], [rv], [1e-5])
    with fastdfd.backend("cpp"):
        y, s1, s2 = moment_tap(x, rm, rv, None, None, 1e-5, 1)
        moment_sums(x, rm, 1)
        loss = moment_finalize(s1, s2, torch.full((3,), 100.0), layout, "kl")
        torch.autograd.grad(loss.sum() + y.sum(), x)
    assert calls == []

    previous = decomposition.set_inductor_decomposition(set())
    torch._dynamo.reset()
    try:
        def f(x):
            with fastdfd.backend("cpp"):
                y, s1, s2 = moment_tap(x, rm, rv, None, None, 1e-5, 1)
                return moment_finalize(s1, s2, torch.full((3,), 100.0), layout, "kl").sum() + y.sum()

        torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    finally:
        decomposition.set_inductor_decomposition(previous)
        torch._dynamo.reset()
    assert "custom_tap" in calls and "custom_finalize" in calls


def test_tracers_get_the_custom_ops():
    """make_fx must record the custom ops: the dispatcher ops call their kernels directly and have no fake
    kernels, so a trace through them would miss the kernel (real tensors, here) or fail (fake tensors: the
    trainer's fx_capture, tests/train/test_cuda_graph.py)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    rm, rv = torch.zeros(3), torch.ones(3)
    layout = PackedLayout.build([rm], [rv], [1e-5])

    def f(x):
        with fastdfd.backend("cpp"):
            y, s1, s2 = moment_tap(x, rm, rv, None, None, 1e-5, 1)
            return moment_finalize(s1, s2, torch.full((3,), 100.0), layout, "kl").sum() + y.sum()

    x = torch.randn(4, 3, 5, 5)
    graph = make_fx(f)(x)
    code = graph.code
    assert "fastdfd.tap_forward" in code and "fastdfd.finalize_forward" in code and "fastdfd_cpu" not in code
    torch.testing.assert_close(graph(x), f(x))
