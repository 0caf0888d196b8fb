"""The memory planner: figures from shapes, the chunk it picks, and refusals with the figures."""

import pytest
import torch

from fastdfd import GeneratorEnsemble, GeneratorTrainer
from fastdfd.models import create_model
from fastdfd.train.memory import GIB, MemoryPlanError, plan_generator_memory


def _setup(k=8):
    teacher = create_model("resnet18", num_classes=10)
    ens = GeneratorEnsemble(k, 10, image_size=32, channels=3, widths=(32, 16), classes=[[i % 10] for i in range(k)])
    return teacher, ens


def test_plan_grows_linearly_with_the_chunk_and_picks_the_largest_that_fits():
    teacher, ens = _setup()
    one = plan_generator_memory(teacher, ens, 16, chunk=1)
    two = plan_generator_memory(teacher, ens, 16, chunk=2)
    assert two.total_bytes - one.total_bytes == one.per_generator_bytes > 0
    # a teacher image's activations alone are more than its input
    assert one.per_generator_bytes > 16 * 3 * 32 * 32 * 4
    budget = one.resident_bytes + 5 * one.per_generator_bytes + 1
    plan = plan_generator_memory(teacher, ens, 16, budget_bytes=budget)
    assert plan.chunk == 5 and plan.total_bytes <= budget
    assert plan_generator_memory(teacher, ens, 16, budget_bytes=100 * GIB).chunk == 8  # capped at K


def test_a_configuration_that_cannot_fit_is_refused_with_the_figures():
    teacher, ens = _setup()
    one = plan_generator_memory(teacher, ens, 16, chunk=1)
    with pytest.raises(MemoryPlanError, match=r"GiB resident .* > the 0\.\d\d GiB budget"):
        plan_generator_memory(teacher, ens, 16, budget_bytes=one.resident_bytes)
    with pytest.raises(MemoryPlanError, match="use at most 2 generators per step"):
        plan_generator_memory(teacher, ens, 16, chunk=4, budget_bytes=one.resident_bytes + 2 * one.per_generator_bytes)


def test_bf16_halves_the_activation_estimate():
    teacher, ens = _setup()
    fp32 = plan_generator_memory(teacher, ens, 16, chunk=1)
    bf16 = plan_generator_memory(teacher, ens, 16, chunk=1, dtype=torch.bfloat16)
    assert bf16.per_generator_bytes < 0.6 * fp32.per_generator_bytes


def test_trainer_auto_chunk_on_cpu_takes_every_generator():
    teacher, ens = _setup(4)
    trainer = GeneratorTrainer(teacher, ens, batch_size=2, generators_per_step="auto", progress=False)
    assert trainer.schedule.chunk == 4 and trainer.memory_plan.budget_bytes is None


def test_bf16_autocast_and_channels_last_teacher_train_close_to_fp32():
    """The fast-path switches change rounding, not the objective."""
    from fastdfd.models import create_model as make

    from .conftest import randomize_bn_stats

    def run(**kw):
        torch.manual_seed(0)
        teacher = randomize_bn_stats(make("digits_teacher", num_classes=10))
        ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
        return GeneratorTrainer(teacher, ens, batch_size=4, progress=False, **kw).fit(2)

    plain, fast = run(), run(autocast=True, channels_last=True)
    for a, b in zip(plain, fast):
        assert b["moment"] == pytest.approx(a["moment"], rel=0.05)
        assert b["ce"] == pytest.approx(a["ce"], rel=0.05)
