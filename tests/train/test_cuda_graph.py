"""CUDA-graph capture of the generator step (fastdfd.train.graphed_step).

On a CPU the capture is replaced by two stand-ins: ``direct_capture`` (fn called again at each
replay; checks the static-buffer plumbing) and ``fx_capture`` (fn's Python runs once on fake
tensors and the recorded ops are replayed on the real tensors: the semantics of a CUDA graph,
so a value baked in at capture time shows up as a divergence from eager training).
"""

import contextlib
import dataclasses

import pytest
import torch

from fastdfd import GeneratorEnsemble, GeneratorTrainer
from fastdfd.distributed import DistContext
from fastdfd.models import create_model
from fastdfd.train.graphed_step import GraphedStep, direct_capture, fx_capture
from fastdfd.train.optim import StackedAdam
from fastdfd.train.plan import graph_obstacles

from ..conftest import randomize_bn_stats

CAPTURES = {"direct": direct_capture, "fx": fx_capture}


def _ensemble(k=4):
    torch.manual_seed(0)
    return GeneratorEnsemble(k, 8, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False,
                             classes=[[2 * i, 2 * i + 1] for i in range(k)] if k == 4 else None)


def _trainer(teacher, capture=None, warmup=2, **kw):
    kw = {"batch_size": 3, "lr": 1e-2, "progress": False, "log_every": 2, "generators_per_step": 2, **kw}
    tr = GeneratorTrainer(teacher, _ensemble(), **kw)
    if capture is not None:  # the graphed path forced on the CPU, with a stand-in for the capture
        tr.plan = dataclasses.replace(tr.plan, cuda_graph=True, graph_reason=None)
        tr._capture, tr.GRAPH_WARMUP = capture, warmup
    return tr


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return randomize_bn_stats(create_model("digits_teacher", num_classes=8))


def _state(tr):
    opt = tr.optimizer
    return {**{n: p.detach() for n, p in tr.ensemble.named_parameters()},
            **{f"m.{n}": t for n, t in opt.exp_avg.items()}, **{f"v.{n}": t for n, t in opt.exp_avg_sq.items()},
            "steps": opt.steps, "running_top1": tr.running_top1.running, "running_top1_count": tr.running_top1.count}


def _assert_same(a, b):
    sa, sb = _state(a), _state(b)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert [r["step"] for r in a.history] == [r["step"] for r in b.history]
    for ra, rb in zip(a.history, b.history):
        for term in a.TERMS:
            assert ra[term] == rb[term], (ra["step"], term)


@contextlib.contextmanager
def spy_graphs():
    """Inside, every GraphedStep made is appended to the yielded list."""
    made = []
    real_init = GraphedStep.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        made.append(self)

    GraphedStep.__init__ = spy
    try:
        yield made
    finally:
        GraphedStep.__init__ = real_init


# ------------------------------------------------------------- static buffers on the CPU
@pytest.mark.parametrize("capture", list(CAPTURES))
@pytest.mark.parametrize("chunk,scope", [(2, "generator"), (None, "generator"), (2, "ensemble")])
def test_static_buffer_step_is_bit_identical_to_eager(teacher, capture, chunk, scope):
    """Warm-up steps, the capture and 4 replays (chunked: every step other rows) == eager, bit for bit."""
    eager = _trainer(teacher, generators_per_step=chunk, scope=scope, tv_weight=0.1)
    eager.fit(7)
    graphed = _trainer(teacher, CAPTURES[capture], generators_per_step=chunk, scope=scope, tv_weight=0.1)
    with spy_graphs() as made:
        graphed.fit(7)
    assert len(made) == 1 and made[0].captured and made[0].calls == 7  # one chunk size, one graph
    _assert_same(eager, graphed)
    assert graphed._graphs == {}  # released with the fit's matcher


