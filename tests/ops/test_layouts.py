"""Every input layout a BN layer can be handed, on every backend, against the float64 reference.

A BN input is often a view: a channel slice (``x[:, :8]``), a batch stride (``x[::2]``), an
expand, channels_last (sliced or not), a transposed BatchNorm1d input, a permuted tensor.
The fused kernels address x, y, dy and dx with one set of strides, so the launchers must
bring x to a dense layout and give y/dx exactly its strides; before that was enforced, the
first three views below corrupted the heap (the process aborted) and expands gave NaN or
~5e37. Each view here runs forward and backward (dx through y and through the sums), with
one and several groups, and is compared with fastdfd/ops/moment/reference.py run in float64.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdfd
from fastdfd.kernels.moment.layout import (
    check_kernel_layout,
    empty_kernel_like,
    is_dense,
    kernel_layout,
    kernel_output_like,
    like_strides,
)
from fastdfd.ops import bn_moment_loss, moment_sums, moment_tap
from fastdfd.ops.dispatch import resolve, unavailable
from fastdfd.ops.moment.reference import moment_tap_torch

from ..conftest import REQUIRED_BACKENDS, require_backend

BACKENDS = ["torch", "cpp", "triton"]
CL, CL3 = torch.channels_last, torch.channels_last_3d


def _available(name: str, dtype: torch.dtype = torch.float32) -> str | None:
    return unavailable("moment_tap", name, torch.empty(0, dtype=dtype))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return require_backend(request.param, _available(request.param))


# name -> (shape of the leaf the view is taken from, the view). Odd sizes throughout; every
# view is [6, 5, ...] (or [6, 5]) so groups 1, 2 and 3 all divide the batch.
VIEWS = {
    "contiguous": ((6, 5, 3, 3), lambda t: t),
    "channel_slice": ((6, 9, 3, 3), lambda t: t[:, 2:7]),
    "batch_stride": ((12, 5, 3, 3), lambda t: t[::2]),
    "expand_batch": ((1, 5, 3, 3), lambda t: t.expand(6, 5, 3, 3)),
    "expand_spatial": ((6, 5, 1, 1), lambda t: t.expand(6, 5, 3, 3)),
    "spatial_slice": ((6, 5, 5, 4), lambda t: t[:, :, 1:4, :3]),
    "channels_last": ((6, 5, 3, 3), lambda t: t.contiguous(memory_format=CL)),
    "channels_last_channel_slice": ((6, 9, 3, 3), lambda t: t.contiguous(memory_format=CL)[:, 2:7]),
    "channels_last_batch_stride": ((12, 5, 3, 3), lambda t: t.contiguous(memory_format=CL)[1::2]),
    "bn1d": ((6, 5), lambda t: t),
    "bn1d_channel_slice": ((6, 9), lambda t: t[:, 2:7]),
    "bn1d_batch_stride": ((12, 5), lambda t: t[::2]),
    "bn1d_transposed": ((5, 6), lambda t: t.t()),
    "bn1d_expand": ((1, 5), lambda t: t.expand(6, 5)),
    "bn1d_ncl": ((6, 5, 7), lambda t: t),
    "bn1d_ncl_transposed": ((6, 7, 5), lambda t: t.transpose(1, 2)),
    "bn1d_ncl_length_slice": ((6, 5, 11), lambda t: t[:, :, 2:9]),
    "bn3d": ((6, 5, 3, 2, 3), lambda t: t),
    "bn3d_channels_last": ((6, 5, 3, 2, 3), lambda t: t.contiguous(memory_format=CL3)),
    "bn3d_channel_slice": ((6, 8, 3, 2, 3), lambda t: t[:, 1:6]),
    "hw_transposed": ((6, 5, 4, 3), lambda t: t.transpose(2, 3)),
    "batch_innermost": ((5, 3, 3, 6), lambda t: t.permute(3, 0, 1, 2)),
    "spatial_outermost": ((3, 3, 6, 5), lambda t: t.permute(2, 3, 0, 1)),
    "size1_dims_odd_strides": ((90,), lambda t: t.as_strided((6, 5, 1, 3), (15, 3, 999, 1))),
}
# the views whose forward or backward aborted the process or returned garbage before the fix
CRASHED = ["channel_slice", "batch_stride", "bn1d_channel_slice", "expand_batch"]


def _inputs(view: str, dtype=torch.float32, seed=0):
    """A leaf (random, never zeros), the view of it the BN layer gets, and random statistics."""
    shape, fn = VIEWS[view]
    g = torch.Generator().manual_seed(seed)
    base = (0.3 + 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    c = fn(base).shape[1]
    stats = [0.5 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g),
             1 + 0.2 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)]
    return base, fn, stats


def _run(name, base, fn, stats, groups, eps=1e-3, upstream_seed=1):
    """y, S1, S2 and the gradient at the leaf of sum(y*a) + sum(S1*b) + sum(S2*c) (a, b, c random)."""
    base = base.detach().clone().requires_grad_(True)
    x = fn(base)
    with fastdfd.backend(name):
        served = resolve("moment_tap", x)[0]
        y, s1, s2 = moment_tap(x, *stats, eps, groups)
    g = torch.Generator().manual_seed(upstream_seed)
    a = torch.randn(y.shape, generator=g, dtype=torch.float64)
    b = torch.randn(s1.shape, generator=g, dtype=torch.float64)
    c = torch.randn(s2.shape, generator=g, dtype=torch.float64) * 0.1
    loss = (y.double() * a).sum() + (s1.double() * b).sum() + (s2.double() * c).sum()
    (dbase,) = torch.autograd.grad(loss, base)
    return served, x, (y, s1, s2, dbase)


def _reference64(base, fn, stats, groups, eps=1e-3):
    """The torch backend's math (fastdfd/ops/moment/reference.py) in float64, through the same view."""
    base = base.detach().double().requires_grad_(True)
    x = fn(base)
    y, s1, s2 = moment_tap_torch(x, *[s.double() for s in stats], eps, groups)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(y.shape, generator=g, dtype=torch.float64)
    b = torch.randn(s1.shape, generator=g, dtype=torch.float64)
    c = torch.randn(s2.shape, generator=g, dtype=torch.float64) * 0.1
    (dbase,) = torch.autograd.grad((y * a).sum() + (s1 * b).sum() + (s2 * c).sum(), base)
    return y.detach(), s1.detach(), s2.detach(), dbase


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("view", list(VIEWS))
def test_view_forward_and_gradients_match_float64(view, groups, backend):
    base, fn, stats = _inputs(view)
    served, x, got = _run(backend, base, fn, stats, groups)
    assert served == backend, f"{backend} did not serve {view} (resolve chose {served})"
    ref = _reference64(base, fn, stats, groups)
    for what, a, r in zip(("y", "S1", "S2", "dx"), got, ref):
        assert a.shape == r.shape, what
        assert torch.isfinite(a).all(), f"{what} of {view} has NaN/Inf"
        scale = float(r.abs().max())
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=2e-6 * scale, msg=lambda m: f"{what}: {m}")
    if backend != "torch":  # the fake (meta) implementation reports the strides the kernel produced
        assert got[0].stride() == kernel_output_like(x).stride()


