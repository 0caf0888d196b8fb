"""The fused generator backends against float64: ``triton`` (kernels/generator/linear_gather.py,
conv.py) and ``cpp`` (csrc/generator/generator_cpu.cpp).

On a CPU the Triton kernels run in Triton's interpreter (fp32: the interpreter has no bf16
arithmetic), on a GPU as real kernels; the cpp backend is built on first use. Every check
covers outputs and every gradient. Tolerances follow flash-attention's rule for reduced
precision: a backend's error against the float64 oracle may be at most twice PyTorch's own
fp32 error, plus a small absolute term.
"""

import pytest
import torch

import fastdfd
from fastdfd import GeneratorEnsemble
from fastdfd.ops.dispatch import unavailable
from fastdfd.ops.generator.custom_op import GEN_LAUNCHERS, gen_linear_gather
from fastdfd.ops.generator.reference import conv_layer_reference, linear_gather_reference

from ..conftest import require_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "cpp"])
def backend(request):
    why = unavailable("ensemble_forward", request.param, torch.empty(0, device=DEVICE))
    return require_backend(request.param, why, "generator backend")


def assert_within_torch_error(kernel, ref64, torch32, what, atol=1e-5):
    """|kernel - ref64| <= 2 |torch32 - ref64| + atol, elementwise (atol scaled to the tensor's size)."""
    kernel, torch32 = kernel.double().cpu(), torch32.double().cpu()
    ref64 = ref64.double().cpu()
    scale = ref64.abs().max().item() + 1.0
    err = (kernel - ref64).abs()
    bound = 2 * (torch32 - ref64).abs() + atol * scale
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} exceeds bound by {worst:.3g}"


def _leaf(t):
    return t.detach().clone().requires_grad_(True) if t is not None else None


# ------------------------------------------------------------------------------ single layers
CONV_CASES = [
    # (K, B, CIN, COUT, h, upsample, tanh, prologue, bias)
    (1, 1, 3, 5, 4, 2, False, True, False),
    (3, 5, 20, 17, 4, 2, False, True, False),  # odd channels, partial tiles everywhere
    (2, 3, 33, 40, 3, 2, False, True, False),  # more than one channel block
    (3, 3, 19, 3, 8, 1, True, True, True),  # the output layer: tanh, bias, 3 channels
    (2, 3, 7, 1, 5, 1, False, False, True),  # no prologue, one output channel
    # cpp: fewer than 16 output channels take the narrow path (one GEMM over every tap, then a shifted sum)
    (2, 3, 9, 15, 5, 2, False, True, True),  # narrow after the x2 upsample, four phases
    (2, 3, 9, 3, 5, 2, True, False, False),  # narrow, x2 upsample, tanh, no prologue
    (3, 2, 24, 16, 6, 1, True, True, True),  # the first width on the wide path
    (2, 3, 7, 17, 5, 1, False, False, True),  # the wide path without a prologue
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "K{}B{}c{}-{}h{}up{}{}{}{}".format(
    *c[:6], "-tanh" * c[6], "-pro" * c[7], "-bias" * c[8]))
def test_conv_layer_forward_and_backward(case, backend):
    conv_forward, conv_backward = GEN_LAUNCHERS[backend]["conv_forward"], GEN_LAUNCHERS[backend]["conv_backward"]
    k, b, cin, cout, h, up, tanh, prologue, has_bias = case
    g = torch.Generator().manual_seed(sum(case[:6]))
    x = torch.randn(k, b, cin, h, h, generator=g, dtype=torch.float64) + 0.2
    scale = (0.5 + torch.rand(k, cin, generator=g, dtype=torch.float64)) if prologue else None
    shift = torch.randn(k, cin, generator=g, dtype=torch.float64) if prologue else None
    w = torch.randn(k, cout, cin, 3, 3, generator=g, dtype=torch.float64) / (3 * cin**0.5)
    bias = torch.randn(k, cout, generator=g, dtype=torch.float64) if has_bias else None
    flags = dict(upsample=up, slope=0.2, tanh=tanh)
    launch = dict(flags, stats=True)

    def run_reference(dtype):
        ins = [_leaf(t.to(dtype)) if t is not None else None for t in (x, scale, shift, w, bias)]
        outs = conv_layer_reference(*ins, **flags)
        return ins, outs

    ins64, (y64, s1_64, s2_64) = run_reference(torch.float64)
    ins32, (y32, s1_32, s2_32) = run_reference(torch.float32)
    dy = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    d1 = torch.randn(k, cout, generator=g, dtype=torch.float64)
    d2 = 0.05 * torch.randn(k, cout, generator=g, dtype=torch.float64)
    torch.autograd.backward([y64, s1_64, s2_64], [dy, d1, d2])
    torch.autograd.backward([y32, s1_32, s2_32], [dy.float(), d1.float(), d2.float()])

    f = [t.float().to(DEVICE) if t is not None else None for t in (x, scale, shift, w, bias)]
    y, s1, s2 = conv_forward(*f, **launch)
    assert_within_torch_error(y, y64, y32, "y")
    assert_within_torch_error(s1, s1_64, s1_32, "sum y", atol=1e-4)
    assert_within_torch_error(s2, s2_64, s2_32, "sum y^2", atol=1e-4)
    dx, dscale, dshift, dw = conv_backward(f[0], f[1], f[2], f[3], y, dy.float().to(DEVICE), d1.float().to(DEVICE),
                                           d2.float().to(DEVICE), **flags)
    assert_within_torch_error(dx, ins64[0].grad, ins32[0].grad, "dx")
    assert_within_torch_error(dw, ins64[3].grad, ins32[3].grad, "dweight", atol=1e-4)
    if prologue:
        assert_within_torch_error(dscale, ins64[1].grad, ins32[1].grad, "dscale", atol=1e-4)
        assert_within_torch_error(dshift, ins64[2].grad, ins32[2].grad, "dshift", atol=1e-4)
    else:
        assert dscale is None and dshift is None


