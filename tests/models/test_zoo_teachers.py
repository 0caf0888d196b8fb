"""Teachers and students from the zoos (``timm:NAME``, ``torchvision:NAME``) and the weight files
they come with, against stand-in ``timm`` / ``torchvision.models`` modules.

``make test`` has neither package (torchvision from pip does not import beside this venv's torch),
so each test injects a stand-in into ``sys.modules`` with the real functions' signatures:
``timm.create_model(model_name, pretrained=False, ..., **kwargs)`` / ``timm.list_models(filter=...)``
and ``torchvision.models.get_model(name, **config)`` / ``list_models(module=None, ...)``, which
record every call. A stand-in refuses what the real one would download (``pretrained=True``,
``weights`` other than None), so a test that reaches a download fails. The real packages are
exercised by ``make test-zoo``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import types

import pytest
import torch
from torch import nn

from fastdfd.cli import main
from fastdfd.models import create_model, list_zoo_models
from fastdfd.models.registry import register_model
from fastdfd.models.weights import load_weights
from fastdfd.recipes import load_recipe
from fastdfd.recipes.preflight import preflight


class TinyNet(nn.Module):
    """What a zoo classifier looks like to fastdfd: conv-BN-ReLU stem, pooled features, a linear head."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


TIMM_ARCHS = ["efficientnet_b0", "resnet18", "resnet18d", "resnet34", "resnet50"]
TV_CLASSIFIERS = ["mobilenet_v2", "resnet18", "resnet34", "resnet50"]
TV_OTHERS = ["fasterrcnn_resnet50_fpn", "r3d_18"]


