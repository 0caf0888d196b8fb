"""Teacher training: training splits and their augmentation, the SGD/cosine loop, presets, the CLI."""

from __future__ import annotations

import argparse
import csv
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastdfd.cli.commands import load_weights
from fastdfd.cli.teacher import add_teacher_command, default_eval_spec, settings_from_args
from fastdfd.data import CIFAR10_MEAN, CIFAR10_STD, load_digits_split, make_train_dataset
from fastdfd.data.train_sets import RandomCropFlip, RandomResizedCropFlip
from fastdfd.models import create_model
from fastdfd.train.teacher import TEACHER_PRESETS, TeacherSettings, cosine_lr, train_teacher

# ---------------------------------------------------------------- fixtures


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar(root: Path, name: str, per_batch: int = 2, seed: int = 0) -> Path:
    """torchvision's pickle layout with ``per_batch`` random images per batch file."""
    rng = np.random.default_rng(seed)
    folder, files, key, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10),
        "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels", 100),
    }[name]
    for file in files:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, size=per_batch)]
        _dump(root / folder / file, {b"data": data, key: labels})
    return root


@pytest.fixture()
def cifar10_root(tmp_path: Path) -> Path:
    return _fake_cifar(tmp_path / "c10", "cifar10")


@pytest.fixture()
def folder_root(tmp_path: Path) -> Path:
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for name in ("cat", "dog", "eel"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            array = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


def _crops_of(padded: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
    """Every crop + optional flip RandomCropFlip can return from a padded image."""
    ph, pw = padded.shape[-2:]
    out = []
    for top in range(ph - h + 1):
        for left in range(pw - w + 1):
            crop = padded[:, top : top + h, left : left + w]
            out += [crop, crop.flip(-1)]
    return out


def _matches_some(x: torch.Tensor, candidates: list[torch.Tensor], atol: float = 1e-5) -> bool:
    return any(torch.allclose(x, c, atol=atol) for c in candidates)


# ---------------------------------------------------------------- augmentation


def test_random_crop_flip_keeps_shape_is_seeded_and_really_crops_and_flips():
    image = torch.arange(3 * 8 * 10, dtype=torch.float32).view(3, 8, 10) + 1  # no zeros inside
    aug = RandomCropFlip(padding=2)
    torch.manual_seed(5)
    outs = [aug(image) for _ in range(60)]
    torch.manual_seed(5)
    again = [aug(image) for _ in range(60)]
    assert all(o.shape == image.shape and o.dtype == image.dtype for o in outs)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    candidates = _crops_of(torch.nn.functional.pad(image, (2, 2, 2, 2)), 8, 10)
    assert all(_matches_some(o, candidates) for o in outs)
    assert any((o == 0).any() for o in outs), "no draw shifted the image"
    # Along a row arange increases by 1; mirrored, it decreases by 1.
    assert any(o[0, 3, 4] != 0 and o[0, 3, 5] != 0 and o[0, 3, 5] - o[0, 3, 4] == -1 for o in outs), "none mirrored"
    assert any(o[0, 3, 4] != 0 and o[0, 3, 5] != 0 and o[0, 3, 5] - o[0, 3, 4] == 1 for o in outs), "all mirrored"
    assert len({tuple(o.flatten()[:40].tolist()) for o in outs}) > 10


def test_random_resized_crop_keeps_shape_and_varies():
    image = torch.rand(3, 16, 16)
    aug = RandomResizedCropFlip()
    torch.manual_seed(0)
    outs = [aug(image) for _ in range(20)]
    assert all(o.shape == image.shape and o.dtype == torch.float32 for o in outs)
    assert sum(not torch.allclose(o, image) for o in outs) >= 15
    torch.manual_seed(0)
    assert all(torch.equal(o, aug(image)) for o in outs)


def test_cifar_train_split_is_augmented_from_the_plain_items(cifar10_root):
    plain, n = make_train_dataset(f"cifar10:{cifar10_root}", augment=False)
    augmented, n2 = make_train_dataset(f"cifar10:{cifar10_root}")
    assert n == n2 == 10 and len(plain) == len(augmented) == 10  # five train batches of two
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    image, label = plain[3]
    raw = image * std + mean  # back to [0, 1], where the padding is black
    candidates = [(c - mean) / std for c in _crops_of(torch.nn.functional.pad(raw, (4, 4, 4, 4)), 32, 32)]
    torch.manual_seed(1)
    draws = [augmented[3] for _ in range(12)]
    assert all(y == label for _, y in draws)
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x, _ in draws)
    assert all(_matches_some(x, candidates, atol=1e-4) for x, _ in draws)
    assert sum(not torch.allclose(x, image) for x, _ in draws) >= 8
    torch.manual_seed(1)
    assert all(torch.equal(x, augmented[3][0]) for x, _ in draws)


def test_cifar_resize_and_cifar100(tmp_path):
    root = _fake_cifar(tmp_path, "cifar100", per_batch=3)
    dataset, n = make_train_dataset(f"cifar100:{root}", image_size=24)
    assert n == 100 and len(dataset) == 3 and dataset[0][0].shape == (3, 24, 24)


def test_loader_workers_reproduce_the_same_augmented_batches(cifar10_root):
    dataset, _ = make_train_dataset(f"cifar10:{cifar10_root}")

    def epoch():
        loader = DataLoader(dataset, batch_size=5, shuffle=True, num_workers=1,
                            generator=torch.Generator().manual_seed(3))
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(), epoch())


