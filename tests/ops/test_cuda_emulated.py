"""The CUDA kernels of csrc/moment/moment_cuda.cu, executed on the CPU under csrc/cuda_emu/.

The unchanged .cu (launch chevrons lowered, see csrc/cuda_emu/lower_launches.py) is built
with g++ against the emulator's stand-in CUDA headers, with tests/cuda_emu_driver.cpp, and
called through ctypes on CPU tensors; every output is checked against the float64 reference
(fastdfd/ops/moment/reference.py) at odd shapes. Outputs start as NaN (an element never written
fails) and every buffer sits between guard regions (a write outside it fails; a read
outside it reads NaN). Planted errors show the checks bite: wrong indices and bounds in
every kernel, and (under ThreadSanitizer) a missing __syncthreads.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from fastdfd.ops.extensions import csrc_dir
from fastdfd.ops.moment.packed import PackedLayout
from fastdfd.ops.moment.reference import KINDS, eval_batch_norm, moment_finalize_torch, moment_sums_torch

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler to build the emulated CUDA kernels")

EMU = csrc_dir() / "cuda_emu"
CU = csrc_dir() / "moment" / "moment_cuda.cu"
DRIVER = csrc_dir().parent / "tests" / "cuda_emu_driver.cpp"
SELFTEST = csrc_dir().parent / "tests" / "cuda_emu_selftest.cu"
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PAD = 16  # guard elements either side of every buffer
SENTINEL = 3072.0  # exact in fp16 and bf16

# The backward caps its grid at 65535 * 8 blocks, so its grid-stride loop only loops past
# 134M elements; the test seam lets a test lower the cap (emu_set_grid_cap).
GRID_CAP = ("65535LL * 8", "::cuda_emu::grid_cap(65535LL * 8)")

# One planted error per kernel (first occurrence replaced), each a bug a real edit could make.
PLANTED = {
    "rows": ("hi = min(lo + chunk, total)", "hi = min(lo + chunk - 1, total)"),  # a split drops its last position
    "cl": ("for (int i = 0; i < kClLanes; ++i)", "for (int i = 0; i < kClLanes - 1; ++i)"),  # a lane's partial lost
    "bwd": ("g = n / rows", "g = n % s.groups"),  # the wrong segment's ds1/ds2
    "finalize": ("c < hi;", "c <= hi;"),  # one channel past the layer
}


def lowered_source(replacements, with_selftest=False) -> str:
    sys.path.insert(0, str(EMU))
    try:
        from lower_launches import lower
    finally:
        sys.path.pop(0)
    src = CU.read_text()
    for old, new in replacements:
        assert old in src, f"{old!r} is no longer in {CU.name}: update the test"
        src = src.replace(old, new, 1)
    out = lower(src, str(CU))
    if with_selftest:
        out += "\n" + lower(SELFTEST.read_text(), str(SELFTEST))
    return out


class Build:
    """g++ of the lowered .cu and the driver (one translation unit: the headers parse once)
    into out_dir/name, started at once (the builds run side by side where there are cores);
    path() waits for it."""

    def __init__(self, out_dir, name, replacements=(), flags=(), with_selftest=False):
        src = out_dir / f"{name}.cpp"
        src.write_text(lowered_source([GRID_CAP, *replacements], with_selftest) + f'\n#include "{DRIVER}"\n')
        self.out = out_dir / name
        cmd = [CXX, "-std=c++17", "-g", "-pthread", f"-I{EMU}", f"-I{CU.parent}", str(src), "-o", str(self.out),
               *flags]
        self.log = out_dir / f"{name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def path(self):
        assert self.proc.wait(timeout=300) == 0, self.log.read_text()[-4000:]
        return self.out


TSAN = ("-O1", "-fsanitize=thread", "-DCUDA_EMU_MAIN")


def load(path):
    lib = ctypes.CDLL(str(path))
    lib.emu_tap_forward_splits.restype = ctypes.c_int64
    lib.emu_last_message.restype = ctypes.c_char_p
    lib.emu_set_grid_cap.argtypes = [ctypes.c_int64]
    return lib


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_emu")


@pytest.fixture(scope="module")
def builds(build_dir):
    return {
        "emu": Build(build_dir, "libemu.so", flags=("-O1", "-shared", "-fPIC"), with_selftest=True),
        "mutant": Build(build_dir, "libmutant.so", PLANTED.values(), flags=("-O0", "-shared", "-fPIC")),
        "tsan": Build(build_dir, "main_tsan", flags=TSAN),
        "race": Build(build_dir, "main_race", flags=(*TSAN, "-DCUDA_EMU_SYNCTHREADS_NOOP")),
    }


@pytest.fixture(scope="module")
def emu(builds):
    return load(builds["emu"].path())


@pytest.fixture(scope="module")
def mutant(builds):
    return load(builds["mutant"].path())


# ------------------------------------------------------------------------------ buffers
class Guarded:
    """A tensor laid out with `like`'s strides inside a flat buffer with guard regions."""

    def __init__(self, like: torch.Tensor, dtype=None):
        dtype = dtype or like.dtype
        self.poison = float("nan") if dtype.is_floating_point else -(2**30)
        span = 1 + sum((s - 1) * st for s, st in zip(like.shape, like.stride()))
        self.flat = torch.full((span + 2 * PAD,), SENTINEL, dtype=dtype)
        self.flat[PAD:PAD + span] = self.poison  # an output element never written stays NaN
        self.t = torch.as_strided(self.flat, like.shape, like.stride(), PAD)
        self.span = span

    @classmethod
    def of(cls, t: torch.Tensor):
        g = cls(t)
        g.t.copy_(t)
        g.flat[:PAD] = g.poison  # inputs: a read outside the buffer reads NaN
        g.flat[PAD + g.span:] = g.poison
        return g

    def guards_intact(self) -> bool:
        tail = self.flat[PAD + self.span:]
        head = self.flat[:PAD]
        return bool((head == SENTINEL).all() and (tail == SENTINEL).all())

    def ptr(self):
        return ctypes.c_void_p(self.t.data_ptr())


