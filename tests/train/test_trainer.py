"""GeneratorTrainer, StackedAdam, the chunk schedule, checkpoints and the Distiller."""

import copy
import pytest
import torch
from torch import nn

from fastdfd import Distiller, GeneratorEnsemble, GeneratorTrainer, NonFiniteLossError
from fastdfd.models import create_model
from fastdfd.train import CheckpointError, ChunkSchedule, StackedAdam

from ..conftest import randomize_bn_stats


def small_ensemble(k=3, num_classes=3, seed=0):
    torch.manual_seed(seed)
    classes = None if num_classes % k == 0 else [[c for c in range(num_classes) if c % k == i][:num_classes // k]
                                                 for i in range(k)]
    return GeneratorEnsemble(k, num_classes, image_size=16, channels=1, latent_dim=8, widths=(8, 4),
                             output_bn=False, classes=classes)


def trainer(teacher, ens, **kw):
    # the digits teachers here take pixels scaled to [-1, 1], as the demo declares
    kw = {"batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 2, "input_space": "minus_one_one", **kw}
    return GeneratorTrainer(teacher, ens, **kw)


# ------------------------------------------------------------- StackedAdam
def test_stacked_adam_equals_independent_adams():
    k = 4
    g = torch.Generator().manual_seed(0)
    p = torch.randn(k, 3, 2, generator=g)
    ours = StackedAdam({"w": p}, lr=1e-2, betas=(0.5, 0.99), weight_decay=0.01)
    theirs = [torch.nn.Parameter(p[i].clone()) for i in range(k)]
    opts = [torch.optim.Adam([t], lr=1e-2, betas=(0.5, 0.99), weight_decay=0.01) for t in theirs]
    for step in range(12):
        rows = None if step % 3 == 0 else torch.randperm(k, generator=g)[:2].sort().values
        idx = list(range(k)) if rows is None else rows.tolist()
        grads = torch.randn(len(idx), 3, 2, generator=g)
        ours.step({"w": grads}, rows)
        for j, i in enumerate(idx):
            theirs[i].grad = grads[j].clone()
            opts[i].step()
    for i in range(k):
        torch.testing.assert_close(p[i], theirs[i].detach(), rtol=1e-6, atol=1e-7)


def test_chunk_schedule_is_even_and_has_no_repeats():
    s = ChunkSchedule(7, 3, seed=1)
    counts = [0] * 7
    for _ in range(50):
        chunk = s.next()
        assert len(chunk) == 3 == len(set(chunk))
        for c in chunk:
            counts[c] += 1
        assert max(counts) - min(counts) <= 2
    assert ChunkSchedule(5, None).next() is None
    with pytest.raises(ValueError, match="generators_per_step"):
        ChunkSchedule(5, 6)


# ------------------------------------------------------------------ trainer
def test_batched_generator_scope_equals_independent_trainings(digits_teacher):
    """Per-generator gradients of one batched step == each generator trained alone."""
    ens = small_ensemble(3, 3).double()
    teacher = digits_teacher.double()
    tr = trainer(teacher, ens, tv_weight=0.5, moment_weight=3.0, scope="generator")
    z, y, local = ens.draw(4, None, torch.Generator().manual_seed(3))
    z = z.double()
    params = ens.stacked()
    with tr._run() as matcher:
        total = tr.objective(params, z, y, local, matcher)[0]
        batched = torch.autograd.grad(total, list(params.values()))
    for k, gen in enumerate(ens.unbind()):
        alone = GeneratorEnsemble.stack([gen], num_classes=3).double()
        tr1 = trainer(teacher, alone, tv_weight=0.5, moment_weight=3.0, scope="generator")
        p1 = alone.stacked()
        with tr1._run() as matcher:
            t1 = tr1.objective(p1, z[k:k + 1], y[k:k + 1], local[k:k + 1] * 0, matcher)[0]
            single = torch.autograd.grad(t1, list(p1.values()))
        for name, gb, gs in zip(params, batched, single):
            torch.testing.assert_close(gb[k], gs[0], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("scope", ["generator", "ensemble"])
def test_training_reduces_the_loss_and_leaves_the_teacher_alone(digits_teacher, scope):
    teacher = digits_teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    teacher.train()
    ens = small_ensemble(2, 10) if scope == "ensemble" else small_ensemble(3, 3)
    tr = trainer(teacher, ens, scope=scope, lr=5e-2)
    hist = tr.fit(40)
    assert len(hist) == 40 and tr.step == 40
    first = hist[0]["loss"]
    last = sum(r["loss"] for r in hist[-5:]) / 5
    assert last < 0.7 * first
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(type(m).__name__ == "BNTap" for m in teacher.modules())


def test_chunked_training_touches_only_the_chunk(digits_teacher):
    ens = small_ensemble(4, 4)
    before = {n: p.detach().clone() for n, p in ens.named_parameters()}
    tr = trainer(digits_teacher, ens, generators_per_step=2)
    chunk_state = tr.schedule.state_dict()
    tr.fit(1)
    probe = ChunkSchedule(4, 2, seed=0)
    probe.load_state_dict(chunk_state)
    chunk = probe.next()
    for n, p in ens.named_parameters():
        for k in range(4):
            changed = not torch.equal(p[k], before[n][k])
            if n != "fc_y" or k in chunk:
                assert changed == (k in chunk), (n, k)


def test_checkpoint_resume_is_exact(digits_teacher, tmp_path):
    def run(steps_before_save, total):
        ens = small_ensemble(4, 4)
        tr = trainer(digits_teacher, ens, generators_per_step=3, checkpoint_dir=tmp_path / "ck")
        tr.fit(steps_before_save)
        if steps_before_save == total:
            return ens
        tr.save(tmp_path / "mid.pt")
        ens2 = small_ensemble(4, 4, seed=99)  # other init: everything must come from the file
        tr2 = trainer(digits_teacher, ens2, generators_per_step=3)
        tr2.load(tmp_path / "mid.pt")
        assert tr2.step == steps_before_save
        tr2.fit(total - steps_before_save)
        assert [r["step"] for r in tr2.history] == list(range(1, total + 1))
        return ens2

    straight = run(7, 7)
    resumed = run(3, 7)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_periodic_checkpoints_rotate_and_resume(digits_teacher, tmp_path):
    tr = trainer(digits_teacher, small_ensemble(), checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=2)
    tr.fit(7)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000004.pt", "step_00000006.pt"]
    tr2 = trainer(digits_teacher, small_ensemble(seed=5), checkpoint_dir=tmp_path)
    assert tr2.resume() and tr2.step == 6


def test_checkpoint_from_another_configuration_is_refused(digits_teacher, tmp_path):
    tr = trainer(digits_teacher, small_ensemble(3, 3))
    tr.fit(1)
    tr.save(tmp_path / "a.pt")
    other = trainer(digits_teacher, small_ensemble(4, 4))
    with pytest.raises(CheckpointError, match="num_generators: checkpoint 3 vs current 4"):
        other.load(tmp_path / "a.pt")
    other_lr = trainer(digits_teacher, small_ensemble(3, 3, seed=4), lr=0.5)
    before = {n: p.clone() for n, p in other_lr.ensemble.named_parameters()}
    with pytest.raises(CheckpointError, match="lr"):
        other_lr.load(tmp_path / "a.pt")
    assert other_lr.step == 0  # a refused checkpoint changes nothing
    assert all(torch.equal(p, before[n]) for n, p in other_lr.ensemble.named_parameters())
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        tr.load(tmp_path / "bad.pt")
    torch.save({"format": "something.else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastdfd.generator_trainer"):
        tr.load(tmp_path / "other.pt")


class NaNAfter(nn.Module):
    """A teacher whose logits turn to NaN from the n-th forward on."""

    def __init__(self, net, n):
        super().__init__()
        self.net, self.n, self.calls = net, n, 0

    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.calls >= self.n else out


def test_non_finite_loss_stops_with_step_and_term_and_keeps_last_checkpoint(digits_teacher, tmp_path):
    teacher = NaNAfter(digits_teacher, n=6)  # forward 1 is the trainer's probe; 2-5 are steps 1-4
    tr = trainer(teacher, small_ensemble(), checkpoint_dir=tmp_path, checkpoint_every=2, log_every=1)
    with pytest.raises(NonFiniteLossError, match="non-finite ce loss .* at step 5") as err:
        tr.fit(10)
    assert err.value.step == 5 and err.value.term == "ce"
    assert f"The last checkpoint, {tmp_path / 'step_00000004.pt'}, was written before" in str(err.value)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written before this step"):
        trainer(NaNAfter(digits_teacher, n=3), small_ensemble(), log_every=1).fit(4)
    # the same teacher (the checkpoints carry its fingerprint), now healthy
    good = trainer(NaNAfter(digits_teacher, n=10**9), small_ensemble(seed=3), checkpoint_dir=tmp_path)
    assert good.resume() and good.step == 4
    assert all(torch.isfinite(p).all() for p in good.ensemble.parameters())
    assert not any(type(m).__name__ == "BNTap" for m in teacher.modules())


def test_bad_trainer_settings(digits_teacher):
    ens = small_ensemble()
    with pytest.raises(ValueError, match="scope"):
        trainer(digits_teacher, ens, scope="class")
    with pytest.raises(ValueError, match="kind"):
        trainer(digits_teacher, ens, kind="js")
    with pytest.raises(ValueError, match="generators_per_step"):
        trainer(digits_teacher, ens, generators_per_step=9)
    with pytest.raises(TypeError, match="unknown setting.*checkpoint_evry.*checkpoint_every"):
        trainer(digits_teacher, ens, checkpoint_evry=5)  # a misspelt setting lists the known ones
    with pytest.raises(ValueError, match="LoopSettings.log_every = 0"):
        trainer(digits_teacher, ens, log_every=0)
    # checkpoint_every is the period where there is a directory: none without one
    assert trainer(digits_teacher, ens, checkpoint_every=5).checkpoint_every == 0
    with pytest.raises(ValueError, match="no BatchNorm"):
        trainer(nn.Sequential(nn.Flatten(), nn.Linear(256, 3)), ens).fit(1)


# ----------------------------------------------------------------- distiller
def distiller(teacher, ens, student, **kw):
    kw = {"batch_size": 8, "lr": 0.05, "progress": False, "log_every": 5, **kw}
    return Distiller(teacher, student, ens, **kw)


def test_distiller_reduces_kd_and_resumes_exactly(tmp_path):
    ens = small_ensemble(3, 3)
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=3))
    torch.manual_seed(1)
    student = create_model("digits_student", num_classes=3)
    d = distiller(teacher, ens, student, total_steps=40)
    hist = d.fit(40)
    assert sum(r["kd"] for r in hist[-5:]) < 0.5 * sum(r["kd"] for r in hist[:5])
    assert not teacher.training and student.training

    def run(split):
        torch.manual_seed(1)
        s = create_model("digits_student", num_classes=3)
        dd = distiller(teacher, ens, s, total_steps=10, generators_per_step=2)
        dd.fit(split)
        if split < 10:
            dd.save(tmp_path / "d.pt")
            torch.manual_seed(7)
            s = create_model("digits_student", num_classes=3)
            dd = distiller(teacher, ens, s, total_steps=10, generators_per_step=2)
            dd.load(tmp_path / "d.pt")
            dd.fit(10 - split)
        return s

    a, b = run(10), run(4)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    other = distiller(teacher, ens, create_model("digits_teacher", num_classes=3), total_steps=10,
                      generators_per_step=2)
    with pytest.raises(ValueError, match="another student"):
        other.load(tmp_path / "d.pt")


def test_distiller_evaluate():
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=3))
    twin = copy.deepcopy(teacher)  # a student that is the teacher is refused; its copy scores the teacher's labels
    d = distiller(teacher, small_ensemble(), twin)
    x = torch.randn(10, 1, 16, 16)
    y = teacher(x).argmax(1)
    assert d.evaluate([(x[:6], y[:6]), (x[6:], y[6:])]) == 1.0