@pytest.mark.parametrize("capture", list(CAPTURES))
def test_graphed_resume_matches_straight_eager_run(teacher, capture, tmp_path):
    straight = _trainer(teacher)
    straight.fit(8)
    first = _trainer(teacher, CAPTURES[capture])
    first.fit(3)  # ends inside the warm-up
    first.fit(2)  # a second fit captures again (its own matcher)
    first.save(tmp_path / "mid.pt")
    resumed = _trainer(teacher, CAPTURES[capture])
    with torch.no_grad():
        for p in resumed.ensemble.parameters():
            p.add_(1.0)  # everything must come from the file
    resumed.load(tmp_path / "mid.pt")
    resumed.fit(3)
    _assert_same(straight, resumed)


def test_stale_latents_would_be_caught(teacher, monkeypatch):
    """If the buffers were filled only once, the run would differ from eager: the check above can fail."""
    eager = _trainer(teacher)
    eager.fit(5)
    real_fill = GraphedStep._fill

    def fill_once(self, inputs):
        if self.calls == 0:
            real_fill(self, inputs)

    monkeypatch.setattr(GraphedStep, "_fill", fill_once)
    stale = _trainer(teacher, direct_capture)
    stale.fit(5)
    assert not torch.equal(eager.ensemble.fc_z, stale.ensemble.fc_z)
    assert eager.history[-1]["loss"] != stale.history[-1]["loss"]


def test_a_step_count_baked_at_capture_would_be_caught(teacher, monkeypatch):
    """A host-side Adam step counter is right eagerly but frozen by a capture: fx_capture sees it."""
    def host_counter(self, rows_host, device):
        self.host_t = getattr(self, "host_t", 0) + 1  # a Python number: baked in at capture
        b1, b2 = self.betas
        t = torch.full((self.num_rows,), float(self.host_t), dtype=torch.float64, device=device)
        self.steps.copy_(t)
        return (self.lr / (1 - b1**t)).float(), (1 - b2**t).sqrt().float()

    eager = _trainer(teacher, generators_per_step=None)  # every row every step: the host counter is right
    eager.fit(6)
    monkeypatch.setattr(StackedAdam, "_corrections", host_counter)
    eager_host = _trainer(teacher, generators_per_step=None)
    eager_host.fit(6)
    _assert_same(eager, eager_host)
    baked = _trainer(teacher, fx_capture, generators_per_step=None)
    baked.fit(6)
    assert not torch.equal(eager.optimizer.steps, baked.optimizer.steps)
    assert not torch.equal(eager.ensemble.fc_z, baked.ensemble.fc_z)


def test_a_host_sync_inside_the_step_fails_the_capture(teacher, monkeypatch):
    """fx_capture runs the step on fake tensors: a .item() inside fails there, as in a CUDA capture."""
    real = GeneratorTrainer._train_step

    def syncing(self, *args):
        out = real(self, *args)
        if out[0].item() < 0:
            raise AssertionError
        return out

    monkeypatch.setattr(GeneratorTrainer, "_train_step", syncing)
    tr = _trainer(teacher, fx_capture, warmup=1)
    with pytest.raises(Exception, match="(?i)data.dependent|item|fake|symbolic"):
        tr.fit(2)


def test_graphed_step_unit():
    buf = {"x": torch.zeros(3), "none": None}
    total = torch.zeros(3)

    def fn():
        total.add_(buf["x"])
        return total * 2

    step = GraphedStep(fn, buf, state=[total], warmup=2, capture=fx_capture)
    outs = [step(x=torch.full((3,), float(i)), none=None) for i in range(1, 6)]
    assert step.captured and step.calls == 5
    assert [float(o[0]) for o in outs] == [2.0, 6.0, 12.0, 20.0, 30.0]  # each call's own output kept
    with pytest.raises(ValueError, match="shape"):
        step(x=torch.zeros(4), none=None)
    with pytest.raises(ValueError, match="static buffers"):
        step(x=torch.zeros(3))
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(fn, buf, warmup=0)


