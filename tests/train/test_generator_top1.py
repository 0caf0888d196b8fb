"""Each generator's running teacher top-1 (fastdfd.train.generator_top1): the figure, chunks, resumes, CUDA graphs."""

import dataclasses

import pytest
import torch

from fastdfd import GeneratorEnsemble, GeneratorTrainer
from fastdfd.models import create_model
from fastdfd.train.generator_top1 import RunningTop1
from fastdfd.train.graphed_step import fx_capture
from fastdfd.train.schedule import ChunkSchedule

from ..conftest import randomize_bn_stats


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return randomize_bn_stats(create_model("digits_teacher", num_classes=8))


def _ensemble(k=4, seed=0):
    torch.manual_seed(seed)
    return GeneratorEnsemble(k, 8, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False,
                             classes=[[2 * i, 2 * i + 1] for i in range(k)])


def _trainer(teacher, ens=None, **kw):
    kw = {"batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 2, "input_space": "minus_one_one", **kw}
    return GeneratorTrainer(teacher, _ensemble() if ens is None else ens, **kw)


def test_each_generator_reads_its_own_images():
    """A teacher that answers class 5 whatever it sees: only generator 2 (classes 4 and 5) scores, about half its
    images (its labels are drawn evenly from its two classes); the others read exactly 0."""
    torch.manual_seed(0)
    fixed = randomize_bn_stats(create_model("digits_teacher", num_classes=8))
    with torch.no_grad():
        fixed.fc.bias[5] = 1e4
    tr = _trainer(fixed, batch_size=16)
    tr.fit(6)
    top1 = tr.generator_top1()
    assert top1[0] == top1[1] == top1[3] == 0.0
    assert 0.3 < top1[2] < 0.7


@pytest.mark.parametrize("chunk", [None, 3])
def test_it_is_the_bias_corrected_running_mean_of_each_generators_hits(teacher, monkeypatch, chunk):
    seen = []
    real = RunningTop1.update

    def spy(self, rows, hits):
        seen.append((None if rows is None else rows.tolist(), hits.tolist()))
        real(self, rows, hits)

    monkeypatch.setattr(RunningTop1, "update", spy)
    tr = _trainer(teacher, generators_per_step=chunk)
    probe = ChunkSchedule(4, chunk, seed=0)
    probe.load_state_dict(tr.schedule.state_dict())
    first = probe.next()
    tr.fit(1)
    if chunk is None:  # after one step: that step's top-1 per generator, whose mean is the logged figure
        assert sum(tr.generator_top1()) / 4 == pytest.approx(tr.history[0]["teacher_acc"], abs=1e-6)
    else:  # the generator that sat the step out has no figure yet
        assert [tr.generator_top1()[k] for k in range(4) if k not in first] == [0.0]
    tr.fit(11)
    running, count = [0.0] * 4, [0] * 4
    for step, (rows, hits) in enumerate(seen):
        rows = list(range(4)) if rows is None else rows
        assert sum(hits) / len(hits) == pytest.approx(tr.history[step]["teacher_acc"], abs=1e-6)
        for r, h in zip(rows, hits):
            running[r] = 0.9 * running[r] + 0.1 * h
            count[r] += 1
    assert any(h for _, hits in seen for h in hits)  # the figures are not all 0: the comparison below means something
    expected = [r / (1 - 0.9 ** c) if c else 0.0 for r, c in zip(running, count)]
    assert tr.generator_top1() == pytest.approx(expected, abs=1e-6)
    assert count == [int(a) for a in tr.optimizer.steps.tolist()]


def test_it_resumes_exactly_and_old_checkpoints_count_afresh(teacher, tmp_path):
    straight = _trainer(teacher, generators_per_step=3)
    straight.fit(9)
    first = _trainer(teacher, generators_per_step=3)
    first.fit(4)
    first.save(tmp_path / "mid.pt")
    resumed = _trainer(teacher, _ensemble(seed=9), generators_per_step=3)
    resumed.load(tmp_path / "mid.pt")
    resumed.fit(5)
    assert torch.equal(resumed.running_top1.running, straight.running_top1.running)
    assert resumed.generator_top1() == straight.generator_top1()
    state = torch.load(tmp_path / "mid.pt", weights_only=False)
    del state["running_top1"]  # a checkpoint written before the figure existed
    torch.save(state, tmp_path / "old.pt")
    old = _trainer(teacher, generators_per_step=3)
    old.load(tmp_path / "old.pt")
    assert old.step == 4 and old.generator_top1() == [0.0] * 4
    old.fit(5)  # from there, the mean of the steps since the resume, bias-corrected by their count alone
    assert old.running_top1.count.sum().item() == 5 * 3  # 5 steps of 3 generators, not the optimiser's counts
    assert old.running_top1.count.tolist() != old.optimizer.steps.tolist()
    with pytest.raises(ValueError, match="generators"):
        RunningTop1(3, torch.device("cpu")).load_state_dict(first.running_top1.state_dict())


@pytest.mark.parametrize("chunk", [None, 2])
def test_it_is_updated_inside_a_captured_step(teacher, chunk):
    eager = _trainer(teacher, generators_per_step=chunk, batch_size=3)
    eager.fit(7)
    graphed = _trainer(teacher, generators_per_step=chunk, batch_size=3)
    graphed.plan = dataclasses.replace(graphed.plan, cuda_graph=True, graph_reason=None)
    graphed._capture, graphed.GRAPH_WARMUP = fx_capture, 2  # a traced capture: a host sync in the step fails it
    graphed.fit(7)
    assert torch.equal(graphed.running_top1.running, eager.running_top1.running)
    assert torch.equal(graphed.running_top1.count, eager.running_top1.count)
    assert graphed.generator_top1() == eager.generator_top1()