@pytest.mark.parametrize("view", ["channel_slice", "batch_stride", "expand_batch", "channels_last_channel_slice",
                                  "bn1d_channel_slice", "bn1d_ncl_transposed"])
def test_sums_only_and_drop_in_loss_on_views(view, backend):
    """moment_sums (the sums-only tap: no y, var unread) and bn_moment_loss, forward and dx.

    The KL loss of 2-row segments is ill-conditioned (var_b from S2/M - (S1/M)^2), so fp32
    is held to the flash-attention rule against float64, with the torch backend's fp32 error
    as the yardstick.
    """
    base, fn, (rm, rv, _, _) = _inputs(view, seed=3)
    out = {}
    for name, dtype in ((backend, torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
        leaf = base.detach().to(dtype).requires_grad_(True)
        x = fn(leaf)
        with fastdfd.backend(name):
            assert resolve("moment_sums", x)[0] == name
            s1, s2 = moment_sums(x, rm.to(dtype), 3)
            loss = bn_moment_loss(x, rm.to(dtype), rv.to(dtype), kind="kl", groups=3, eps=1e-3)
        (d,) = torch.autograd.grad(loss + 0.01 * (s1.sum() + s2.sum()), leaf)
        out[(name, dtype)] = [t.detach().double() for t in (s1, s2, loss, d)]
    for what, a, t, r in zip(("S1", "S2", "loss", "dx"), out[(backend, torch.float32)],
                             out[("torch", torch.float32)], out[("torch", torch.float64)]):
        err, base_err = float((a - r).abs().max()), float((t - r).abs().max())
        atol = 1e-6 * float(r.abs().max())
        assert err <= 2 * base_err + atol, f"{what}: error {err:.3g} > 2 * torch fp32's {base_err:.3g} + {atol:.3g}"


def _lowp_case(name, view, dtype, groups=3):
    """max |kernel - ref64| <= 2 max |torch_lowp - ref64| + atol, for y, S1, S2 and dx.

    ref64 is the float64 reference on the same (already rounded) low-precision input;
    torch_lowp is the torch backend on the low-precision tensor (fp32 statistics, y and dx
    rounded to the input's dtype), the error every backend is allowed twice of.
    """
    base, fn, stats = _inputs(view, dtype=dtype, seed=5)
    served, _, got = _run(name, base, fn, stats, groups)
    assert served == name, f"{name} did not serve {dtype} {view} (resolve chose {served})"
    assert got[0].dtype == dtype and got[3].dtype == dtype
    _, _, lowp = _run("torch", base, fn, stats, groups)
    ref = _reference64(base, fn, stats, groups)
    for what, a, t, r in zip(("y", "S1", "S2", "dx"), got, lowp, ref):
        a, t = a.detach(), t.detach()
        err = float((a.double() - r).abs().max())
        base_err = float((t.double() - r).abs().max())
        atol = 1e-6 * float(r.abs().max())
        assert err <= 2 * base_err + atol, f"{what}: kernel error {err:.3g} > 2 * torch's {base_err:.3g} + {atol:.3g}"


LOWP_VIEWS = ["contiguous", "channel_slice", "batch_stride", "expand_batch", "channels_last_channel_slice",
              "bn1d_channel_slice", "bn1d_ncl_transposed", "hw_transposed"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("view", LOWP_VIEWS)
def test_half_precision_views_on_cpp(view, dtype):
    require_backend("cpp", _available("cpp", dtype))
    _lowp_case("cpp", view, dtype)


@pytest.mark.parametrize("view", ["channel_slice", "batch_stride", "channels_last_channel_slice",
                                  "bn1d_channel_slice"])
def test_fp16_views_on_triton(view):
    # bf16 is not here: the interpreter runs kernels in numpy, which has no bf16 arithmetic
    require_backend("triton", _available("triton", torch.float16))
    _lowp_case("triton", view, torch.float16)


# ----------------------------------------------------------------- the layout contract
@pytest.mark.parametrize("view", list(VIEWS))
def test_kernel_layout_is_dense_and_outputs_share_its_strides(view):
    base, fn, _ = _inputs(view)
    x = fn(base)
    kx, (sn, sc, sp) = kernel_layout(x)
    assert is_dense(kx) and torch.equal(kx, x)
    assert sp == 1 or (sc == 1 and kx.shape[1] > 1)
    out = empty_kernel_like(kx)
    assert out.stride() == kx.stride() and out.stride() == kernel_output_like(x).stride()
    assert torch.empty_like(kx).stride() == kx.stride()
    # contiguous and channels_last inputs are used in place, never copied
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=CL)):
        assert kx is x
    # dy with any strides (here an expand, as y.sum()'s backward hands over) gets x's exactly
    dy = like_strides(torch.randn(1, dtype=x.dtype).expand(x.shape), kx)
    assert dy.stride() == kx.stride()
    check_kernel_layout(kx, (sn, sc, sp), dy, out)


def test_dense_detection():
    x = torch.randn(6, 5, 3, 3)
    assert is_dense(x) and is_dense(x.contiguous(memory_format=CL)) and is_dense(x.permute(2, 0, 3, 1))
    assert not is_dense(x[:, :4]) and not is_dense(x[::2]) and not is_dense(x[:1].expand(6, 5, 3, 3))
    assert not is_dense(torch.randn(40).as_strided((6, 5), (5, 1))[:, ::2])
    assert not is_dense(torch.randn(40).as_strided((6, 5), (4, 1)))  # overlapping rows


def test_launchers_refuse_a_mismatched_layout():
    x = torch.randn(6, 5, 3, 3)
    with pytest.raises(RuntimeError, match="not in kernel layout"):
        check_kernel_layout(x[:, :3], (45, 9, 1))
    with pytest.raises(RuntimeError, match="does not match x's layout"):
        check_kernel_layout(x, (45, 9, 1), torch.randn(6, 5, 3, 3).contiguous(memory_format=CL))


def test_cpp_extension_refuses_non_dense_x_and_mismatched_dy():
    """The C++ side checks the layout again (defence in depth): an error, not a heap overrun."""
    require_backend("cpp", _available("cpp"))
    from fastdfd.ops import extensions

    ext = extensions.load("cpu")[0]
    wide = torch.randn(6, 9, 3, 3)
    x = wide[:, :5]
    m, v = torch.zeros(5), torch.ones(5)
    with pytest.raises(RuntimeError, match="not non-overlapping and dense"):
        ext.tap_forward(x, m, v, None, None, 1e-5, 1, True, *x.stride()[:2], 1, 0, 0.0, None)
    with pytest.raises(RuntimeError, match="not non-overlapping and dense"):
        ext.tap_forward(torch.randn(1, 5, 3, 3).expand(6, 5, 3, 3), m, v, None, None, 1e-5, 1, True, 0, 9, 1, 0,
                        0.0, None)
    xc = x.contiguous()
    with pytest.raises(RuntimeError, match="stride_c"):
        ext.tap_forward(xc, m, v, None, None, 1e-5, 1, True, 45, 1, 1, 0, 0.0, None)
    ds = torch.zeros(1, 5)
    with pytest.raises(RuntimeError, match="dy"):
        ext.tap_backward(xc, wide[:, :5], ds, ds, m, v, None, None, 1e-5, 1, 45, 9, 1, 0, 0.0, None)
    with pytest.raises(RuntimeError, match="mean"):
        ext.tap_forward(xc, torch.zeros(4), v, None, None, 1e-5, 1, True, 45, 9, 1, 0, 0.0, None)
    with pytest.raises(RuntimeError, match="unknown activation id 7"):
        ext.tap_forward(xc, m, v, None, None, 1e-5, 1, True, 45, 9, 1, 7, 0.0, None)
    y, s1, _ = ext.tap_forward(xc, m, v, None, None, 1e-5, 1, True, 45, 9, 1, 0, 0.0, None)
    assert y.stride() == xc.stride() and s1.shape == (1, 5)


# ------------------------------------------------------------------------ empty inputs
@pytest.mark.parametrize("shape", [(4, 8, 0, 3), (0, 8), (0, 8, 5), (4, 8, 0)])
def test_empty_inputs_are_refused(shape, backend):
    x = torch.randn(shape)
    rm, rv = torch.zeros(8), torch.ones(8)
    with fastdfd.backend(backend):
        for call in (lambda: moment_tap(x, rm, rv, None, None, 1e-5, 1), lambda: moment_sums(x, rm),
                     lambda: bn_moment_loss(x, rm, rv)):
            with pytest.raises(ValueError, match="no elements per channel|not a positive multiple"):
                call()


# ------------------------------------------------------ the crashes, in a child process
CRASH_SCRIPT = textwrap.dedent("""
    import sys, torch, fastdfd
    from fastdfd.ops import moment_tap
    from fastdfd.ops.dispatch import resolve
    from fastdfd.ops.moment.reference import moment_tap_torch
    views = {  # the reports: (leaf shape, the view the BN layer gets)
        "channel_slice": ((64, 32, 9, 9), lambda t: t[:, :8]),
        "batch_stride": ((64, 8, 9, 9), lambda t: t[::2]),
        "bn1d_channel_slice": ((64, 32), lambda t: t[:, :8]),
        "expand_batch": ((1, 8, 9, 9), lambda t: t.expand(16, 8, 9, 9)),
    }
    for name in sys.argv[1:]:
        for view, (shape, fn) in views.items():
            base = torch.randn(shape, requires_grad=True)
            x = fn(base)
            c = x.shape[1]
            m, v = 0.5 * torch.randn(c), 0.5 + torch.rand(c)
            with fastdfd.backend(name):
                assert resolve("moment_tap", x)[0] == name
                y, s1, s2 = moment_tap(x, m, v, None, None, 1e-5, 1)
                (y.sum() + s1.sum() + s2.sum()).backward()
            y64, _, s2_64 = moment_tap_torch(x.detach().double(), m.double(), v.double(), None, None, 1e-5, 1)
            assert torch.isfinite(y).all() and torch.isfinite(base.grad).all(), (name, view)
            assert torch.allclose(y.double(), y64, rtol=1e-4, atol=1e-4), (name, view)
            assert torch.allclose(s2.double(), s2_64, rtol=1e-4), (name, view)
            print(name, view, "ok", flush=True)
""")


def test_former_crash_repros_run_clean_in_a_child_process():
    """The exact reports (a heap-corruption abort kills the whole interpreter, so in a child)."""
    missing = {n: _available(n) for n in ("cpp", "triton") if _available(n) is not None}
    for name, why in missing.items():
        if name in REQUIRED_BACKENDS:
            require_backend(name, why)  # fails: a required backend must run the repros
    names = [n for n in ("cpp", "triton") if n not in missing]
    if not names:
        pytest.skip(f"no fused backend available here: {missing}")
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, *names], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count(" ok") == 4 * len(names)


