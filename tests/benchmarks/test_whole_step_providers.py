"""The whole-step providers' variants compute the step they are compared on: the same loss and generator
gradients as the eager hooks, in the layout and on the generator backend their names say."""

from unittest import mock

import pytest
import torch

from benchmarks.providers import generator_step, whole_step, whole_step_models
from fastdfd.ops.dispatch import unavailable
from fastdfd.ops.generator import api as generator_api


VARIANTS = ["fastdfd-cpp", "fastdfd-cpp-cl", "fastdfd-cpp-gen", "fastdfd-cpp-gen-cl",
            "fastdfd-torch-gen-cl"]


@pytest.fixture
def cpp():
    """The -gen and fastdfd-cpp variants run the cpp kernels: built on first use, absent where no compiler is."""
    why = unavailable("ensemble_forward", "cpp", torch.empty(0))
    if why:
        pytest.skip(f"the cpp backend is unavailable here: {why}")


@pytest.fixture(scope="module")
def reference():
    """The eager hooks' step in each layout: {"contiguous": (loss, grads), "channels_last": (loss, grads)}."""
    out = {}
    for layout, provider in (("contiguous", "hooks"), ("channels_last", "hooks-cl")):
        step, cleanup = whole_step("digits", provider)
        out[layout] = step()
        cleanup()
    return out


def _assert_same_step(got, want, rel):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        # fp32 sums in another order (generator kernels): a tolerance on the tensor's scale
        assert (g - r).abs().max() <= rel * r.abs().max() + 1e-7


def test_the_channels_last_hooks_step_is_the_contiguous_one_to_pytorchs_rounding(reference):
    # PyTorch's own channels_last convolutions sum in another order; on an AVX-512 CPU (oneDNN) the step's
    # gradients move by up to 2.5e-3 norm-wise and 1.3% of a tensor's scale element-wise against the contiguous
    # step (on the AVX2 CPU within 1e-4), in the plain hooks as in every fastdfd -cl variant alike: so the
    # variants are held to the hooks of their own layout below, and the layouts to each other here, loosely
    (loss, grads), (ref_loss, ref_grads) = reference["channels_last"], reference["contiguous"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 1e-2 * r.norm() and (g - r).abs().max() <= 5e-2 * r.abs().max() + 1e-7


@pytest.mark.parametrize("provider", VARIANTS)  # hooks-cl is the channels_last reference itself
def test_each_variant_computes_the_hooks_step(cpp, reference, provider):
    step, cleanup = whole_step("digits", provider)
    got = step()
    cleanup()
    _assert_same_step(got, reference["channels_last" if provider.endswith("-cl") else "contiguous"], 1e-4)


def _run(provider):
    """(whether the teacher's 4-D weights were channels_last during the step, the images it was fed, the
    activations a convolution of it saw, the generator backends resolved) of one step of ``provider``, on a small
    3-channel case (a 1-channel tensor is both layouts at once): ResNet-20, 2 generators x 2 images at 32 px."""
    from benchmarks.providers import randomize_bn
    from fastdfd import GeneratorEnsemble
    from fastdfd.models import create_model

    torch.manual_seed(0)
    teacher = randomize_bn(create_model("cifar_resnet20", num_classes=10))
    ens = GeneratorEnsemble(2, 10, image_size=32, channels=3, latent_dim=8, widths=(8, 4), output_bn=False)
    batch = 2
    images, seen, backends = [], [], []
    conv = [m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)][1]  # one inside the network
    weights_cl = []
    handles = [teacher.register_forward_pre_hook(lambda m, args: images.append(args[0])),
               teacher.register_forward_pre_hook(lambda m, args: weights_cl.append(all(
                   p.is_contiguous(memory_format=torch.channels_last) for p in m.parameters() if p.dim() == 4))),
               conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
    real_resolve = generator_api.resolve

    def resolve(op, x):
        name, fn = real_resolve(op, x)
        backends.append(name)
        return name, fn

    with mock.patch.object(generator_api, "resolve", resolve):
        step, cleanup = generator_step(provider, teacher, ens, batch=batch)
        step()
    cleanup()
    for h in handles:
        h.remove()
    return weights_cl[0], images[0], seen[0], backends


def test_cl_puts_weights_and_images_channels_last_and_gen_runs_fastdfds_generators(cpp, monkeypatch):
    monkeypatch.delenv("FASTDFD_BACKEND", raising=False)  # -gen takes the automatic choice, which this would force
    weights_cl, images, x, backends = _run("fastdfd-cpp-gen-cl")
    assert images.shape[1] == 3 and images.is_contiguous(memory_format=torch.channels_last)
    assert not images.is_contiguous()
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert weights_cl and backends == ["cpp"]

    weights_cl, images, x, backends = _run("fastdfd-cpp")
    assert not weights_cl and images.is_contiguous() and x.is_contiguous()
    assert backends == ["torch"]  # the grouped convolutions every provider shares

    # -gen is the generators' own choice, not the matcher's backend: the torch tap with the cpp generators
    _, _, _, backends = _run("fastdfd-torch-gen")
    assert backends == ["cpp"]


def test_cl_puts_the_teachers_tensors_back_at_cleanup():
    teacher, ens, batch = whole_step_models("digits")
    def storage():
        return {name: (p.data_ptr(), p.stride()) for name, p in teacher.named_parameters()}

    before = storage()
    step, cleanup = generator_step("hooks-cl", teacher, ens, batch=batch)
    step()
    assert storage() != before  # converted inside
    cleanup()
    assert storage() == before  # the very tensors put back


def test_gen_on_the_hooks_is_refused():
    teacher, ens, batch = whole_step_models("digits")
    with pytest.raises(ValueError, match="only a fastdfd provider"):
        generator_step("hooks-compiled-gen", teacher, ens, batch=batch)
