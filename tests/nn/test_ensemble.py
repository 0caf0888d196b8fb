"""GeneratorEnsemble: batched pass == K standalone generators, forward and gradients."""

import pytest
import torch

from fastdfd import GeneratorEnsemble
from fastdfd.models import Generator, GeneratorSpec


def inputs(ens, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(ens.num_generators, b, ens.spec.latent_dim, generator=g, dtype=torch.float64)
    local = torch.randint(0, ens.classes_per_generator, (ens.num_generators, b), generator=g)
    return z, ens.class_ids.gather(1, local)


@pytest.mark.parametrize("k,num_classes", [(1, 4), (3, 3), (10, 10), (3, 6)])
@pytest.mark.parametrize("output_bn", [True, False])
def test_batched_equals_standalone_forward_and_gradients(k, num_classes, output_bn):
    ens = GeneratorEnsemble(k, num_classes, image_size=8, channels=3, latent_dim=7, widths=(6, 5),
                            output_bn=output_bn).double()
    with torch.no_grad():  # non-trivial BN affine parameters
        for name, p in ens.named_parameters():
            if name.startswith("bn") or name == "out_scale":
                p.add_(0.1 * torch.randn_like(p))
    z, y = inputs(ens, b=5)
    out = ens(z, y)
    assert out.shape == (k, 5, 3, 8, 8)
    gens = ens.unbind()
    outs = torch.stack([g(z[i], y[i]) for i, g in enumerate(gens)])
    torch.testing.assert_close(out, outs, rtol=1e-10, atol=1e-10)

    w = torch.randn_like(out)
    grads = dict(zip(dict(ens.named_parameters()), torch.autograd.grad((out * w).sum(), list(ens.parameters()))))
    (outs * w).sum().backward()
    for i, g in enumerate(gens):
        fc = g.fc.weight.grad.t()
        torch.testing.assert_close(grads["fc_z"][i], fc[: ens.spec.latent_dim])
        torch.testing.assert_close(grads["fc_y"][i], fc[ens.spec.latent_dim:])
        torch.testing.assert_close(grads["bn0_weight"][i], g.bn0.weight.grad)
        for j, (conv, bn) in enumerate(zip(g.convs, g.bns)):
            torch.testing.assert_close(grads[f"conv{j}_weight"][i], conv.weight.grad)
            torch.testing.assert_close(grads[f"bn{j + 1}_bias"][i], bn.bias.grad)
        torch.testing.assert_close(grads["out_weight"][i], g.out.weight.grad)
        torch.testing.assert_close(grads["out_bias"][i], g.out.bias.grad)
        if output_bn:
            torch.testing.assert_close(grads["out_scale"][i], g.out_scale.grad)


def test_stack_roundtrip_and_subset_forward():
    ens = GeneratorEnsemble(4, 4, image_size=16, channels=1, latent_dim=5, widths=(4, 3, 2)).double()
    again = GeneratorEnsemble.stack(ens.unbind(), num_classes=4)
    for (n, a), (_, b) in zip(ens.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    z, y = inputs(ens, 3)
    full = ens(z, y)
    rows = [3, 1]
    part = ens(z[rows], y[rows], generators=rows)
    torch.testing.assert_close(part, full[rows])


@torch.no_grad()
def test_init_matches_standalone_distribution():
    # K freshly stacked generators should have the spread of PyTorch's default inits.
    ens = GeneratorEnsemble(64, 64, image_size=8, channels=3, latent_dim=20, widths=(16, 8))
    g = Generator([0], GeneratorSpec(8, 3, 20, (16, 8)))
    for ours, theirs in [(ens.conv0_weight, g.convs[0].weight), (ens.fc_z, g.fc.weight), (ens.out_bias, g.out.bias)]:
        assert abs(float(ours.std()) / float(theirs.std()) - 1) < 0.15
        assert float(ours.abs().max()) <= float(theirs.abs().max()) * 1.05 + 1e-6 or ours is ens.out_bias


def test_class_assignment():
    assert GeneratorEnsemble(10, 10, image_size=4, widths=(2,)).classes == [(c,) for c in range(10)]
    assert GeneratorEnsemble(1, 7, image_size=4, widths=(2,)).classes == [tuple(range(7))]
    assert GeneratorEnsemble(2, 6, image_size=4, widths=(2,)).classes == [(0, 1, 2), (3, 4, 5)]
    ens = GeneratorEnsemble(2, 5, classes=[[4, 0], [1, 2]], image_size=4, widths=(2,))
    x, labels = ens.sample(6)
    assert x.shape == (12, 3, 4, 4)
    assert set(labels[:6].tolist()) <= {0, 4} and set(labels[6:].tolist()) <= {1, 2}
    x, labels = ens.sample(2, generators=[1])
    assert x.shape == (2, 3, 4, 4) and set(labels.tolist()) <= {1, 2}


def test_sample_is_reproducible_with_a_generator():
    ens = GeneratorEnsemble(3, 3, image_size=8, widths=(4, 4))
    a = ens.sample(4, rng=torch.Generator().manual_seed(1))
    b = ens.sample(4, rng=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------- bad input
def test_bad_inputs():
    ens = GeneratorEnsemble(3, 6, image_size=8, latent_dim=4, widths=(4, 4))  # classes (0,1) (2,3) (4,5)
    z = torch.randn(3, 2, 4)
    y = torch.tensor([[0, 1], [2, 3], [4, 5]])
    ens(z, y)
    with pytest.raises(ValueError, match=r"z must be \[3, B, 4\]"):
        ens(torch.randn(2, 2, 4), y)
    with pytest.raises(ValueError, match=r"z must be"):
        ens(torch.randn(3, 2, 5), y)
    with pytest.raises(ValueError, match="y must be"):
        ens(z, y[:, :1])
    with pytest.raises(ValueError, match=r"outside generator 1's classes \[2, 3\]"):
        ens(z, torch.tensor([[0, 1], [2, 0], [4, 5]]))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        ens(z, torch.tensor([[0, 1], [2, 3], [4, 6]]))
    with pytest.raises(TypeError, match="integer"):
        ens(z, y.float())
    with pytest.raises(ValueError, match="evenly"):
        GeneratorEnsemble(4, 10)
    with pytest.raises(ValueError, match="same, non-zero number"):
        GeneratorEnsemble(2, 4, classes=[[0], [1, 2]])
    with pytest.raises(ValueError, match="distinct ids"):
        GeneratorEnsemble(2, 4, classes=[[0, 0], [1, 2]])
    with pytest.raises(ValueError, match="multiple of 2\\^len"):
        GeneratorEnsemble(1, 2, image_size=30)
    with pytest.raises(ValueError, match="indices"):
        ens.sample(2, generators=[3])
    with pytest.raises(ValueError, match="outside this generator's classes"):
        ens.unbind()[0](torch.randn(2, 4), torch.tensor([0, 3]))