@pytest.mark.parametrize("k,b,classes,latent,d", [(1, 1, 1, 5, 16), (3, 7, 4, 33, 72), (5, 20, 10, 64, 130)])
def test_first_layer_gather_matches_onehot_matmul(k, b, classes, latent, d, backend):
    g = torch.Generator().manual_seed(k * b)
    z = torch.randn(k, b, latent, generator=g, dtype=torch.float64)
    wz = torch.randn(k, latent, d, generator=g, dtype=torch.float64)
    wy = torch.randn(k, classes, d, generator=g, dtype=torch.float64)
    local = torch.randint(0, classes, (k, b), generator=g)  # repeated labels: the scatter-add must sum them
    onehot = torch.nn.functional.one_hot(local, classes).double()
    ref = torch.bmm(torch.cat([z, onehot], 2), torch.cat([wz, wy], 1))
    h_ref, s1_ref, s2_ref = linear_gather_reference(z, wz, wy, local)
    torch.testing.assert_close(h_ref, ref)

    leaves = [_leaf(t.float().to(DEVICE)) for t in (z, wz, wy)]
    h, s1, s2 = gen_linear_gather(*leaves, local.to(DEVICE), backend)
    ins64 = [_leaf(t) for t in (z, wz, wy)]
    h64, a64, b64 = linear_gather_reference(*ins64, local)
    dh = torch.randn(h64.shape, generator=g, dtype=torch.float64)
    d1 = torch.randn(k, d, generator=g, dtype=torch.float64)
    d2 = 0.1 * torch.randn(k, d, generator=g, dtype=torch.float64)
    torch.autograd.backward([h64, a64, b64], [dh, d1, d2])
    torch.autograd.backward([h, s1, s2], [t.float().to(DEVICE) for t in (dh, d1, d2)])
    for got, want, name in [(h, h64, "h"), (s1, a64, "sum"), (s2, b64, "sum sq")] + [
            (a.grad, b_.grad, n) for a, b_, n in zip(leaves, ins64, ("dz", "dWz", "dWy"))]:
        torch.testing.assert_close(got.detach().double().cpu(), want.detach(), rtol=2e-5, atol=2e-4, msg=name)


# ------------------------------------------------------------------------- whole ensembles
ENSEMBLE_CASES = [
    # (K, B, image size, channels, output BN)
    (1, 3, 32, 1, False),
    (3, 5, 16, 3, True),
    (8, 3, 8, 3, True),
]


def _grads_as_ensemble(gens, num_classes):
    """Stack K standalone generators' gradients into the ensemble's parameter layout."""
    with torch.no_grad():
        for gen in gens:
            for p in gen.parameters():
                p.copy_(p.grad)
    return dict(GeneratorEnsemble.stack(gens, num_classes).named_parameters())