def test_mean_normalization_is_the_folded_layer_weights(digits_teacher):
    """normalization='mean' on the trainer equals the summed form with layer weights 1/(C_l * L)."""
    bns = [(n, m) for n, m in digits_teacher.named_modules() if isinstance(m, nn.BatchNorm2d)]
    weights = {n: 1.0 / (m.num_features * len(bns)) for n, m in bns}
    a = trainer(digits_teacher, small_ensemble(k=2, num_classes=10), normalization="mean", scope="ensemble")
    b = trainer(digits_teacher, small_ensemble(k=2, num_classes=10), layer_weights=weights, scope="ensemble",
                normalization="sum")
    ha, hb = a.fit(2), b.fit(2)
    for ra, rb in zip(ha, hb):
        assert ra["moment"] == pytest.approx(rb["moment"], rel=1e-5)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert a.config()["normalization"] == "mean" and "normalization" not in b.config()  # sum: absent (old runs)
    with pytest.raises(ValueError, match="normalization"):
        trainer(digits_teacher, small_ensemble(), normalization="rms")


def test_l2_prior_adds_the_mean_square_of_the_input(digits_teacher):
    a = trainer(digits_teacher, small_ensemble(), l2_weight=0.5)
    b = trainer(digits_teacher, small_ensemble())
    assert a.config()["l2_weight"] == 0.5 and "l2_weight" not in b.config()
    ra, rb = a.fit(1)[0], b.fit(1)[0]  # the same first step's images (same seed and ensemble)
    assert ra["moment"] == pytest.approx(rb["moment"]) and ra["loss"] > rb["loss"]


