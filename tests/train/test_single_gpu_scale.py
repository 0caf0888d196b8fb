"""Scale on one GPU, checked on the CPU: the memory planner, offloaded states, bf16 and channels_last."""

import dataclasses

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
    assert plan_generator_memory(teacher, ens, 2, budget_bytes=100 * GIB).chunk == 8  # capped at K


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


def test_trainer_auto_chunk_on_cpu_fits_the_host_available_memory(monkeypatch):
    from fastdfd.train import memory

    teacher, ens = _setup(4)
    trainer = GeneratorTrainer(teacher, ens, batch_size=2, generators_per_step="auto", progress=False)
    available = memory.host_available_bytes()
    assert available is not None and available > 0  # /proc/meminfo on Linux
    assert trainer.schedule.chunk == 4 and 0 < trainer.memory_plan.budget_bytes <= available
    one = plan_generator_memory(teacher, ens, 2, chunk=1)
    # a host with room for 3 generators' steps gets a chunk of 3 (90% of what is available is the budget)
    monkeypatch.setattr(memory, "host_available_bytes",
                        lambda: int((one.resident_bytes + 3 * one.per_generator_bytes + 1) / 0.9) + 1)
    trainer = GeneratorTrainer(teacher, ens, batch_size=2, generators_per_step="auto", progress=False)
    assert trainer.schedule.chunk == 3 and "3 of 4 generators per step" in trainer.placement
    assert not trainer.memory_plan.cpu_capped


def test_the_cpu_auto_chunk_is_capped_where_bigger_steps_are_slower(monkeypatch):
    from fastdfd.train import memory

    teacher, ens = _setup(8)
    one = plan_generator_memory(teacher, ens, 2, chunk=1)
    monkeypatch.setattr(memory, "CPU_STEP_BYTES", int(2.5 * one.per_generator_bytes))
    plan = plan_generator_memory(teacher, ens, 2, budget_bytes=100 * GIB)
    assert plan.chunk == 2 and plan.cpu_capped and "capped at" in plan.describe()
    assert plan_generator_memory(teacher, ens, 2, device="cpu").chunk == 2  # also without a budget
    # an explicit chunk is the user's: never capped
    assert plan_generator_memory(teacher, ens, 2, chunk=6, budget_bytes=100 * GIB).chunk == 6


def test_bf16_autocast_and_channels_last_teacher_train_close_to_fp32():
    """The fast-path switches change rounding, not the objective."""
    from fastdfd.models import create_model as make

    from ..conftest import randomize_bn_stats

    def run(**kw):
        torch.manual_seed(0)
        teacher = randomize_bn_stats(make("digits_teacher", num_classes=10))
        ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
        return GeneratorTrainer(teacher, ens, batch_size=4, progress=False, **kw).fit(2)

    plain, fast = run(), run(autocast=True, channels_last=True)
    for a, b in zip(plain, fast):
        assert b["moment"] == pytest.approx(a["moment"], rel=0.05)
        assert b["ce"] == pytest.approx(a["ce"], rel=0.05)


def test_offloaded_adam_updates_exactly_like_the_resident_one():
    """The offload path (rows moved to the compute device and back) forced on the CPU: as 'cpu:0'."""
    from fastdfd.train.optim import StackedAdam

    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 3, 4, generator=g), "b": torch.randn(6, 5, generator=g)}
    resident = StackedAdam({k: v.clone() for k, v in params.items()}, lr=0.1)
    offloaded = StackedAdam({k: v.clone() for k, v in params.items()}, lr=0.1, compute_device="cpu:0")
    for rows in (torch.tensor([4, 1]), None, torch.tensor([0, 5, 2])):
        grads = {k: torch.randn((6 if rows is None else len(rows),) + v.shape[1:], generator=g)
                 for k, v in params.items()}
        resident.step(grads, rows)
        offloaded.step(grads, rows)
    for k in params:
        assert torch.equal(resident.params[k], offloaded.params[k])
        assert torch.equal(resident.exp_avg_sq[k], offloaded.exp_avg_sq[k])
    assert torch.equal(resident.steps, offloaded.steps)


def test_offloaded_trainer_matches_the_resident_trainer():
    from ..conftest import randomize_bn_stats

    def run(offload):
        torch.manual_seed(0)
        teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
        ens = GeneratorEnsemble(4, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False,
                                classes=[[0, 1], [2, 3], [4, 5], [6, 7]])
        trainer = GeneratorTrainer(teacher, ens, batch_size=2, generators_per_step=2, progress=False,
                                   offload=offload)
        if offload:  # the GPU path, forced on the CPU: the step runs on "cpu:0", states stay on "cpu"
            trainer.plan = dataclasses.replace(trainer.plan, compute_device=torch.device("cpu", 0))
            trainer.optimizer.compute_device = torch.device("cpu", 0)
        trainer.fit(3)
        return ens

    a, b = run(False), run(True)
    assert GeneratorTrainer(create_model("digits_teacher"), a, progress=False).placement.startswith(
        "generator parameters and Adam moments on cpu; 4 of 4 generators per step")
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name
