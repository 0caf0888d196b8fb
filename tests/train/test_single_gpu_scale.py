"""Scale on one GPU, checked on the CPU: the memory planner, offloaded states, bf16 and channels_last."""

import dataclasses
import math

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
    # a host with room for 3.5 generators' steps gets a chunk of 3: the budget is 90% of what is available plus
    # what the run already holds (the teacher, the ensemble and its Adam moments: the plan's resident bytes)
    monkeypatch.setattr(memory, "host_available_bytes",
                        lambda: int((one.resident_bytes + 3.5 * one.per_generator_bytes) / 0.9) - one.resident_bytes)
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


@pytest.mark.parametrize("loss", [{}, {"jitter": 2, "flip": True}])
def test_offloaded_trainer_matches_the_resident_trainer(loss):
    from ..conftest import randomize_bn_stats

    def run(offload):
        torch.manual_seed(0)
        teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
        ens = GeneratorEnsemble(4, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False,
                                classes=[[0, 1], [2, 3], [4, 5], [6, 7]])
        trainer = GeneratorTrainer(teacher, ens, batch_size=2, generators_per_step=2, progress=False,
                                   offload=offload, **loss)
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


def test_an_offloaded_step_is_planned_on_the_device_it_runs_on(monkeypatch):
    """Under offload the ensemble and Adam stay on the host: the step's device holds the teacher and the chunk's
    rows, its own budget applies, and no CPU cap does on a GPU."""
    from fastdfd.train import memory

    teacher, ens = _setup(8)
    monkeypatch.setattr(memory, "CPU_STEP_BYTES", 1)  # would cap any CPU plan at one generator
    resident = plan_generator_memory(teacher, ens, 2, device="cuda", budget_bytes=100 * GIB)
    off = plan_generator_memory(teacher, ens, 2, device="cuda", offload=True, budget_bytes=100 * GIB)
    ens_bytes = sum(p.numel() * p.element_size() for p in ens.parameters())
    teacher_bytes = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    assert resident.chunk == off.chunk == 8 and not off.cpu_capped
    assert off.resident_bytes == teacher_bytes and resident.resident_bytes == teacher_bytes + 3 * ens_bytes
    assert off.per_generator_bytes - resident.per_generator_bytes == 2 * ens_bytes // 8  # the chunk's Adam rows


def test_the_budget_counts_what_the_run_already_holds_once(monkeypatch):
    """The free memory is read after the teacher and the ensemble exist; the plan counts them as resident, so the
    budget adds them back instead of subtracting them twice."""
    from fastdfd.train import memory

    teacher, ens = _setup(8)
    one = plan_generator_memory(teacher, ens, 2, chunk=1, budget_bytes=100 * GIB)
    held = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers(), *ens.parameters()])
    free = int(one.resident_bytes + 5.5 * one.per_generator_bytes) - held  # what the host has left besides
    monkeypatch.setattr(memory, "host_available_bytes", lambda: int(free / 0.9) + 1)
    plan = plan_generator_memory(teacher, ens, 2, device="cpu")
    assert plan.budget_bytes == int(0.9 * (int(free / 0.9) + 1 + held)) and plan.chunk == 5


def test_an_auto_chunk_resumes_with_the_checkpoints_chunk(tmp_path, monkeypatch):
    """'auto' picks its chunk from the memory free at the start; a resume on a host with more free memory goes on
    with the checkpoint's chunk and ends exactly as the uninterrupted run."""
    from fastdfd.train import memory

    from ..conftest import randomize_bn_stats

    def make():
        torch.manual_seed(0)
        teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
        ens = GeneratorEnsemble(4, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False,
                                classes=[[0, 1], [2, 3], [4, 5], [6, 7]])
        return teacher, ens

    teacher, ens = make()
    one = plan_generator_memory(teacher, ens, 2, chunk=1, budget_bytes=100 * GIB)
    room = {"chunk": 2}
    # free besides what the run holds (its resident bytes, which the budget adds back): room for chunk + 0.5
    monkeypatch.setattr(memory, "host_available_bytes",
                        lambda: int((one.resident_bytes + (room["chunk"] + 0.5) * one.per_generator_bytes) / 0.9)
                        - one.resident_bytes)

    def trainer(teacher, ens, **kw):
        return GeneratorTrainer(teacher, ens, batch_size=2, generators_per_step="auto", progress=False,
                                checkpoint_every=2, **kw)

    whole = trainer(*make())
    assert whole.schedule.chunk == 2
    whole.fit(5)
    first = trainer(*make(), checkpoint_dir=tmp_path)
    first.fit(2)
    room["chunk"] = 3  # more memory free at the resume
    teacher, ens = make()
    again = trainer(teacher, ens, checkpoint_dir=tmp_path)
    assert again.schedule.chunk == 3
    assert again.resume() and again.schedule.chunk == 2 and again.plan.chunk == 2 and again.step == 2
    again.fit(3)
    for name, p in whole.ensemble.state_dict().items():
        assert torch.equal(p, again.ensemble.state_dict()[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (on a CPU 'cpu:0' is 'cpu': the step's "
                                                          "draws crossing to the compute device cannot be seen)")
def test_offloaded_gpu_step_takes_its_jitter_draws_to_the_gpu():
    from ..conftest import randomize_bn_stats

    torch.manual_seed(0)
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10)).cuda()
    ens = GeneratorEnsemble(4, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False,
                            classes=[[0, 1], [2, 3], [4, 5], [6, 7]])  # on the host: offloaded
    trainer = GeneratorTrainer(teacher, ens, batch_size=2, generators_per_step=2, progress=False, offload=True,
                               jitter=2, flip=True)
    assert trainer.compute_device.type == "cuda"
    rows = trainer.fit(2)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
