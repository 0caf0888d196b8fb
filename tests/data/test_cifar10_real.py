"""The field's CIFAR-10 ResNets (option A) and the JPEG test tar: layout, splits, bad input, and the
pretrained teachers' figures on the held-out half (those skip where ../shared/data is absent)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdfd.data import CIFAR10_CLASSES, CIFAR10JPEG, make_eval_loader, make_train_dataset
from fastdfd.input_space import InputSpace
from fastdfd.models import create_model
from fastdfd.models.resnet_cifar_a import CifarResNetA, OptionAShortcut
from fastdfd.models.weights import load_weights
from fastdfd.train.evaluate import evaluate_accuracy

SHARED = Path(os.environ.get("FASTDFD_CIFAR10_DIR", Path(__file__).resolve().parents[2].parent / "shared/data/cifar10"))
needs_shared = pytest.mark.skipif(not (SHARED / "test.tar").is_file(),
                                  reason=f"the real CIFAR-10 data is not at {SHARED} (set FASTDFD_CIFAR10_DIR)")


@pytest.mark.parametrize("depth, params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_option_a_resnets_have_the_published_parameter_counts(depth, params):
    model = create_model(f"cifar_resnet{depth}", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # 3 * n blocks, 2 BN each, plus the stem's: 6n + 1 = depth - 1 BN layers, no projection shortcut
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == depth - 1


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(3, 16, 7, 9)
    out = OptionAShortcut(8)(x)
    assert out.shape == (3, 32, 4, 5)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_option_a_rejects_depths_that_are_not_6n_plus_2():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNetA(21)


def test_reference_layout_checkpoint_loads_with_module_prefixes(tmp_path):
    """A checkpoint as the reference repository writes it: {"state_dict": {"module.<key>": ...}, "best_prec1": ...}."""
    src = create_model("cifar_resnet20", num_classes=10)
    state = {f"module.{k}": v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / "resnet20.th"
    torch.save({"state_dict": state, "best_prec1": 91.7}, path)
    dst = load_weights(create_model("cifar_resnet20", num_classes=10), path, "teacher")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    with pytest.raises(ValueError, match="do not match the architecture"):
        load_weights(create_model("cifar_resnet32", num_classes=10), path, "teacher")


def _write_tar(path: Path, per_class: dict[str, list[int]], size=(32, 32), extra: str | None = None) -> dict:
    """A tar in the test/<class>/NNNN.jpg layout; returns {(class, number): uint8 pixels as decoded}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    decoded = {}
    with tarfile.open(path, "w") as tar:
        for cls, numbers in per_class.items():
            for n in numbers:
                img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                data = buf.getvalue()
                decoded[(cls, n)] = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
                info = tarfile.TarInfo(f"test/{cls}/{n:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            info = tarfile.TarInfo(extra)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    return decoded


def test_jpeg_tar_splits_order_values_and_spaces(tmp_path):
    decoded = _write_tar(tmp_path / "test.tar", {"cat": [501, 3, 0], "airplane": [999, 499], "truck": [500]})
    tune = CIFAR10JPEG(tmp_path, split="tune", normalize=False)
    held = CIFAR10JPEG(tmp_path / "test.tar", split="heldout", normalize=False)
    every = CIFAR10JPEG(tmp_path, split="all", normalize=False)
    assert tune.labels.tolist() == [0, 3, 3] and held.labels.tolist() == [0, 3, 9] and len(every) == 6
    assert torch.equal(tune[1][0], torch.from_numpy(decoded[("cat", 0)]).permute(2, 0, 1).float() / 255)
    assert torch.equal(held.pixels()[2], torch.from_numpy(decoded[("truck", 500)]).permute(2, 0, 1).float() / 255)
    assert tune.classes == list(CIFAR10_CLASSES) and tune.num_classes == 10
    # the loaders: the native (CIFAR-10 mean/std) space, and any other space from the same pixels
    pixels = held.pixels()
    native, n_classes = make_eval_loader(f"cifar10-jpeg-heldout:{tmp_path}", batch_size=8)
    assert n_classes == 10
    assert torch.allclose(next(iter(native))[0], InputSpace.preset("cifar10").normalize(pixels), atol=1e-5)
    imagenet, _ = make_eval_loader(f"cifar10-jpeg-heldout:{tmp_path}", batch_size=8, input_space="imagenet")
    assert torch.allclose(next(iter(imagenet))[0], InputSpace.preset("imagenet").normalize(pixels), atol=1e-5)
    small, _ = make_eval_loader(f"cifar10-jpeg:{tmp_path}", batch_size=8, image_size=16, input_space="identity")
    x, y = next(iter(small))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 3, 3, 3, 9]
    assert torch.allclose(x, F.interpolate(every.pixels(), size=16, mode="bilinear", align_corners=False), atol=1e-6)


def test_jpeg_tar_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.tar"):
        CIFAR10JPEG(tmp_path)
    _write_tar(tmp_path / "test.tar", {"cat": [1]})
    with pytest.raises(ValueError, match="split must be one of"):
        CIFAR10JPEG(tmp_path, split="train")
    with pytest.raises(ValueError, match="no files numbered 0500-0999"):
        CIFAR10JPEG(tmp_path, split="heldout")
    with pytest.raises(ValueError, match="evaluation source, not training data"):
        make_train_dataset(f"cifar10-jpeg:{tmp_path}")
    _write_tar(tmp_path / "odd.tar", {"kitten": [1]})
    with pytest.raises(ValueError, match="unexpected member 'test/kitten/0001.jpg'"):
        CIFAR10JPEG(tmp_path / "odd.tar")
    _write_tar(tmp_path / "big.tar", {"cat": [1]}, size=(33, 32))
    with pytest.raises(ValueError, match="not 32x32"):
        CIFAR10JPEG(tmp_path / "big.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ValueError, match="not a readable tar"):
        CIFAR10JPEG(tmp_path / "junk.tar")


@needs_shared
@pytest.mark.parametrize("depth, top1", [(20, 0.8104), (56, 0.8338)])
def test_pretrained_teachers_give_the_measured_heldout_figures(depth, top1):
    """The figures measured with an independent implementation (../shared/data/cifar10/README.md)."""
    model = load_weights(create_model(f"cifar_resnet{depth}", num_classes=10), SHARED / f"resnet{depth}.th", "teacher")
    loader, _ = make_eval_loader(f"cifar10-jpeg-heldout:{SHARED}", input_space="imagenet", batch_size=500)
    assert len(loader.dataset) == 5000
    assert evaluate_accuracy(model, loader, "cpu") == pytest.approx(top1, abs=1e-9)


@needs_shared
def test_the_recipe_checks_out_against_the_real_data():
    from fastdfd.recipes import load_recipe
    from fastdfd.recipes.preflight import preflight

    recipe = load_recipe("cifar10_resnet56_resnet20", [f"data.root={SHARED}", f"teacher.weights={SHARED / 'resnet56.th'}"])
    prep = preflight(recipe)
    assert prep.teacher_trained and len(prep.eval_loader.dataset) == 5000
    x, y = next(iter(prep.eval_loader))
    assert (prep.teacher.eval()(x).argmax(1) == y).float().mean() > 0.5  # the held-out half, in ImageNet mean/std