# ------------------------------------------------------------------------- refusals
def test_cuda_graph_true_is_refused_with_the_reasons(teacher):
    with pytest.raises(ValueError, match="not on a CUDA device"):
        _trainer(teacher, cuda_graph=True)
    with pytest.raises(ValueError, match="offload"):
        _trainer(teacher, cuda_graph=True, offload=True)
    with pytest.raises(ValueError, match="scope='ensemble' over 2 processes"):
        _trainer(teacher, cuda_graph=True, scope="ensemble", distributed=DistContext(0, 2))
    with pytest.raises(ValueError, match="cuda_graph = 'yes': expected off, auto or on"):
        _trainer(teacher, cuda_graph="yes")


def test_obstacles_name_only_what_blocks_capture(teacher):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")  # as if on a GPU (nothing runs)
    common = dict(offload=False, world=2, pool=False, optimizer_obstacle=None)
    assert graph_obstacles(compute_device=cuda, device=cuda, scope="generator", **common) == []  # no collective
    assert "processes" in graph_obstacles(compute_device=cuda, device=cuda, scope="ensemble", **common)[0]
    assert "offload" in graph_obstacles(compute_device=cuda, device=cpu, scope="generator", **common)[0]
    tr = _trainer(teacher, scope="generator", distributed=DistContext(0, 2), cuda_graph="auto")
    assert tr.graph_refusal == "the step runs on cpu, not on a CUDA device"
    assert "offload" in StackedAdam({"w": torch.zeros(2, 3)}, compute_device="cpu:0").graph_obstacle()


def test_auto_falls_back_to_eager_on_the_cpu_and_says_why(teacher):
    tr = _trainer(teacher, cuda_graph="auto")
    assert tr.cuda_graph is False
    assert "CUDA graph off: the step runs on cpu" in tr.placement
    assert "not on a CUDA device" in tr.graph_refusal
    tr.fit(1)
    assert _trainer(teacher).cuda_graph is False and "CUDA graph" not in _trainer(teacher).placement


def test_cli_flag(tmp_path, teacher_file, capsys):
    from fastdfd.cli import main

    args = ["train-generators", "--teacher", "digits_teacher", "--weights", str(teacher_file), "--num-classes", "10",
            "--channels", "1", "--image-size", "16", "--widths", "8,4", "--latent-dim", "8", "--steps", "2",
            "--batch-size", "2", "--generators-per-step", "5", "--checkpoint-every", "0", "--out", str(tmp_path / "run")]
    assert main([*args, "--cuda-graph"]) == 0  # auto: eager on a CPU, and says why
    assert "CUDA graph off: the step runs on cpu" in capsys.readouterr().out
    assert main([*args, "--cuda-graph", "on", "--overwrite"]) != 0
    assert "cannot be captured in a CUDA graph: the step runs on cpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("chunk", [2, None])
def test_captured_step_matches_eager_on_cuda_and_resumes(teacher, chunk, tmp_path):
    teacher = teacher.cuda()

    def run(graph, steps, load=None, warmup=3):
        torch.manual_seed(0)
        ens = _ensemble().cuda()
        tr = GeneratorTrainer(teacher, ens, batch_size=3, lr=1e-2, progress=False, log_every=2,
                              generators_per_step=chunk, cuda_graph=graph)
        tr.GRAPH_WARMUP = warmup
        if load is not None:
            tr.load(load)
        tr.fit(steps)
        return tr

    eager = run(False, 6)
    graphed = run(True, 6)
    assert graphed.cuda_graph and "CUDA graph" in graphed.placement
    for (name, a), b in zip(eager.ensemble.named_parameters(), graphed.ensemble.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    for ra, rb in zip(eager.history, graphed.history):
        assert rb["step"] == ra["step"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    assert torch.equal(eager.optimizer.steps, graphed.optimizer.steps)
    # resume: 4 graphed steps, save, 2 more in a new trainer == the 6-step run
    part = run(True, 4)
    part.save(tmp_path / "mid.pt")
    resumed = run(True, 2, load=tmp_path / "mid.pt", warmup=1)  # captured at its 2nd step
    for (name, a), b in zip(graphed.ensemble.named_parameters(), resumed.ensemble.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
