"""benchmarks.cifar10_real_pool at toy size on a synthetic test tar: the real-image diagnostic beside the CIFAR-10
benchmark learns from the tune half labelled by the teacher, scores the held-out half, and refuses bad flags."""

from __future__ import annotations

import json

import pytest
import torch

from .test_cifar10_datafree import data_dir  # noqa: F401  (the fixture: a synthetic tar and a teacher)


def test_the_pool_holds_the_tune_half_with_the_eval_teachers_logits_not_the_labels(data_dir):  # noqa: F811
    from benchmarks.cifar10_datafree import Settings, _loader, _teacher
    from benchmarks.cifar10_real_pool import real_pool

    s = Settings(data=str(data_dir), teacher="resnet20")
    teacher = _teacher(s).train()  # real_pool must label in eval mode whatever mode it is handed
    pool = real_pool(s, teacher)
    assert teacher.training  # its mode is restored
    # the images the benchmark scores the tune half with (its loader, in the teacher's input space): all 20 tune
    # images (two a class), in order, and none of the held-out ones
    expected = torch.cat([x for x, _ in _loader(s, "tune")])
    assert len(pool) == pool.pushed == 20
    torch.testing.assert_close(pool.images, expected)
    with torch.no_grad():
        torch.testing.assert_close(pool.logits, _teacher(s).eval()(expected))


def test_a_toy_run_learns_from_the_real_pool_for_exactly_its_steps(data_dir, tmp_path, monkeypatch):  # noqa: F811
    from benchmarks import cifar10_real_pool
    from benchmarks.cifar10_datafree import DISTILL
    from fastdfd.train import Distiller

    made, order = [], []

    class Spy(Distiller):  # the distiller the run makes: the real pool, the benchmark's settings, the schedule
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def fit(self, steps):
            order.append("fit")
            return super().fit(steps)

    real_loader = cifar10_real_pool._loader

    def loader(s, split):  # the held-out half is read only after training
        order.append(split)
        return real_loader(s, split)

    monkeypatch.setattr(cifar10_real_pool, "Distiller", Spy)
    monkeypatch.setattr(cifar10_real_pool, "_loader", loader)
    out = tmp_path / "run"
    result = cifar10_real_pool.main(["--data", str(data_dir), "--teacher", "resnet20", "--steps", "3",
                                     "--out", str(out)])
    (d,) = made
    assert d.settings == DISTILL and d.total_steps == 3 and len(d.pool) == 20 and d.step == 3
    assert d.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at zero
    assert order[0] == "fit" and "heldout" in order
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["distill_steps"] == 3 and result["distill"]["mix"] == "cutmix" and result["teacher"] == "resnet20"
    s = cifar10_real_pool.Settings(data=str(data_dir), teacher="resnet20")
    assert result["teacher_top1_heldout"] == cifar10_real_pool.evaluate_accuracy(
        cifar10_real_pool._teacher(s), real_loader(s, "heldout"), "cpu")
    assert f"({torch.backends.cpu.get_cpu_capability()})" in result["machine"]


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_a_step_count_that_is_not_positive_is_refused(data_dir, tmp_path, steps, capsys):  # noqa: F811
    from benchmarks import cifar10_real_pool

    with pytest.raises(SystemExit):
        cifar10_real_pool.main(["--data", str(data_dir), "--steps", steps, "--out", str(tmp_path / "x")])
    assert "--steps must be positive" in capsys.readouterr().err


def test_per_class_keeps_that_many_images_of_every_class_drawn_by_the_seed(data_dir):  # noqa: F811
    from benchmarks.cifar10_datafree import Settings, _loader, _teacher
    from benchmarks.cifar10_real_pool import real_pool

    tune = list(_loader(Settings(data=str(data_dir), teacher="resnet20"), "tune"))
    images, labels = torch.cat([x for x, _ in tune]), torch.cat([y for _, y in tune])
    picks = []
    for seed in range(6):
        s = Settings(data=str(data_dir), teacher="resnet20", seed=seed)
        pool = real_pool(s, _teacher(s), per_class=1)
        assert len(pool) == 10
        # each kept image is one of the tune half's, and the ten are one of each class
        distance = (pool.images[:, None] - images[None]).flatten(2).abs().amax(-1)  # [10, 20]
        assert (distance.amin(1) < 1e-5).all()
        index = distance.argmin(1)
        assert sorted(labels[index].tolist()) == list(range(10))
        assert real_pool(s, _teacher(s), per_class=1).images.equal(pool.images)  # the seed fixes the draw
        picks.append(tuple(index.tolist()))
    assert len(set(picks)) > 1  # and another seed draws another subset (two images a class to choose from)


def test_per_class_may_take_a_whole_class_and_the_run_records_it(data_dir, tmp_path, monkeypatch):  # noqa: F811
    from benchmarks import cifar10_real_pool
    from benchmarks.cifar10_datafree import Settings, _teacher

    s = Settings(data=str(data_dir), teacher="resnet20")
    assert len(cifar10_real_pool.real_pool(s, _teacher(s), per_class=2)) == 20  # the toy tar's two a class
    made = []

    class Spy(cifar10_real_pool.Distiller):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cifar10_real_pool, "Distiller", Spy)
    result = cifar10_real_pool.main(["--data", str(data_dir), "--teacher", "resnet20", "--steps", "1",
                                     "--per-class", "1", "--out", str(tmp_path / "run")])
    (d,) = made
    assert len(d.pool) == 10 and result["pool_images"] == 10 and result["per_class"] == 1


@pytest.mark.parametrize("k", [-1, 3])
def test_per_class_out_of_range_is_refused(data_dir, k):  # noqa: F811
    from benchmarks.cifar10_datafree import Settings, _teacher
    from benchmarks.cifar10_real_pool import real_pool

    s = Settings(data=str(data_dir), teacher="resnet20")
    with pytest.raises(ValueError, match="per_class"):
        real_pool(s, _teacher(s), per_class=k)  # the toy tar holds two tune images a class


def test_a_negative_per_class_flag_is_refused(data_dir, tmp_path, capsys):  # noqa: F811
    from benchmarks import cifar10_real_pool

    with pytest.raises(SystemExit):
        cifar10_real_pool.main(["--data", str(data_dir), "--per-class", "-2", "--out", str(tmp_path / "x")])
    assert "--per-class must be >= 0" in capsys.readouterr().err
