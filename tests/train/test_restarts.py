"""The restart of a failed generator (fastdfd.train.restarts): the running top-1, the row resets, exact resumes."""

import dataclasses

import pytest
import torch

from fastdfd import GeneratorEnsemble, GeneratorTrainer
from fastdfd.models import create_model
from fastdfd.settings import OptimizerSettings
from fastdfd.train import CheckpointError, StackedAdam
from fastdfd.train.graphed_step import fx_capture

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


# ------------------------------------------------------------- the row resets
def test_ensemble_reset_rows_is_reset_parameters_on_those_rows():
    ens = _ensemble()
    before = {n: p.detach().clone() for n, p in ens.named_parameters()}
    with torch.no_grad():
        for p in ens.parameters():
            p.add_(0.5)  # BN weights and biases off their init too
    moved = {n: p.detach().clone() for n, p in ens.named_parameters()}
    ens.reset_rows([1, 3], torch.Generator().manual_seed(7))
    for n, p in ens.named_parameters():
        for k in (0, 2):
            assert torch.equal(p[k], moved[n][k]), (n, k)  # the others untouched
        if n.startswith("bn") and n.endswith("_bias"):
            assert torch.equal(p[[1, 3]], torch.zeros_like(p[[1, 3]])), n
        elif n.startswith("bn"):
            assert torch.equal(p[[1, 3]], torch.ones_like(p[[1, 3]])), n
        else:  # drawn afresh, within PyTorch's default bound 1/sqrt(fan_in)
            fan_in = {"fc_z": 8 + 2, "fc_y": 8 + 2, "out_bias": 4 * 9}.get(n) or p.shape[2] * 9
            assert not torch.equal(p[[1, 3]], moved[n][[1, 3]]), n
            assert p[[1, 3]].abs().max() <= fan_in ** -0.5, n
            assert before[n].abs().max() <= fan_in ** -0.5, n  # the construction's draw, the same bound
    # every row reset with one generator == reset_parameters with the same generator (the same draws, in order)
    a, b = _ensemble(seed=1), _ensemble(seed=2)
    a.reset_parameters(torch.Generator().manual_seed(3))
    b.reset_rows([0, 1, 2, 3], torch.Generator().manual_seed(3))
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    for bad in ([], [4], [-1]):
        with pytest.raises(ValueError, match="generator indices"):
            ens.reset_rows(bad)


def test_stacked_adam_reset_rows_is_a_fresh_adam():
    torch.manual_seed(0)
    w = torch.randn(3, 5)
    opt = StackedAdam({"w": w}, lr=0.1)
    for _ in range(4):
        opt.step({"w": torch.randn(3, 5)})
    opt.reset_rows([1])
    assert opt.steps.tolist() == [4.0, 0.0, 4.0]
    assert torch.equal(opt.exp_avg["w"][1], torch.zeros(5)) and torch.equal(opt.exp_avg_sq["w"][1], torch.zeros(5))
    assert opt.exp_avg["w"][0].abs().sum() > 0
    # its next step is torch.optim.Adam's first step from the row's weights
    ref = torch.nn.Parameter(w[1].clone())
    adam = torch.optim.Adam([ref], lr=0.1)
    g = torch.randn(3, 5)
    ref.grad = g[1].clone()
    adam.step()
    opt.step({"w": g})
    torch.testing.assert_close(w[1], ref.detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------- in the trainer
def test_running_top1_is_the_steps_top1_and_restarts_are_off_by_default(teacher):
    tr = _trainer(teacher)
    tr.fit(1)
    top1 = tr.generator_top1()
    assert len(top1) == 4 and all(0 <= a <= 1 for a in top1)
    assert sum(top1) / 4 == pytest.approx(tr.history[0]["teacher_acc"], abs=1e-6)  # bias-corrected after one step
    tr.fit(9)
    assert tr.restarts.events == [] and tr.optimizer.steps.tolist() == [10.0] * 4
    assert "restart_below" not in tr.config() and "restart_after" not in tr.config()  # old checkpoints resume


def test_a_generator_below_the_floor_restarts_with_fresh_weights_and_adam(teacher):
    tr = _trainer(teacher, restart_below=1.0, restart_after=3)  # a floor of 100%: any imperfect generator fails
    tr.fit(3)
    before = {n: p.detach().clone() for n, p in tr.ensemble.named_parameters()}
    top1 = tr.generator_top1()
    tr.fit(1)  # step 4: a log step, every generator is 4 steps old
    failed = [k for k in range(4) if top1[k] < 1.0]  # (step 4's own hits may change a figure; none reach 1.0 here)
    assert failed and [e["generator"] for e in tr.restarts.events] == failed
    assert all(e["step"] == 4 for e in tr.restarts.events)
    for k in range(4):
        assert tr.optimizer.steps[k].item() == (0.0 if k in failed else 4.0)
    for k in failed:
        assert torch.equal(tr.ensemble.bn0_weight[k], torch.ones_like(tr.ensemble.bn0_weight[k]))
        assert not torch.equal(tr.ensemble.fc_z[k], before["fc_z"][k])
        assert tr.generator_top1()[k] == 0.0
        assert torch.equal(tr.optimizer.exp_avg["fc_z"][k], torch.zeros_like(tr.optimizer.exp_avg["fc_z"][k]))
    tr.fit(4)  # judged again only after restart_after steps of their own
    assert all(e["step"] in (4, 8) for e in tr.restarts.events)


def test_restarts_resume_exactly_with_chunks(teacher, tmp_path):
    kw = dict(restart_below=0.9, restart_after=2, generators_per_step=3)
    straight = _trainer(teacher, **kw)
    straight.fit(12)
    assert straight.restarts.events  # the test exercises restarts
    first = _trainer(teacher, **kw)
    first.fit(5)
    first.save(tmp_path / "mid.pt")
    resumed = _trainer(teacher, _ensemble(seed=9), **kw)
    resumed.load(tmp_path / "mid.pt")
    resumed.fit(7)
    assert resumed.restarts.events == straight.restarts.events
    for (n, a), (_, b) in zip(straight.ensemble.named_parameters(), resumed.ensemble.named_parameters()):
        assert torch.equal(a, b), n
    assert torch.equal(straight.restarts.running, resumed.restarts.running)
    plain = _trainer(teacher, generators_per_step=3)
    with pytest.raises(CheckpointError, match="restart_below"):
        plain.load(tmp_path / "mid.pt")


def test_restarts_inside_a_captured_step_match_eager(teacher):
    kw = dict(restart_below=0.9, restart_after=2, generators_per_step=2, batch_size=3)
    eager = _trainer(teacher, **kw)
    eager.fit(9)
    graphed = _trainer(teacher, **kw)
    graphed.plan = dataclasses.replace(graphed.plan, cuda_graph=True, graph_reason=None)
    graphed._capture, graphed.GRAPH_WARMUP = fx_capture, 2  # a traced capture: a host sync in the step fails it
    graphed.fit(9)
    assert eager.restarts.events and graphed.restarts.events == eager.restarts.events
    assert torch.equal(graphed.restarts.running, eager.restarts.running)
    for (n, a), (_, b) in zip(eager.ensemble.named_parameters(), graphed.ensemble.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("bad,match", [(dict(restart_below=1.5), "restart_below"),
                                       (dict(restart_below=-0.1), "restart_below"),
                                       (dict(restart_after=0), "restart_after")])
def test_bad_restart_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSettings(**bad)
