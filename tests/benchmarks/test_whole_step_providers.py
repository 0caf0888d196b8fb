"""The whole-step providers' variants compute the step they are compared on: the same loss and generator
gradients as the eager hooks, in the layout and on the generator backend their names say."""

from unittest import mock

import pytest
import torch

from benchmarks.providers import whole_step, whole_step_models, generator_step
from fastdfd.ops.generator import api as generator_api

VARIANTS = ["hooks-cl", "fastdfd-cpp", "fastdfd-cpp-cl", "fastdfd-cpp-gen", "fastdfd-cpp-gen-cl",
            "fastdfd-torch-gen-cl"]


@pytest.fixture(scope="module")
def reference():
    step, cleanup = whole_step("digits", "hooks")
    loss, grads = step()
    cleanup()
    return loss, grads


@pytest.mark.parametrize("provider", VARIANTS)
def test_each_variant_computes_the_hooks_step(reference, provider):
    step, cleanup = whole_step("digits", provider)
    loss, grads = step()
    cleanup()
    ref_loss, ref_grads = reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        # fp32 sums in another order (layout, generator kernels): a tolerance on the tensor's scale
        assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-7


def _run(provider):
    """(teacher, the activations a convolution of it saw, the generator backends resolved) of one step of
    ``provider``."""
    teacher, ens, batch = whole_step_models("digits")
    seen, backends = [], []
    # the first convolution that reads more than one channel (a 1-channel tensor is both layouts at once)
    conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    handle = conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    real_resolve = generator_api.resolve

    def resolve(op, x):
        name, fn = real_resolve(op, x)
        backends.append(name)
        return name, fn

    with mock.patch.object(generator_api, "resolve", resolve):
        step, cleanup = generator_step(provider, teacher, ens, batch=batch)
        step()
    cleanup()
    handle.remove()
    return teacher, seen[0], backends


def test_cl_puts_weights_and_images_channels_last_and_gen_runs_fastdfds_generators():
    teacher, x, backends = _run("fastdfd-cpp-gen-cl")
    cl = torch.channels_last
    assert x.is_contiguous(memory_format=cl) and not x.is_contiguous()
    assert all(p.is_contiguous(memory_format=cl) for p in teacher.parameters() if p.dim() == 4)
    assert backends == ["cpp"]

    teacher, x, backends = _run("fastdfd-cpp")
    assert x.is_contiguous() and backends == ["torch"]  # the grouped convolutions every provider shares


def test_gen_on_the_hooks_is_refused():
    teacher, ens, batch = whole_step_models("digits")
    with pytest.raises(ValueError, match="only a fastdfd provider"):
        generator_step("hooks-compiled-gen", teacher, ens, batch=batch)
