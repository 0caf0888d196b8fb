"""The tap as torch.compile sees it (fastdfd/ops/moment/decomposition.py): its aten forward and one-pass
backward against the float64 definitions and the cpp kernels, gradcheck of the autograd function, and one
inductor compile of a teacher with a MomentMatcher: no graph break, no recompile, no opaque tap left in
the generated code (or one per layer when opted out), the eager numbers."""

import pytest
import torch
from torch import nn

import fastdfd
from fastdfd import MomentMatcher
from fastdfd.ops.dispatch import unavailable
from fastdfd.ops.moment import decomposition as dec
from fastdfd.ops.moment.custom_op import tap_backward, tap_forward

from ..conftest import require_backend

SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 63, 1, 1), (4, 6), (3, 4, 10)]


def _inputs(shape, groups, dtype, channels_last, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[0] * groups, shape[1]
    x = 0.3 + 1.5 * torch.randn((n,) + tuple(shape[1:]), generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean, var = 0.5 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)
    w = 1 + 0.2 * torch.randn(c, generator=g) if affine else None
    b = 0.1 * torch.randn(c, generator=g) if affine else None
    dy = torch.randn(x.shape, generator=g).to(memory_format=torch.channels_last if channels_last else
                                                torch.contiguous_format)
    ds1, ds2 = torch.randn(groups, c, generator=g), torch.randn(groups, c, generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = (None if t is None else t.to(acc) for t in (w, b))
    return x.to(dtype), dy.to(dtype), mean.to(acc), var.to(acc), w, b, ds1.to(acc), ds2.to(acc)


def _reference64(x, dy, mean, var, w, b, eps, groups, ds1, ds2):
    x, n, c = x.double(), x.shape[0], x.shape[1]
    shape = (1, c) + (1,) * (x.dim() - 2)
    d = x - mean.double().view(shape)
    scale = torch.rsqrt(var.double().view(shape) + eps) * (1 if w is None else w.double().view(shape))
    y = d * scale + (0 if b is None else b.double().view(shape))
    dg = d.reshape(groups, n // groups, c, -1)
    gshape = (groups, 1, c) + (1,) * (x.dim() - 2)
    dx = (dy.double() * scale).unflatten(0, (groups, n // groups)) + ds1.double().view(gshape) \
        + 2 * d.unflatten(0, (groups, n // groups)) * ds2.double().view(gshape)
    return y, dg.sum((1, 3)), (dg * dg).sum((1, 3)), dx.flatten(0, 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_decomposition_matches_float64(shape, groups, dtype, channels_last, affine):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-d layout")
    x, dy, mean, var, w, b, ds1, ds2 = _inputs(shape, groups, dtype, channels_last, affine)
    eps = 1e-5
    y, s1, s2 = dec._tap_forward_math(x, mean, var, w, b, eps, groups, True)
    dx = dec._tap_backward_math(x, dy, ds1, ds2, mean, var, w, eps, groups)[0]
    ry, rs1, rs2, rdx = _reference64(x, dy, mean, var, w, b, eps, groups, ds1, ds2)
    low = dtype == torch.bfloat16
    tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-5, atol=1e-5)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape and dx.shape == x.shape
    assert s1.dtype == mean.dtype and s1.shape == (groups, shape[1])
    torch.testing.assert_close(y.double(), ry, **tol)
    torch.testing.assert_close(dx.double(), rdx, **tol)
    # the sums are taken in the accumulation dtype from x as given (bf16 x is exact in fp32)
    x64 = x.double()
    ref_s = _reference64(x64, dy, mean, var, w, b, eps, groups, ds1, ds2)
    torch.testing.assert_close(s1.double(), ref_s[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s2.double(), ref_s[2], rtol=1e-5, atol=1e-4)
    # sums only (moment_sums' form), and the backward with no upstream gradient of y
    y0, t1, t2 = dec._tap_forward_math(x, mean, var, None, None, 0.0, groups, False)
    assert y0.numel() == 0
    torch.testing.assert_close(t1, s1)
    torch.testing.assert_close(t2, s2)
    dx0 = dec._tap_backward_math(x, None, ds1, ds2, mean, var, w, eps, groups)[0]
    rdx0 = _reference64(x, torch.zeros_like(dy), mean, var, w, b, eps, groups, ds1, ds2)[3]
    torch.testing.assert_close(dx0.double(), rdx0, **tol)


def test_decomposition_matches_the_cpp_kernels():
    """The same op, decomposed or run by the cpp kernels, on one input (forward and backward)."""
    require_backend("cpp", unavailable("moment_tap", "cpp", torch.empty(0)))
    x, dy, mean, var, w, b, ds1, ds2 = _inputs((3, 5, 7, 9), 2, torch.float32, True, True)
    kernel = tap_forward(x, mean, var, w, b, 1e-3, 2, True, "cpp")
    decomposed = dec._tap_forward_math(x, mean, var, w, b, 1e-3, 2, True)
    for a, e in zip(decomposed, kernel):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec._tap_backward_math(x, dy, ds1, ds2, mean, var, w, 1e-3, 2)[0],
                               tap_backward(x, dy, ds1, ds2, mean, var, w, None, 1e-3, 2, "cpp")[0], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("write_y", [True, False])
def test_traced_tap_gradcheck(write_y):
    """The autograd function dynamo traces: its one-pass backward (and the BN affine's gradients) against
    autograd's derivative of the float64 definitions, through y, S1 and S2 at once."""
    x, _, mean, var, w, b, _, _ = _inputs((3, 4, 5, 3), 2, torch.float64, False, True)
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        y, s1, s2 = dec.tap(x, mean, var, w, b, 1e-3, 2, write_y)
        return (y, s1, s2) if write_y else (s1, s2)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_set_inductor_decomposition():
    previous = dec.set_inductor_decomposition(["triton"])
    try:
        assert not dec.decomposes("cpp") and not dec.decomposes("triton")  # eager: never
    finally:
        assert dec.set_inductor_decomposition(previous) == {"triton"}
    with pytest.raises(ValueError, match="torch"):
        dec.set_inductor_decomposition(["torch"])


class _Block(nn.Module):
    """conv-BN-ReLU, then a basic block's end relu(BN(conv(h)) + h): the matcher fuses both epilogues."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        return self.head(h.mean((2, 3)))


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    net = _Block()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.1)
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("decompose", [True, False])
def test_inductor_compiles_the_tap_fused_in_one_graph(decompose):
    """torch.compile(fullgraph=True) with inductor: the tap's ops leave the generated code (decomposed and fused
    with the ReLU, and the residual add, after them) or stay one opaque call per layer (opted out; the add and
    ReLU after it), the eager loss and input gradient
    either way, and later steps reuse the graph (a recompile is an error)."""
    require_backend("cpp", unavailable("moment_tap", "cpp", torch.empty(0)))
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    previous = dec.set_inductor_decomposition({"cpp"} if decompose else set())
    net = _teacher()
    try:
        with fastdfd.backend("cpp"), MomentMatcher(net, kind="kl", scope="generator", groups=2) as matcher:
            def step(x):
                logits = net(x)
                return matcher.loss().sum() + logits.square().mean()

            compiled = torch.compile(step, fullgraph=True)
            x = torch.randn(4, 3, 9, 7, requires_grad=True)
            eager = step(x)
            (g_eager,) = torch.autograd.grad(eager, x)

            def run(inp):
                out = compiled(inp)
                return out, torch.autograd.grad(out, inp)[0]

            (loss, g), code = run_and_get_code(run, x)
            torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-6)
            text = "\n".join(code)
            opaque = "torch.ops.fastdfd.tap_forward" in text or "torch.ops.fastdfd.tap_backward" in text
            assert opaque != decompose, "the generated code " + ("still calls" if decompose else "lost") + " the tap"
            assert matcher.fusion.residual == {"bn2"} and set(matcher.fusion.fused) == {"bn1", "bn2"}
            with torch._dynamo.config.patch(error_on_recompile=True):
                for seed in (1, 2):
                    xs = torch.randn(4, 3, 9, 7, generator=torch.Generator().manual_seed(seed), requires_grad=True)
                    out = compiled(xs)
                    torch.autograd.grad(out, xs)
                    torch.testing.assert_close(out, step(xs), rtol=1e-5, atol=1e-5)
    finally:
        dec.set_inductor_decomposition(previous)
        torch._dynamo.reset()