def test_named_presets_build_a_trainer(digits_teacher):
    from fastdfd.settings import PRESETS, preset

    assert preset("paper").loss.normalization == "sum" and preset("paper").architecture.output_bn
    assert preset("paper").optimizer.batch_size == 64 and preset("paper").optimizer.lr == 1e-3
    for name in PRESETS:
        s = preset(name).replace(batch_size=2, widths=(8, 4), latent_dim=8)
        a = s.architecture
        ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=a.latent_dim, widths=a.widths,
                                output_bn=a.output_bn)
        t = GeneratorTrainer(digits_teacher, ens, loss=s.loss, optim=s.optimizer, progress=False,
                             input_space="minus_one_one")
        assert len(t.fit(1)) == 1  # builds and steps
        assert t.loss == s.loss and t.optim.batch_size == 2
        assert t.config()["normalization" if name == "default" else "scope"] == (
            "mean" if name == "default" else "generator")
    with pytest.raises(ValueError, match="known"):
        preset("nope")


def test_the_teacher_leaves_a_run_as_it_came_in(digits_teacher):
    """channels_last, eval mode and frozen parameters are the run's, not the teacher's: after fit (and after a
    failing step) the teacher's weights are the same tensors in their own layout, with their own flags."""
    teacher = copy.deepcopy(digits_teacher).train()
    teacher.features[0].weight.requires_grad_(False)  # a flag of the user's own
    before = {n: (p.data_ptr(), p.stride(), p.requires_grad) for n, p in teacher.named_parameters()}
    t = trainer(teacher, small_ensemble(k=2, num_classes=10), channels_last=True, scope="generator")
    assert t.plan.settings.channels_last and "channels_last for the run" in t.plan.describe()
    seen = []
    conv = next(m for m in teacher.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    hook = conv.register_forward_pre_hook(
        lambda m, inp: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    t.fit(2)
    hook.remove()
    assert seen and all(seen)  # the run's forwards see channels_last weights
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)  # the user's layout is back
    assert {n: (p.data_ptr(), p.stride(), p.requires_grad) for n, p in teacher.named_parameters()} == before
    assert teacher.training and all(m.training for m in teacher.modules())