def ptr(g):
    return None if g is None else g.ptr()


def f32(t):
    return ctypes.c_float(t)


def tap_shape(x: torch.Tensor, groups: int):
    n, c = x.shape[:2]
    p = x.numel() // (n * c)
    sp = x.stride(-1) if x.shape[-1] > 1 else x.stride(-2)  # spatial dims flatten with stride sp
    return (ctypes.c_int64 * 7)(n, c, p, groups, x.stride(0), x.stride(1), sp)


# ------------------------------------------------------------------------------ forward
def run_forward(lib, x, mean, var, w, b, eps, groups, splits, write_y):
    """The binding's host side: partials [groups, splits, C] summed over the splits."""
    c = x.shape[1]
    xg = Guarded.of(x)
    ins = [Guarded.of(t) if t is not None else None for t in (mean, var, w, b)]
    y = Guarded(x) if write_y else None
    part = [Guarded(torch.empty(groups, splits, c), torch.float32) for _ in range(2)]
    rc = lib.emu_tap_forward(DTYPE_IDS[x.dtype], xg.ptr(), ptr(y), part[0].ptr(), part[1].ptr(), *map(ptr, ins),
                             f32(eps), tap_shape(x, groups), ctypes.c_int64(splits))
    assert rc == 0, lib.emu_last_message()
    outs = [g for g in (y, *part) if g is not None]
    assert all(g.guards_intact() for g in outs), "a write outside an output buffer"
    return (y.t if write_y else None), part[0].t.sum(1), part[1].t.sum(1)


def assert_low_precision_close(ours, ref64, torch_lp, atol):
    """fp16/bf16 outputs: no further from the float64 truth than twice torch's own rounding."""
    err, err_torch = (ours.double() - ref64).abs(), (torch_lp.double() - ref64).abs()
    bad = ~(err <= 2 * err_torch + atol)
    assert not bad.any(), f"{int(bad.sum())} elements off; worst {float((err - 2 * err_torch).max()):.3g}"