@pytest.fixture
def fake_timm(monkeypatch):
    """A stand-in ``timm``; ``fake_timm.calls`` lists (model_name, pretrained, kwargs), ``.built`` the models."""
    timm = types.ModuleType("timm")
    timm.__version__ = "0.0-standin"
    timm.calls, timm.built = [], []

    def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                    include_tags=None):
        return sorted(n for n in TIMM_ARCHS if not filter or fnmatch.fnmatch(n, filter))

    def create_model(model_name, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                     checkpoint_path=None, cache_dir=None, scriptable=None, exportable=None, no_jit=None, **kwargs):
        timm.calls.append((model_name, pretrained, dict(kwargs)))
        if model_name.partition(".")[0] not in TIMM_ARCHS:
            raise RuntimeError(f"Unknown model ({model_name})")
        if pretrained or checkpoint_path or pretrained_cfg_overlay:
            raise AssertionError("the stand-in would download weights")
        model = TinyNet(kwargs.get("num_classes", 1000), kwargs.get("in_chans", 3))
        timm.built.append(model)
        return model

    timm.list_models, timm.create_model = list_models, create_model
    monkeypatch.setitem(sys.modules, "timm", timm)
    return timm


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in ``torchvision`` package with ``torchvision.models``; ``.calls`` lists (name, config)."""
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.0-standin"
    models = types.ModuleType("torchvision.models")
    models.calls = []

    def list_models(module=None, include=None, exclude=None):
        names = TV_CLASSIFIERS if module is models else TV_CLASSIFIERS + TV_OTHERS
        return sorted(names)

    def get_model(name, **config):
        models.calls.append((name, dict(config)))
        if name not in TV_CLASSIFIERS + TV_OTHERS:
            raise ValueError(f"Unknown model {name}")
        if config.get("weights") is not None:
            raise AssertionError("the stand-in would download weights")
        return TinyNet(config.get("num_classes", 1000), 3)

    models.list_models, models.get_model = list_models, get_model
    torchvision.models = models
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return models


# ----------------------------------------------------------------------------- building


def test_timm_models_are_built_with_random_weights_and_the_asked_shape(fake_timm):
    model = create_model("timm:resnet18", num_classes=7, in_channels=1)
    assert fake_timm.calls == [("resnet18", False, {"num_classes": 7, "in_chans": 1})]
    assert model.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    # a pretrained tag picks timm's config only; the prefix is case-insensitive; no num_classes keeps 1000
    create_model("TIMM:resnet50.a1_in1k")
    assert fake_timm.calls[-1] == ("resnet50.a1_in1k", False, {})
    assert list_zoo_models("timm", "resnet1") == ["resnet18", "resnet18d"]


def test_torchvision_models_are_built_with_weights_none(fake_torchvision):
    model = create_model("torchvision:resnet18", num_classes=5, in_channels=3)
    assert fake_torchvision.calls == [("resnet18", {"weights": None, "num_classes": 5})]
    assert model.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert list_zoo_models("torchvision") == TV_CLASSIFIERS  # classifiers only


def test_torchvision_refuses_another_channel_count(fake_torchvision):
    with pytest.raises(ValueError, match=r"'torchvision:resnet18': torchvision's classifiers take 3-channel images, "
                                         r"but 1 channel\(s\)"):
        create_model("torchvision:resnet18", num_classes=10, in_channels=1)
    assert fake_torchvision.calls == []


def test_unknown_names_list_close_matches(fake_timm, fake_torchvision):
    with pytest.raises(ValueError, match=r"unknown model 'timm:resnet81'.*close matches: timm:resnet18"):
        create_model("timm:resnet81", num_classes=10)
    with pytest.raises(ValueError, match=r"unknown model 'torchvision:mobilenetv2'.*torchvision:mobilenet_v2"):
        create_model("torchvision:mobilenetv2", num_classes=10)
    with pytest.raises(ValueError, match=r"'torchvision:fasterrcnn_resnet50_fpn' is not one of torchvision's image "
                                         r"classifiers"):
        create_model("torchvision:fasterrcnn_resnet50_fpn", num_classes=10)
    with pytest.raises(ValueError, match=r"no close match"):
        create_model("timm:zzzzzz", num_classes=10)
    assert fake_timm.calls == [] and fake_torchvision.calls == []
    # a registry name that is not there: still a KeyError, now also a ValueError, with the zoo hint
    with pytest.raises(KeyError, match=r"did you mean 'resnet18'.*timm:NAME or torchvision:NAME"):
        create_model("resnet81")


def test_what_would_download_is_refused(fake_timm):
    with pytest.raises(ValueError, match=r"hub and local-dir sources are not supported: fastdfd never downloads"):
        create_model("timm:hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(ValueError, match=r"pretrained=True is not supported"):
        create_model("timm:resnet18", pretrained=True)
    with pytest.raises(ValueError, match=r"no model name after 'timm:'"):
        create_model("timm:")
    with pytest.raises(ValueError, match=r"':' is reserved for the zoo prefixes"):
        register_model("timm:mine")
    assert fake_timm.calls == []


def test_a_missing_zoo_names_the_pip_command_and_the_spec(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` sees when it is not installed
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.delitem(sys.modules, "torchvision.models", raising=False)
    with pytest.raises(ImportError, match=r"timm:resnet18 needs timm, which is not installed: pip install timm"):
        create_model("timm:resnet18", num_classes=10)
    with pytest.raises(ImportError, match=r"torchvision:resnet18 needs torchvision, which is not installed: "
                                          r"pip install torchvision"):
        create_model("torchvision:resnet18", num_classes=10)


def test_a_zoo_that_does_not_import_says_so(tmp_path, monkeypatch):
    # torchvision from pip beside a torch it was not built for fails at import, not with ModuleNotFoundError
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    with pytest.raises(ImportError, match=r"timm:resnet18 needs timm, which is installed but does not import "
                                          r"\(RuntimeError: operator torchvision::nms does not exist\); pip install timm"):
        create_model("timm:resnet18", num_classes=10)


# ----------------------------------------------------------------------------- weight files


def _fresh(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(10, 3)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "ema_only", "timm_train", "ddp", "compiled"])
def test_weights_load_in_the_zoos_layouts(tmp_path, layout):
    trained = _fresh(1)
    state = trained.state_dict()
    other = {k: v + 1 for k, v in state.items()}  # a second copy that must not be picked
    saved = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {"state": {}, "param_groups": []}},
        "ema_only": {"state_dict_ema": state},
        # timm's train.py: args is an argparse.Namespace; state_dict wins over the EMA copy
        "timm_train": {"epoch": 3, "arch": "resnet18", "state_dict": state, "state_dict_ema": other,
                       "optimizer": {"state": {}, "param_groups": []}, "version": 2,
                       "args": argparse.Namespace(model="resnet18", lr=0.1)},
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "compiled": {"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}},
    }[layout]
    path = tmp_path / "w.pth"
    torch.save(saved, path)
    model = load_weights(_fresh(0), path, "teacher")
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_safetensors_weights_load(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    trained = _fresh(1)
    path = tmp_path / "model.safetensors"
    safetensors.save_file(trained.state_dict(), str(path))
    model = load_weights(_fresh(0), path, "teacher")
    assert torch.equal(model.conv1.weight, trained.conv1.weight)


class Opaque:
    """Not a tensor: torch.load(weights_only=True) refuses to rebuild it."""


def test_bad_weight_files_are_refused_naming_the_file(tmp_path):
    cases = {
        "garbage.pt": (lambda p: p.write_bytes(b"not a torch file"), r"are not a readable torch file"),
        "empty.pt": (lambda p: p.write_bytes(b""), r"are not a readable torch file"),
        "notensors.pt": (lambda p: torch.save({"epoch": 3, "note": "x"}, p), r"hold no tensors \(keys 'epoch', 'note'\)"),
        "pickled.pt": (lambda p: torch.save({"state_dict": {}, "obj": Opaque()}, p),
                       r"hold more than tensors and cannot be loaded safely.*Opaque"),
        "other.pt": (lambda p: torch.save(TinyNet(3, 3).state_dict(), p), r"do not match the architecture"),
    }
    for name, (write, message) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match=rf"teacher weights {path}.*{message}|teacher weights {path} {message}"):
            load_weights(_fresh(), path, "teacher")
    with pytest.raises(FileNotFoundError, match=rf"teacher weights not found: {tmp_path / 'none.pt'}"):
        load_weights(_fresh(), tmp_path / "none.pt", "teacher")


# ----------------------------------------------------------------------------- the command line and recipes

GEN = ["--num-classes", "4", "--image-size", "8", "--widths", "4", "--latent-dim", "4", "--steps", "1",
       "--batch-size", "2", "--checkpoint-every", "0"]


def test_train_generators_takes_a_timm_teacher_and_loads_its_weights(tmp_path, fake_timm, capsys):
    torch.manual_seed(3)
    trained = TinyNet(4, 3)
    with torch.no_grad():
        for bn in (trained.bn1, trained.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "teacher.pth"
    torch.save({"state_dict": trained.state_dict(), "args": argparse.Namespace(model="resnet18")}, weights)
    out = tmp_path / "gens"
    assert main(["train-generators", "--teacher", "timm:resnet18", "--weights", str(weights), "--channels", "3",
                 "--input-space", "imagenet", *GEN, "--out", str(out)]) == 0, capsys.readouterr().err
    assert fake_timm.calls == [("resnet18", False, {"num_classes": 4, "in_chans": 3})]
    teacher = fake_timm.built[0]
    for k, v in trained.state_dict().items():
        assert torch.equal(teacher.state_dict()[k].cpu(), v), k  # the file's weights, untouched by training
    assert (out / "generators.pt").is_file()
    assert json.loads((out / "summary.json").read_text())["input_space"]["name"] == "imagenet"

    capsys.readouterr()
    assert main(["train-generators", "--teacher", "timm:resnet18", "--weights", str(tmp_path / "none.pt"), *GEN,
                 "--out", str(tmp_path / "never")]) == 2
    assert f"teacher weights not found: {tmp_path / 'none.pt'}" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cli_zoo_refusals_exit_cleanly(tmp_path, fake_torchvision, monkeypatch, capsys):
    weights = tmp_path / "t.pt"
    torch.save(TinyNet(4, 3).state_dict(), weights)
    assert main(["train-generators", "--teacher", "torchvision:resnet18", "--weights", str(weights),
                 "--channels", "1", *GEN, "--out", str(tmp_path / "a")]) == 2
    assert "torchvision's classifiers take 3-channel images, but 1 channel(s)" in capsys.readouterr().err
    assert main(["train-generators", "--teacher", "torchvision:resnet81", "--weights", str(weights),
                 *GEN, "--out", str(tmp_path / "b")]) == 2
    assert "close matches: torchvision:resnet18" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(["train-generators", "--teacher", "timm:resnet18", "--weights", str(weights),
                 *GEN, "--out", str(tmp_path / "c")]) == 2
    assert "timm:resnet18 needs timm, which is not installed: pip install timm" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_models_command_names_the_zoos(fake_timm, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.delitem(sys.modules, "torchvision.models", raising=False)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet18_imagenet" in out and "timm:NAME" in out and "timm 0.0-standin" in out
    assert "torchvision:NAME" in out and "pip install torchvision" in out
    assert main(["models", "--zoo", "timm", "resnet3"]) == 0
    assert capsys.readouterr().out.split() == ["timm:resnet34"]


def test_recipes_take_zoo_models(fake_timm, fake_torchvision):
    recipe = load_recipe("digits", ["teacher.model='timm:resnet18'", "student.model='timm:resnet18d'",
                                    "teacher_training.epochs=1"])
    prep = preflight(recipe)
    assert [c[:2] for c in fake_timm.calls] == [("resnet18", False), ("resnet18d", False)]
    assert fake_timm.calls[0][2] == {"num_classes": 10, "in_chans": 1}
    assert prep.teacher is fake_timm.built[0]
    with pytest.raises(ValueError, match=r"recipe key student\.model = 'torchvision:resnet18': .*torchvision's "
                                         r"classifiers take 3-channel images, but 1"):
        preflight(load_recipe("digits", ["student.model='torchvision:resnet18'"]))
    with pytest.raises(ValueError, match=r"recipe key teacher\.model = 'timm:resnt18': unknown model.*timm:resnet18"):
        preflight(load_recipe("digits", ["teacher.model='timm:resnt18'"]))
    with pytest.raises(ValueError, match=r"recipe key teacher\.model = 'wrn40_3': unknown model"):
        preflight(load_recipe("digits", ["teacher.model='wrn40_3'"]))


def test_recipe_with_a_missing_zoo_names_the_key_and_pip(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"recipe key teacher\.model = 'timm:resnet18': .*pip install timm"):
        preflight(load_recipe("digits", ["teacher.model='timm:resnet18'"]))
