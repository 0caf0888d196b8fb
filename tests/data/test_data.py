"""Tests for fastdfd.data using tiny fake datasets written to tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdfd.data import (
    CIFAR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    load_digits_split,
    make_eval_loader,
)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(rng: np.random.Generator, n: int, num_classes: int, label_key: bytes):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    return data, labels, {b"data": data, label_key: labels, b"batch_label": b"fake"}


@pytest.fixture()
def cifar10_root(tmp_path: Path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    batches = {}
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        data, labels, obj = _batch(rng, n, 10, b"labels")
        _dump(base / name, obj)
        batches[name] = (data, labels)
    names = [f"class{i}".encode() for i in range(10)]
    _dump(base / "batches.meta", {b"label_names": names})
    return tmp_path, batches


@pytest.fixture()
def cifar100_root(tmp_path: Path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    batches = {}
    for name, n in [("train", 4), ("test", 3)]:
        data, labels, obj = _batch(rng, n, 100, b"fine_labels")
        obj[b"coarse_labels"] = [0] * n
        _dump(base / name, obj)
        batches[name] = (data, labels)
    return tmp_path, batches


# ---------------------------------------------------------------- CIFAR


def test_cifar10_test_split_shapes_labels_and_normalization(cifar10_root):
    root, batches = cifar10_root
    ds = CIFAR(root, name="cifar10", split="test")
    data, labels = batches["test_batch"]
    assert len(ds) == 3 and ds.num_classes == 10
    assert ds.classes == [f"class{i}" for i in range(10)]
    assert ds.images.shape == (3, 32, 32, 3) and ds.images.dtype == np.uint8
    assert list(ds.labels) == labels

    image, label = ds[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and label == labels[1]
    # Hand computation: CIFAR rows are R(1024) G(1024) B(1024), each row-major 32x32.
    raw = data[1]
    for c in range(3):
        for (y, x) in [(0, 0), (5, 17), (31, 31)]:
            value = raw[c * 1024 + y * 32 + x] / 255.0
            expected = (value - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
            assert image[c, y, x].item() == pytest.approx(expected, abs=1e-5)
    assert ds.images[1, 5, 17, 2] == raw[2 * 1024 + 5 * 32 + 17]


def test_cifar10_train_concatenates_batches_and_unnormalized(cifar10_root):
    root, batches = cifar10_root
    ds = CIFAR(root, name="cifar10", split="train", normalize=False)
    assert len(ds) == 10
    expected = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert list(ds.labels) == expected
    image, _ = ds[9]
    raw = batches["data_batch_5"][0][1].reshape(3, 32, 32) / 255.0
    assert torch.allclose(image, torch.from_numpy(raw).float(), atol=1e-6)
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_cifar_transform_applies_before_normalize(cifar10_root):
    root, _ = cifar10_root
    ds = CIFAR(root, transform=lambda t: torch.zeros_like(t))
    image, _ = ds[0]
    expected = (-torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)).view(3, 1, 1)
    assert torch.allclose(image, expected.expand(3, 32, 32))


def test_cifar100_fine_labels_and_stats(cifar100_root):
    root, batches = cifar100_root
    ds = CIFAR(root, name="cifar100", split="test")
    data, labels = batches["test"]
    assert len(ds) == 3 and ds.num_classes == 100 and len(ds.classes) == 100
    assert list(ds.labels) == labels
    image, label = ds[2]
    assert label == labels[2]
    value = data[2][1 * 1024 + 3 * 32 + 4] / 255.0
    expected = (value - CIFAR100_MEAN[1]) / CIFAR100_STD[1]
    assert image[1, 3, 4].item() == pytest.approx(expected, abs=1e-5)
    assert len(CIFAR(root, name="cifar100", split="train")) == 4


def test_cifar_missing_paths_are_named(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="never downloads") as err:
        CIFAR(missing)
    assert str(missing) in str(err.value)

    with pytest.raises(FileNotFoundError) as err:
        CIFAR(tmp_path, name="cifar100")
    assert str(tmp_path / "cifar-100-python") in str(err.value)

    rng = np.random.default_rng(2)
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_1", _batch(rng, 1, 10, b"labels")[2])
    with pytest.raises(FileNotFoundError) as err:
        CIFAR(tmp_path, split="train")
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_2") in str(err.value)


def test_cifar_rejects_bad_name_split_and_unsafe_pickle(cifar10_root, tmp_path: Path):
    root, _ = cifar10_root
    with pytest.raises(ValueError):
        CIFAR(root, name="cifar1000")
    with pytest.raises(ValueError):
        CIFAR(root, split="val")
    # A pickle naming an arbitrary callable must not be executed.
    evil = tmp_path / "evil" / "cifar-10-batches-py" / "test_batch"
    evil.parent.mkdir(parents=True)
    evil.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(pickle.UnpicklingError):
        CIFAR(tmp_path / "evil")


# ---------------------------------------------------------------- folders


def _write_folder(root: Path) -> dict:
    rng = np.random.default_rng(3)
    layout = {"cat": [(40, 30), (30, 30)], "ant": [(20, 50)], "bee": [(32, 32)]}
    arrays = {}
    for cls, sizes in layout.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            ext = ".PNG" if i else ".png"
            Image.fromarray(arr).save(root / cls / f"img{i}{ext}")
            arrays[(cls, i)] = arr
    (root / "cat" / "notes.txt").write_text("not an image")
    return arrays


def test_image_folder_classes_shapes_and_values(tmp_path: Path):
    arrays = _write_folder(tmp_path)
    ds = ImageFolder(tmp_path, image_size=28)
    assert ds.classes == ["ant", "bee", "cat"] and ds.num_classes == 3
    assert len(ds) == 4  # the .txt file is ignored, .PNG is accepted
    assert [label for _, label in ds.samples] == [0, 1, 2, 2]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 28, 28) and image.dtype == torch.float32
        assert isinstance(label, int)

    # 32x32 bee: resize target is round(28*256/224)=32, so only the center crop applies.
    image, _ = ds[1]
    crop = arrays[("bee", 0)][2:30, 2:30].transpose(2, 0, 1) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(crop).float() - mean) / std
    assert torch.allclose(image, expected, atol=1e-5)


def test_image_folder_grayscale_and_no_normalization(tmp_path: Path):
    _write_folder(tmp_path)
    ds = ImageFolder(tmp_path, image_size=16, mean=None, std=None, channels=1)
    image, _ = ds[0]
    assert image.shape == (1, 16, 16)
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_image_folder_missing_or_empty_root(tmp_path: Path):
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        ImageFolder(missing)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        ImageFolder(tmp_path)
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------- digits


def test_digits_split_shapes_range_and_stratification():
    split = load_digits_split()
    assert split.x_train.shape == (1347, 1, 16, 16)
    assert split.x_test.shape == (450, 1, 16, 16)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    everything = torch.cat([split.x_train, split.x_test])
    assert everything.min() >= -1.0 and everything.max() <= 1.0
    assert everything.min() == -1.0 and everything.max() == 1.0
    labels = torch.cat([split.y_train, split.y_test])
    totals = torch.bincount(labels, minlength=10)
    assert totals.sum() == 1797
    test_counts = torch.bincount(split.y_test, minlength=10)
    assert ((test_counts.float() - 0.25 * totals.float()).abs() <= 1.0).all()


def test_digits_split_native_size_and_determinism():
    a = load_digits_split(image_size=8, test_fraction=0.5, seed=3)
    b = load_digits_split(image_size=8, test_fraction=0.5, seed=3)
    c = load_digits_split(image_size=8, test_fraction=0.5, seed=4)
    assert a.x_test.shape[1:] == (1, 8, 8)
    assert len(a.y_train) + len(a.y_test) == 1797
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.y_test, c.y_test)
    # At native size the values are exactly the 0..16 grid mapped to [-1, 1].
    assert torch.equal(a.x_test * 8 + 8, (a.x_test * 8 + 8).round())


# ---------------------------------------------------------------- loaders


def test_make_eval_loader_digits():
    loader, num_classes = make_eval_loader("digits", batch_size=100)
    assert num_classes == 10
    x, y = next(iter(loader))
    assert x.shape == (100, 1, 16, 16) and y.dtype == torch.int64
    assert len(loader.dataset) == 450
    loader, _ = make_eval_loader("digits", image_size=8)
    assert next(iter(loader))[0].shape[-1] == 8


def test_make_eval_loader_cifar_and_folder(cifar10_root, cifar100_root, tmp_path: Path):
    root, _ = cifar10_root
    loader, num_classes = make_eval_loader(f"cifar10:{root}", batch_size=2)
    assert num_classes == 10 and len(loader.dataset) == 3
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == list(loader.dataset.labels[:2])

    loader, _ = make_eval_loader(f"cifar10:{root}", image_size=16)
    assert next(iter(loader))[0].shape == (3, 3, 16, 16)

    loader, num_classes = make_eval_loader(f"cifar100:{root}")
    assert num_classes == 100

    folder = tmp_path / "folder"
    _write_folder(folder)
    loader, num_classes = make_eval_loader(f"folder:{folder}", image_size=24)
    assert num_classes == 3
    assert next(iter(loader))[0].shape == (4, 3, 24, 24)


@pytest.mark.parametrize("spec", ["", "imagenet:/data", "cifar10", "cifar10:", "folder", "mnist"])
def test_make_eval_loader_rejects_unknown_specs(spec: str):
    with pytest.raises(ValueError) as err:
        make_eval_loader(spec)
    message = str(err.value)
    for form in ("digits", "cifar10:ROOT", "cifar100:ROOT", "folder:ROOT"):
        assert form in message


def test_make_eval_loader_missing_root_names_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as err:
        make_eval_loader(f"cifar10:{tmp_path / 'gone'}")
    assert str(tmp_path / "gone") in str(err.value)