# ------------------------------------------------- the generator launchers take views too
@pytest.mark.parametrize("gen_backend", ["cpp", "triton"])
def test_generator_ops_take_strided_views_and_refuse_wrong_shapes(gen_backend):
    """The generator ops copy their operands to contiguous before raw addressing: a channel
    slice, a transposed weight and an expanded dy give exactly the contiguous results."""
    from fastdfd.ops.generator.custom_op import gen_conv_forward, gen_linear_gather

    require_backend(gen_backend, unavailable("ensemble_forward", gen_backend, torch.empty(0)), "generator backend")
    g = torch.Generator().manual_seed(7)
    k, b, cin, cout, h = 2, 3, 5, 4, 3
    views = {
        "x": torch.randn(k, b, cin + 3, h, h, generator=g)[:, :, 1:1 + cin],
        "scale": (0.5 + torch.rand(cin, k, generator=g)).t(),
        "shift": torch.randn(k, 2 * cin, generator=g)[:, ::2],
        "weight": (torch.randn(k, cin, cout, 3, 3, generator=g) / 4).transpose(1, 2),
    }
    results = []
    for make in (lambda t: t, lambda t: t.contiguous()):
        leaves = {n: make(t).detach().requires_grad_(True) for n, t in views.items()}
        y, s1, s2 = gen_conv_forward(leaves["x"], leaves["scale"], leaves["shift"], leaves["weight"], None, 2,
                                     False, True, gen_backend)
        loss = y.sum() + (s1 * torch.arange(cout)).sum() + 0.1 * s2.sum()  # y.sum(): an expanded dy
        grads = torch.autograd.grad(loss, list(leaves.values()))
        results.append((y, s1, s2, *grads))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)

    z = torch.randn(k, 16, b, generator=g).transpose(1, 2)
    wz = torch.randn(k, 8, 16, generator=g).transpose(1, 2)
    wy = torch.randn(k, 4, 16, generator=g)[:, :, ::2]
    local = torch.randint(0, 4, (b, k), generator=g).t()
    got = gen_linear_gather(z, wz, wy, local, gen_backend)
    want = gen_linear_gather(z.contiguous(), wz.contiguous(), wy.contiguous(), local.contiguous(), gen_backend)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)

    x = views["x"].contiguous()
    with pytest.raises(ValueError, match="scale must be"):
        gen_conv_forward(x, views["scale"][:, :3], views["shift"], views["weight"], None, 2, False, True, gen_backend)
    with pytest.raises(ValueError, match="weight must be"):
        gen_conv_forward(x, None, None, views["weight"][:, :, :3], None, 2, False, True, gen_backend)
    with pytest.raises(ValueError, match="local must be"):
        gen_linear_gather(z, wz, wy, local[:, :2], gen_backend)
    with pytest.raises(ValueError, match="Wy must be"):
        gen_linear_gather(z, wz, wy[:, :, :5], local, gen_backend)