def check_forward(lib, n, c, h, w, groups, channels_last, splits, dtype, write_y, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (0.7 * torch.randn(n, c, h, w, generator=g) + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = 0.2 * torch.randn(c, generator=g)
    var = 0.5 + torch.rand(c, generator=g)
    weight = 1 + 0.2 * torch.randn(c, generator=g) if affine else None
    bias = 0.1 * torch.randn(c, generator=g) if affine else None
    eps = 1e-3
    y, s1, s2 = run_forward(lib, x, mean, var, weight, bias, eps, groups, splits, write_y)

    x64 = x.double()
    r1, r2 = moment_sums_torch(x64, mean.double(), groups)
    d = (x64 - mean.double().view(1, c, 1, 1)).reshape(groups, n // groups, c, -1)
    bound1 = 2e-5 * d.abs().sum((1, 3)) + 1e-6  # fp32 summation error bound, with margin
    bound2 = 2e-5 * (d * d).sum((1, 3)) + 1e-6
    assert ((s1.double() - r1).abs() <= bound1).all(), f"S1 off by {float((s1.double() - r1).abs().max()):.3g}"
    assert ((s2.double() - r2).abs() <= bound2).all(), f"S2 off by {float((s2.double() - r2).abs().max()):.3g}"
    if not write_y:
        return
    cast = (lambda t: None if t is None else t.double())
    ref = eval_batch_norm(x64, mean.double(), var.double(), cast(weight), cast(bias), eps)
    assert y.stride() == x.stride()
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    else:
        assert_low_precision_close(y, ref, eval_batch_norm(x, mean, var, weight, bias, eps), atol=1e-5)


# (N, C, H, W, groups, channels_last, splits): odd sizes; P = 7, 13, 1, 169 (a row walk past
# 256 threads); C = 1, 5, 33, 67 (a partial and a second channel tile); splits 1, 2, 3, one
# with uneven chunks (21 positions in 4), one with an empty last chunk (21 in 8), one with
# more splits than positions.
FORWARD = [
    (6, 5, 7, 1, 2, False, 1),
    (6, 5, 7, 1, 3, False, 2),
    (6, 5, 13, 13, 2, False, 3),
    (6, 33, 7, 1, 2, True, 1),
    (6, 67, 7, 1, 3, True, 3),
    (6, 5, 7, 1, 2, True, 4),
    (6, 2, 7, 1, 2, False, 8),
    (6, 33, 1, 1, 3, False, 3),  # P = 1: NCHW strides are channels_last ones (sc == 1)
    (6, 1, 13, 1, 2, True, 2),  # C = 1: channels_last strides with one channel take the rows kernel
    (4, 3, 1, 1, 2, False, 5),
]


@pytest.mark.parametrize("case", FORWARD, ids=lambda c: "N{}C{}H{}W{}g{}{}s{}".format(
    *c[:5], "cl" if c[5] else "nchw", c[6]))
def test_forward_fp32(emu, case):
    check_forward(emu, *case, torch.float32, write_y=True, affine=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("write_y,affine", [(True, False), (True, True), (False, False)])
def test_forward_low_precision(emu, dtype, channels_last, write_y, affine):
    check_forward(emu, 6, 3, 7, 1, 3, channels_last, 2, dtype, write_y, affine, seed=1)


def test_forward_splits_the_binding_picks(emu):
    """tap_forward_splits (host code) at a shape where it splits, and the kernel at that split."""
    assert emu.emu_tap_forward_splits(tap_shape(torch.empty(2, 3, 64, 64), 1), 132) == 8  # 8192 / (4 * 256)
    splits = emu.emu_tap_forward_splits(tap_shape(torch.empty(2, 3, 64, 16), 1), 132)
    assert splits == 2
    check_forward(emu, 2, 3, 64, 16, 1, False, splits, torch.float32, True, True)


# ------------------------------------------------------------------------------ backward
def check_backward(lib, n, c, h, w, groups, channels_last, dtype, with_dy, affine, grid_cap=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (0.7 * torch.randn(n, c, h, w, generator=g) + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last
                                                                if channels_last else torch.contiguous_format)
    ds1, ds2 = 0.1 * torch.randn(groups, c, generator=g), 0.1 * torch.randn(groups, c, generator=g)
    mean, var = 0.2 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)
    weight = 1 + 0.2 * torch.randn(c, generator=g) if affine else None
    eps = 1e-3
    xg, dyg = Guarded.of(x), Guarded.of(dy)
    ins = [Guarded.of(t) if t is not None else None for t in (ds1, ds2, mean, var, weight)]
    dx = Guarded(x)
    lib.emu_set_grid_cap(grid_cap)
    try:
        rc = lib.emu_tap_backward(DTYPE_IDS[dtype], xg.ptr(), dyg.ptr() if with_dy else None, dx.ptr(),
                                  *map(ptr, ins), f32(eps), tap_shape(x, groups))
    finally:
        lib.emu_set_grid_cap(0)
    assert rc == 0, lib.emu_last_message()
    assert dx.guards_intact(), "a write outside dx"

    def formula(xx, dyy, acc):
        seg = lambda t: t.to(acc).repeat_interleave(n // groups, 0).view(n, c, 1, 1)  # noqa: E731
        v = seg(ds1) + 2 * (xx.to(acc) - mean.to(acc).view(1, c, 1, 1)) * seg(ds2)
        if with_dy:
            scale = torch.rsqrt(var.to(acc) + eps) * (weight.to(acc) if affine else 1)
            v = v + dyy.to(acc) * scale.view(1, c, 1, 1)
        return v

    ref = formula(x, dy, torch.float64)
    if dtype == torch.float32:
        torch.testing.assert_close(dx.t.double(), ref, rtol=1e-5, atol=1e-6)
    else:
        assert_low_precision_close(dx.t, ref, formula(x, dy, torch.float32).to(dtype), atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("grid_cap", [0, 1, 2], ids=["grid", "cap1", "cap2"])
def test_backward_fp32(emu, channels_last, grid_cap):
    check_backward(emu, 6, 33, 3, 3, 3, channels_last, torch.float32, True, True, grid_cap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("with_dy,affine", [(True, False), (False, False), (True, True)])
def test_backward_low_precision(emu, dtype, channels_last, with_dy, affine):
    check_backward(emu, 6, 5, 13, 1, 2, channels_last, dtype, with_dy, affine, grid_cap=1, seed=2)


# ------------------------------------------------------------------------------ finalize
WIDTHS = [5, 300, 1, 33]  # 300 > 256 threads: the block's channel loop runs twice
LAYER_EPS = [1e-5, 1e-3, 0.1, 1e-5]
LAYER_COUNT = [8.0, 24.0, 50.0, 3.0]


def finalize_inputs(groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ct = sum(WIDTHS)
    count = torch.cat([torch.full((w,), m) for w, m in zip(WIDTHS, LAYER_COUNT)])
    d = 0.3 * torch.randn(groups, ct, generator=g)
    d[:, WIDTHS[0] + WIDTHS[1]] = 0  # a layer whose mean shift is exactly 0 (l2's subgradient)
    vb = 0.3 + 1.7 * torch.rand(groups, ct, generator=g)
    s1, s2 = (d * count).float(), ((vb + d * d) * count).float()
    var = 0.5 + torch.rand(ct, generator=g)
    layout = PackedLayout.build([torch.zeros(w, dtype=torch.float64) for w in WIDTHS],
                                list(var.double().split(WIDTHS)), LAYER_EPS, dtype=torch.float64)
    dout = torch.randn(len(WIDTHS), groups, generator=g)
    return s1, s2, count, var, layout, dout


def run_finalize(lib, s1, s2, count, var, layout, kind, dout=None):
    L, (G, Ct) = layout.num_layers, s1.shape
    ins = [Guarded.of(t) for t in (s1, s2, count, var, layout.eps.float())]
    offsets = Guarded.of(layout.offsets)
    if dout is None:
        out = Guarded(torch.empty(L, G), torch.float32)
        rc = lib.emu_finalize_forward(*map(ptr, ins), offsets.ptr(), ctypes.c_int64(L), ctypes.c_int64(G),
                                      ctypes.c_int64(Ct), KINDS.index(kind), out.ptr())
        outs = [out]
    else:
        outs = [Guarded(s1), Guarded(s1)]
        rc = lib.emu_finalize_backward(*map(ptr, ins), offsets.ptr(), ctypes.c_int64(L), ctypes.c_int64(G),
                                       ctypes.c_int64(Ct), KINDS.index(kind), Guarded.of(dout).ptr(),
                                       outs[0].ptr(), outs[1].ptr())
    assert rc == 0, lib.emu_last_message()
    assert all(o.guards_intact() for o in outs), "a write outside an output buffer"
    return [o.t for o in outs]


def check_finalize(lib, kind, backward):
    s1, s2, count, var, layout, dout = finalize_inputs()
    a1, a2 = s1.double().requires_grad_(), s2.double().requires_grad_()
    ref = moment_finalize_torch(a1, a2, count.double(), layout, kind)
    if not backward:
        (out,) = run_finalize(lib, s1, s2, count, var, layout, kind)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
        return
    ref.backward(dout.double())
    ds1, ds2 = run_finalize(lib, s1, s2, count, var, layout, kind, dout)
    torch.testing.assert_close(ds1.double(), a1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ds2.double(), a2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("kind", KINDS)
def test_finalize(emu, kind, backward):
    check_finalize(emu, kind, backward)


# ------------------------------------------------------------------------------ launch limits
def test_launch_a_card_refuses_is_refused(emu):
    """grid.y = G > 65535 segments: a card refuses the finalize launch, and so does the emulator."""
    s1 = torch.ones(65536, 1)
    layout = PackedLayout.build([torch.zeros(1)], [torch.ones(1)], [1e-5])
    L, G = 1, 65536
    out = torch.full((L, G), float("nan"))
    rc = emu.emu_finalize_forward(*(ctypes.c_void_p(t.data_ptr()) for t in (s1, s1, torch.ones(1), torch.ones(1),
                                                                             layout.eps, layout.offsets)),
                                  ctypes.c_int64(L), ctypes.c_int64(G), ctypes.c_int64(1), 0,
                                  ctypes.c_void_p(out.data_ptr()))
    assert rc == 9, f"expected cudaErrorInvalidConfiguration (9), got {rc}"
    assert b"65535" in emu.emu_last_message()
    assert out.isnan().all(), "a refused launch ran"


# ------------------------------------------------------------------------------ the emulator itself
def test_warp_intrinsics_follow_cuda(emu):
    """tests/cuda_emu_selftest.cu: shuffles (with widths) and votes, per CUDA's definitions."""
    out = torch.zeros(64, 6, dtype=torch.int32)
    assert emu.selftest_warp_intrinsics(ctypes.c_void_p(out.data_ptr())) == 0
    for t in range(64):
        lane, base = t % 32, t - t % 32
        down = t + 3 if lane + 3 < 32 else t
        up = t - 3 if lane % 16 >= 3 else t
        idx = base + (lane // 8) * 8 + 7
        ballot = sum(1 << l for l in range(32) if (base + l) % 3 == 0)
        ballot = ballot - (1 << 32) if ballot >= 1 << 31 else ballot  # as int32
        vote = 1 + (2 if base == 32 else 0)  # all lanes < 100; lane 40 is in the second warp
        assert out[t].tolist() == [down, up, t ^ 5, idx, ballot, vote], t


def test_atomics(emu):
    total, most = torch.zeros(1), torch.full((1,), -1, dtype=torch.int32)
    assert emu.selftest_atomics(ctypes.c_void_p(total.data_ptr()), ctypes.c_void_p(most.data_ptr())) == 0
    assert total.item() == 0.5 * 3 * 96 and most.item() == 3 * 96 - 1


def test_a_barrier_part_of_a_block_skips_fails_the_launch(emu):
    out = torch.zeros(32, dtype=torch.int32)
    assert emu.selftest_divergent_barrier(ctypes.c_void_p(out.data_ptr())) == 719  # cudaErrorLaunchFailure
    assert b"exited" in emu.emu_last_message()


# ------------------------------------------------------------------------------ planted errors
def test_planted_errors_fail_the_checks(mutant):
    """The same checks against a build with one wrong bound or index planted in each kernel."""
    with pytest.raises(AssertionError, match="S1 off|S2 off"):  # rows kernel
        check_forward(mutant, 6, 5, 7, 1, 2, False, 2, torch.float32, True, True)
    with pytest.raises(AssertionError, match="S1 off|S2 off"):  # channels-last kernel
        check_forward(mutant, 6, 33, 7, 1, 2, True, 1, torch.float32, True, True)
    with pytest.raises(AssertionError):  # backward
        check_backward(mutant, 6, 5, 7, 1, 2, False, torch.float32, True, True)
    with pytest.raises(AssertionError):  # finalize
        check_finalize(mutant, "kl", backward=False)


# ------------------------------------------------------------------------------ races
def run_under_tsan(exe):
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66 history_size=4")
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    if "unexpected memory mapping" in proc.stderr:  # TSan's shadow layout clashes with this kernel's ASLR
        proc = subprocess.run(["setarch", platform.machine(), "-R", str(exe)], capture_output=True, text=True,
                              timeout=300, env=env)
    return proc


@pytest.fixture(scope="module")
def tsan_ok(build_dir):
    probe = build_dir / "probe.cpp"
    probe.write_text("#include <thread>\nint main() { std::thread([] {}).join(); }\n")
    proc = subprocess.run([CXX, "-fsanitize=thread", "-pthread", str(probe), "-o", str(build_dir / "probe")], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"g++ -fsanitize=thread does not link here: {proc.stderr[-300:]}")
    assert run_under_tsan(build_dir / "probe").returncode == 0


def test_kernels_are_race_free_under_tsan(builds, tsan_ok):
    proc = run_under_tsan(builds["tsan"].path())
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr[-6000:]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "0 failed launches" in proc.stdout


def test_tsan_catches_a_missing_syncthreads(builds, tsan_ok):
    proc = run_under_tsan(builds["race"].path())
    assert "ThreadSanitizer: data race" in proc.stderr, proc.stderr[-3000:]
    assert "moment_cuda.cu" in proc.stderr  # reported at the kernel's own lines
    assert proc.returncode != 0