def test_digits_are_never_augmented():
    dataset, n = make_train_dataset("digits", augment=True)
    split = load_digits_split()
    assert n == 10 and len(dataset) == len(split.x_train)
    torch.manual_seed(0)
    for i in (0, 7, 100):
        x, y = dataset[i]
        assert torch.equal(x, split.x_train[i]) and int(y) == int(split.y_train[i])


def test_folder_train_split_augments(folder_root):
    plain, n = make_train_dataset(f"folder:{folder_root}", image_size=32, augment=False)
    augmented, _ = make_train_dataset(f"folder:{folder_root}", image_size=32)
    assert n == 3 and len(augmented) == 6
    torch.manual_seed(0)
    draws = [augmented[2][0] for _ in range(10)]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in draws)
    assert sum(not torch.allclose(x, plain[2][0]) for x in draws) >= 8
    assert augmented[2][1] == plain[2][1] == 1


def test_bad_specs_and_missing_roots_are_named(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        make_train_dataset("bogus:x")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        make_train_dataset(f"cifar10:{missing}")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        make_train_dataset(f"folder:{missing}")
    with pytest.raises(ValueError, match="image_size"):
        make_train_dataset("digits", image_size=0)


# ---------------------------------------------------------------- training


def _toy(n_per_class: int = 40, seed: int = 0) -> TensorDataset:
    """Three classes, 1x8x8: class k lights up its own third of the rows, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    x = 0.5 * torch.randn(len(labels), 1, 8, 8, generator=g)
    for k in range(3):
        x[labels == k, :, 3 * k : 3 * k + 2] += 1.5
    return TensorDataset(x, labels)


def _tiny(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d((4, 1)), nn.Flatten(), nn.Linear(32, num_classes),
    )


def _quick(**kw) -> TeacherSettings:
    return TeacherSettings(**{"epochs": 6, "batch_size": 16, "lr": 0.05, "workers": 0, **kw})


def test_train_teacher_learns_logs_and_saves(tmp_path):
    train, test = _toy(), _toy(seed=1)
    model = _tiny()
    log, ckpt = tmp_path / "log" / "metrics.csv", tmp_path / "teacher.pt"
    result = train_teacher(model, train, _quick(), eval_loader=DataLoader(test, batch_size=64),
                           log_path=log, checkpoint_path=ckpt)
    history = result["history"]
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert result["accuracy"] == history[-1]["accuracy"] >= 0.9  # chance is 1/3
    assert history[-1]["train_acc"] >= 0.9 and all(r["seconds"] >= 0 for r in history)
    assert not model.training
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "lr", "accuracy", "seconds"] and len(rows) == 6
    fresh = _tiny()
    fresh.load_state_dict(torch.load(ckpt, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # A second run into the same log replaces it instead of appending.
    train_teacher(_tiny(), train, _quick(epochs=1), log_path=log)
    with open(log) as f:
        assert len(list(csv.DictReader(f))) == 1


def test_seeded_runs_are_identical():
    runs = [train_teacher(_tiny(), _toy(), _quick(epochs=2), seed=7)["history"] for _ in range(2)]
    assert [r["train_loss"] for r in runs[0]] == [r["train_loss"] for r in runs[1]]
    assert "accuracy" not in runs[0][0]


def test_learning_rate_follows_a_per_step_cosine():
    epochs, lr = 5, 0.08
    history = train_teacher(_tiny(), _toy(), _quick(epochs=epochs, lr=lr))["history"]
    expected = [0.5 * lr * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    assert [r["lr"] for r in history] == pytest.approx(expected, rel=1e-9)
    # Per step, with warm-up: linear to 1, then half a cosine to 0.
    assert [cosine_lr(s, 10, 2) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert cosine_lr(6, 10, 2) == pytest.approx(0.5) and cosine_lr(10, 10, 2) == pytest.approx(0.0)
    warm = train_teacher(_tiny(), _toy(), _quick(epochs=3, warmup_epochs=1, lr=lr))["history"]
    steps = math.ceil(120 / 16)
    assert warm[0]["lr"] == pytest.approx(lr / steps) and warm[1]["lr"] == pytest.approx(lr)


def test_presets_and_defaults():
    default = TeacherSettings()
    assert (default.epochs, default.batch_size, default.lr, default.momentum, default.nesterov,
            default.weight_decay, default.warmup_epochs, default.label_smoothing) == (
            200, 128, 0.1, 0.9, True, 5e-4, 0, 0.0)
    assert TEACHER_PRESETS["resnet34_cifar"] == default
    wrn = TEACHER_PRESETS["wrn40_2_cifar"]
    assert (wrn.epochs, wrn.batch_size, wrn.lr, wrn.momentum, wrn.nesterov, wrn.weight_decay) == (
        240, 64, 0.05, 0.9, False, 5e-4)


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": -0.1}, {"momentum": 1.0}, {"weight_decay": -1.0},
    {"warmup_epochs": 6}, {"label_smoothing": 1.0}, {"workers": -1}, {"momentum": 0.0, "nesterov": True},
])
def test_bad_settings_are_refused(bad):
    field = next(iter(bad)) if "nesterov" not in bad else "nesterov"
    with pytest.raises(ValueError, match=field):
        _quick(**bad)


def test_refusals_happen_before_any_work(tmp_path, cifar10_root):
    log = tmp_path / "metrics.csv"
    model = _tiny(num_classes=5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"5 classes.*3 classes"):
        train_teacher(model, _toy(), _quick(), log_path=log, checkpoint_path=tmp_path / "t.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not log.exists() and not (tmp_path / "t.pt").exists()
    with pytest.raises(ValueError, match="empty"):
        train_teacher(_tiny(), TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), _quick())
    cifar, _ = make_train_dataset(f"cifar10:{cifar10_root}")
    with pytest.raises(ValueError, match=r"100 classes.*10 classes"):
        train_teacher(create_model("wrn16_1", num_classes=100), cifar, _quick())
    with pytest.raises(TypeError, match="TeacherSettings"):
        train_teacher(_tiny(), _toy(), {"epochs": 1})


# ---------------------------------------------------------------- command line


def _run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="fastdfd")
    add_teacher_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train-teacher", *argv])
    return args.func(args)


def test_cli_trains_writes_files_and_the_checkpoint_loads(tmp_path, cifar10_root):
    out = tmp_path / "run"
    summary = _run(["--model", "wrn16_1", "--data", f"cifar10:{cifar10_root}", "--epochs", "2",
                    "--batch-size", "5", "--lr", "0.01", "--workers", "0", "--no-progress", "--out", str(out)])
    assert {p.name for p in out.iterdir()} - {"tensorboard"} == {"teacher.pt", "teacher.pt.sha256", "metrics.csv", "summary.json"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["eval"] == f"cifar10:{cifar10_root}" and 0.0 <= on_disk["accuracy"] <= 1.0
    assert on_disk["settings"]["epochs"] == 2 and on_disk["settings"]["lr"] == 0.01
    assert on_disk["settings"]["weight_decay"] == 5e-4 and on_disk["preset"] == "resnet34_cifar"
    assert on_disk["num_classes"] == 10 and on_disk["channels"] == 3 and on_disk["image_size"] == 32
    assert set(on_disk["versions"]) == {"fastdfd", "torch", "python"}
    with open(out / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    load_weights(create_model("wrn16_1", num_classes=10), out / "teacher.pt", "teacher")


def test_cli_digits_default_eval(tmp_path):
    summary = _run(["--model", "digits_teacher", "--data", "digits", "--image-size", "8", "--epochs", "1",
                    "--batch-size", "64", "--lr", "0.05", "--workers", "0", "--no-progress", "--out", str(tmp_path)])
    assert summary["eval"] == "digits" and summary["channels"] == 1 and summary["image_size"] == 8
    # One epoch: the training accuracy is past chance (0.1); the BN running statistics
    # that eval uses are still settling, so its accuracy is only checked to exist.
    assert summary["train_acc"] > 0.2 and 0.0 <= summary["accuracy"] <= 1.0


def test_cli_refusals_name_the_figures_and_paths(tmp_path, cifar10_root):
    out = tmp_path / "never"
    base = ["--model", "wrn16_1", "--workers", "0", "--out", str(out)]
    with pytest.raises(ValueError, match=r"100.*10 classes"):
        _run([*base, "--data", f"cifar10:{cifar10_root}", "--num-classes", "100"])
    with pytest.raises(ValueError, match=r"--channels is 1.*3-channel"):
        _run([*base, "--data", f"cifar10:{cifar10_root}", "--channels", "1"])
    with pytest.raises(ValueError, match=r"100 classes.*10"):
        _run([*base, "--data", f"cifar10:{cifar10_root}", "--eval", f"cifar100:{_fake_cifar(tmp_path, 'cifar100')}"])
    missing = tmp_path / "no_cifar"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _run([*base, "--data", f"cifar10:{missing}"])
    with pytest.raises(SystemExit) as e:  # a bad value is argparse's one-line error naming the flag
        _run([*base, "--data", f"cifar10:{cifar10_root}", "--epochs", "0"])
    assert e.value.code == 2
    assert not out.exists()


def test_cli_settings_start_from_the_preset():
    parser = argparse.ArgumentParser()
    add_teacher_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-teacher", "--model", "wrn40_2", "--data", "digits", "--out", "x",
                              "--preset", "wrn40_2_cifar", "--lr", "0.02", "--nesterov", "--label-smoothing", "0.1"])
    settings = settings_from_args(args)
    assert settings == TeacherSettings(epochs=240, batch_size=64, lr=0.02, nesterov=True, label_smoothing=0.1)
    assert default_eval_spec("cifar100:/d") == "cifar100:/d" and default_eval_spec("folder:/d") is None