@pytest.mark.triton_heavy  # 95 s under the Triton interpreter: in make test-triton
@pytest.mark.parametrize("case", ENSEMBLE_CASES, ids=lambda c: "K{}B{}s{}c{}{}".format(*c[:4], "-outbn" * c[4]))
def test_kernel_path_equals_reference_and_standalone_generators(case, backend):
    k, b, size, channels, out_bn = case
    num_classes = 10
    classes = [[(2 * i) % num_classes, (2 * i + 1) % num_classes] for i in range(k)]
    ens = GeneratorEnsemble(k, num_classes, image_size=size, channels=channels, latent_dim=12, widths=(16, 8),
                            output_bn=out_bn, classes=classes)
    with torch.no_grad():  # non-trivial BN affine parameters
        for name, p in ens.named_parameters():
            if name.startswith(("bn", "out_scale")):
                p.add_(0.3 * torch.randn_like(p))
    z, y, _ = ens.draw(b, None, torch.Generator().manual_seed(k))
    dy = torch.randn(k, b, channels, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(module, dtype, backend):
        m = GeneratorEnsemble.from_config(ens.config()).to(DEVICE, dtype)
        m.load_state_dict(ens.state_dict())
        with fastdfd.backend(backend):
            out = m(z.to(DEVICE, dtype), y.to(DEVICE))
            out.backward(dy.to(DEVICE, dtype))
        return out.detach(), {n: p.grad for n, p in m.named_parameters()}

    out64, g64 = grads(ens, torch.float64, "torch")
    out32, g32 = grads(ens, torch.float32, "torch")
    outk, gk = grads(ens, torch.float32, backend)

    gens = GeneratorEnsemble.from_config(ens.config()).double()
    gens.load_state_dict(ens.state_dict())
    gens = gens.unbind()
    alone = torch.stack([gen(z[i].double(), y[i]) for i, gen in enumerate(gens)])
    for i, gen in enumerate(gens):
        gen.zero_grad()
    alone.backward(dy)
    g_alone = _grads_as_ensemble(gens, num_classes)

    torch.testing.assert_close(alone, out64)
    assert_within_torch_error(outk, out64, out32, "images")
    for name in g64:
        torch.testing.assert_close(g_alone[name], g64[name], msg=name)
        assert_within_torch_error(gk[name], g64[name], g32[name], f"grad {name}", atol=1e-4)


def test_sampling_path_keeps_no_autograd_state_and_matches_reference(backend):
    ens = GeneratorEnsemble(4, 4, image_size=8, channels=3, latent_dim=10, widths=(16, 8)).to(DEVICE)
    with fastdfd.backend(backend):
        x, labels = ens.sample(3, rng=torch.Generator(device=DEVICE).manual_seed(5))
    with fastdfd.backend("torch"):
        x_ref, labels_ref = ens.sample(3, rng=torch.Generator(device=DEVICE).manual_seed(5))
    assert x.grad_fn is None and not x.requires_grad
    torch.testing.assert_close(labels, labels_ref)
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)


def test_chunk_of_generators_through_the_kernels(backend):
    """A trainer's chunk (a subset of rows, in any order) runs through the same kernels."""
    ens = GeneratorEnsemble(6, 6, image_size=8, channels=1, latent_dim=8, widths=(16, 8)).to(DEVICE)
    rows = [4, 1, 5]
    z = torch.randn(3, 5, 8, device=DEVICE)
    y = torch.tensor(rows, device=DEVICE).unsqueeze(1).expand(3, 5)
    with fastdfd.backend(backend):
        out = ens(z, y, generators=rows)
        out.square().sum().backward()
    gk = ens.conv0_weight.grad.clone()
    ens.zero_grad()
    with fastdfd.backend("torch"):
        ref = ens(z, y, generators=rows)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gk, ens.conv0_weight.grad, rtol=1e-3, atol=1e-4)
    assert gk[[0, 2, 3]].abs().max() == 0  # generators outside the chunk get no gradient


def test_dispatch_picks_a_fused_backend_and_falls_back_for_float64():
    """fp32 on the CPU goes to cpp (or triton on a GPU); float64 is served by the torch reference."""
    from fastdfd.ops.dispatch import resolve

    ens = GeneratorEnsemble(2, 2, image_size=8, channels=1, latent_dim=4, widths=(16, 8)).to(DEVICE)
    want = {"cuda": "triton", "cpu": "cpp"}[DEVICE]
    require_backend(want, unavailable("ensemble_forward", want, ens.fc_z), "generator backend")
    assert resolve("ensemble_forward", ens.fc_z)[0] == want
    assert resolve("ensemble_forward", ens.fc_z.double())[0] == "torch"  # neither fused backend takes float64
    if DEVICE != "cpu":
        return
    with fastdfd.backend("cpp"), pytest.warns(RuntimeWarning, match="float64"):
        ens.double()(torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE),
                     torch.tensor([[0] * 3, [1] * 3], device=DEVICE))
