"""Synthetic-data quality: exact counting, no RNG side effects on training, files written."""

import json

import pytest
import torch
from torch import nn

from fastdfd import GeneratorEnsemble, GeneratorTrainer
from fastdfd.data import class_names_for, imagenet_class_names
from fastdfd.distributed import DistContext
from fastdfd.models import create_model
from fastdfd.pipeline import train_generators
from fastdfd.settings import LoopSettings, OptimizerSettings
from fastdfd.train.quality import generator_quality, write_quality


class ValueTeacher(nn.Module):
    """A BN teacher whose class is set by the image's mean value: class c for values nearest centers[c]."""

    def __init__(self, centers):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.register_buffer("centers", torch.tensor(centers))

    def forward(self, x):
        m = self.bn(x).mean(dim=(1, 2, 3))  # eval BN with default stats: identity up to eps
        return -(m[:, None] - self.centers[None, :]) ** 2 * 100


class ConstantTeacher(nn.Module):
    def __init__(self, num_classes, winner):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.num_classes, self.winner = num_classes, winner

    def forward(self, x):
        out = self.bn(x).mean(dim=(1, 2, 3))[:, None] * 0 + torch.zeros(1, self.num_classes)
        out[:, self.winner] = 1.0
        return out


def constant_ensemble(values, classes):
    """Generators whose every image is the constant tanh(values[k])."""
    ens = GeneratorEnsemble(len(values), 3, image_size=8, channels=1, latent_dim=4, widths=(4, 4),
                            output_bn=False, classes=classes)
    with torch.no_grad():
        ens.out_weight.zero_()
        ens.out_bias.copy_(torch.tensor(values).view(-1, 1))
    return ens


def test_exact_counts_per_class_and_overall():
    centers = [-0.5, 0.0, 0.5]
    teacher = ValueTeacher(centers).eval()
    # generator 0 -> class 0 (right), 1 -> class 1 (right), 2 -> its images read as class 0 (wrong)
    ens = constant_ensemble([float(torch.atanh(torch.tensor(v))) for v in (-0.5, 0.0, -0.5)], [[0], [1], [2]])
    r = generator_quality(teacher, ens, n_per_class=5, input_space="minus_one_one",
                          verifier=ConstantTeacher(3, winner=2).eval())
    assert r.classes == [0, 1, 2]
    assert r.teacher_counts == {0: 5, 1: 5, 2: 0}
    assert r.teacher_per_class == {0: 1.0, 1: 1.0, 2: 0.0}
    assert r.teacher_top1 == pytest.approx(2 / 3)
    assert r.verifier_per_class == {0: 0.0, 1: 0.0, 2: 1.0}
    assert r.verifier_top1 == pytest.approx(1 / 3)
    assert list(r.layer_distances) == ["bn"] and r.layer_distances["bn"] > 0
    assert r.samples.shape == (3, 5, 1, 8, 8)
    d = r.to_dict()
    assert d["teacher_top1_on_generated"] == pytest.approx(2 / 3)
    assert d["teacher_correct_per_class"] == {"0": 5, "1": 5, "2": 0}


def test_single_generator_of_every_class_counts_each_class():
    teacher = ConstantTeacher(4, winner=1).eval()
    ens = GeneratorEnsemble(1, 4, image_size=8, channels=1, latent_dim=4, widths=(4, 4), output_bn=False)
    r = generator_quality(teacher, ens, n_per_class=3, batch_size=5)
    assert r.teacher_counts == {0: 0, 1: 3, 2: 0, 3: 0}
    assert r.teacher_top1 == pytest.approx(0.25)


def test_modes_restored_and_no_global_rng_use():
    teacher = ConstantTeacher(3, 0)
    teacher.train()
    ens = constant_ensemble([0.1, 0.2, 0.3], [[0], [1], [2]])
    state = torch.get_rng_state()
    a = generator_quality(teacher, ens, n_per_class=2, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    assert teacher.training and teacher.bn.training
    assert teacher.bn.running_mean.item() == 0.0  # eval forward: statistics untouched
    b = generator_quality(teacher, ens, n_per_class=2, seed=7)
    assert torch.equal(a.samples, b.samples)


def _digits_trainer(ens, teacher, **kw):
    return GeneratorTrainer(teacher, ens, batch_size=4, lr=1e-2, progress=False, log_every=1, seed=3,
                            input_space="minus_one_one", **kw)


def _teacher():
    torch.manual_seed(0)
    return create_model("digits_teacher", num_classes=10).eval()


def _ens():
    torch.manual_seed(1)
    return GeneratorEnsemble(10, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)


def test_quality_between_fits_leaves_training_unchanged(tmp_path):
    teacher = _teacher()
    ens_a, ens_b = _ens(), _ens()
    a = _digits_trainer(ens_a, teacher, log_path=tmp_path / "a.csv")
    a.fit(2)
    report = a.quality(n_per_class=3)
    a.fit(2)
    b = _digits_trainer(ens_b, teacher)
    b.fit(4)
    for (name, pa), pb in zip(ens_a.named_parameters(), ens_b.parameters()):
        assert torch.equal(pa, pb), name
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert 0.0 <= report.teacher_top1 <= 1.0 and len(report.teacher_per_class) == 10
    rows = (tmp_path / "a_quality.csv").read_text().splitlines()
    assert rows[0] == "step,teacher_top1_on_generated" and rows[1].startswith("2,")


def test_pipeline_writes_quality_files(tmp_path):
    teacher = _teacher()
    torch.manual_seed(5)
    verifier = create_model("digits_student", num_classes=10).eval()
    summary = train_generators(teacher, _ens(), tmp_path, ctx=DistContext(), device=torch.device("cpu"), steps=2,
                               input_space="minus_one_one", optim=OptimizerSettings(batch_size=4),
                               loop=LoopSettings(progress=False), quality_per_class=4,
                               verifier=verifier, class_names=[str(i) for i in range(10)])
    q = json.loads((tmp_path / "quality.json").read_text())
    assert q["n_per_class"] == 4 and q["step"] == 2
    assert set(q["teacher_top1_per_class"]) == {str(i) for i in range(10)}
    assert q["teacher_top1_on_generated"] == summary["quality"]["teacher_top1_on_generated"]
    assert "verifier_top1_on_generated" in q and q["class_names"]["3"] == "3"
    assert len(q["moment_distance_per_layer"]) == len([m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)])
    assert (tmp_path / "quality_samples.png").stat().st_size > 0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "quality_moments.png").stat().st_size > 0
    assert (tmp_path / "metrics_quality.csv").read_text().startswith("step,teacher_top1_on_generated")
    assert json.loads((tmp_path / "summary.json").read_text())["quality"]["n_per_class"] == 4


def test_write_quality_without_matplotlib(tmp_path, monkeypatch):
    import fastdfd.train.quality as quality

    teacher = ValueTeacher([-0.5, 0.0, 0.5]).eval()
    r = generator_quality(teacher, constant_ensemble([0.0, 0.1, 0.2], [[0], [1], [2]]), n_per_class=2)
    monkeypatch.setattr(quality, "_matplotlib", lambda: None)
    written = write_quality(r, tmp_path)
    assert set(written) == {"quality", "samples"}
    assert (tmp_path / "quality_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_imagenet_names_ship_with_the_package():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[1] == "goldfish" and names[207] == "golden retriever"
    assert class_names_for(1000) is names and class_names_for(10) is None
