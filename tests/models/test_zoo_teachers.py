"""Teachers and students from the zoos (``timm:NAME``, ``torchvision:NAME``) and the weight files
they come with, against stand-in ``timm`` / ``torchvision.models`` modules.

``make test`` has neither package (torchvision from pip does not import beside this venv's torch),
so each test injects a stand-in into ``sys.modules`` with the real functions' signatures:
``timm.create_model(model_name, pretrained=False, ..., **kwargs)`` / ``timm.list_models(filter=...)``
and ``torchvision.models.get_model(name, **config)`` / ``list_models(module=None, ...)``, which
record every call. Published weights (``pretrained=True``, a ``weights`` enum member) are recorded
and the stand-in builds the model as the real one would from a filled cache; the real loaders and
caches (and their errors without a network) are exercised by ``make test-zoo``
(tests_zoo/test_pretrained.py).
"""

from __future__ import annotations

import argparse
import enum
import fnmatch
import json
import re
import sys
import types

import pytest
import torch
from torch import nn

from fastdfd.cli import main
from fastdfd.models import create_model, list_zoo_models
from fastdfd.models.zoo import parse_zoo_spec
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


class StandinWeights(enum.Enum):
    """A torchvision weights enum: members with a url and meta["categories"], DEFAULT an alias."""

    IMAGENET1K_V1 = ("https://download.pytorch.org/models/resnet18-f37072fd.pth", 1000)
    TINY_V1 = ("https://download.pytorch.org/models/tiny-0123abcd.pth", 4)
    DEFAULT = ("https://download.pytorch.org/models/resnet18-f37072fd.pth", 1000)

    @property
    def url(self):
        return self.value[0]

    @property
    def meta(self):
        return {"categories": [f"c{i}" for i in range(self.value[1])]}


@pytest.fixture
def fake_timm(monkeypatch):
    """A stand-in ``timm``; ``fake_timm.calls`` lists (model_name, pretrained, kwargs), ``.overlays`` the
    pretrained_cfg_overlay of each call, ``.built`` the models."""
    timm = types.ModuleType("timm")
    timm.__version__ = "0.0-standin"
    timm.calls, timm.built, timm.overlays = [], [], []

    def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                    include_tags=None):
        return sorted(n for n in TIMM_ARCHS if not filter or fnmatch.fnmatch(n, filter))

    def create_model(model_name, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                     checkpoint_path=None, cache_dir=None, scriptable=None, exportable=None, no_jit=None, **kwargs):
        timm.calls.append((model_name, pretrained, dict(kwargs)))
        timm.overlays.append(pretrained_cfg_overlay)
        if model_name.partition(".")[0] not in TIMM_ARCHS:
            raise RuntimeError(f"Unknown model ({model_name})")
        if checkpoint_path or (pretrained_cfg_overlay and not pretrained):
            raise AssertionError("timm ignores these without pretrained=True")
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
        weights = config.get("weights")
        if weights is not None and not isinstance(weights, StandinWeights):
            raise AssertionError(f"get_model takes a weights enum member, not {weights!r}")
        return TinyNet(config.get("num_classes", 1000), 3)

    def get_model_weights(name):
        return StandinWeights

    models.list_models, models.get_model, models.get_model_weights = list_models, get_model, get_model_weights
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


def test_zoo_specs_parse_a_torchvision_weights_part_only():
    assert parse_zoo_spec("timm:resnet50.a1_in1k") == ("timm", "resnet50.a1_in1k", None)
    assert parse_zoo_spec("torchvision:resnet18") == ("torchvision", "resnet18", None)
    assert parse_zoo_spec("TorchVision: resnet50 :IMAGENET1K_V2") == ("torchvision", "resnet50", "IMAGENET1K_V2")
    assert parse_zoo_spec("torchvision:resnet50:DEFAULT") == ("torchvision", "resnet50", "DEFAULT")
    with pytest.raises(ValueError, match=r"'timm:resnet18:IMAGENET1K_V1': timm model names have no ':'.*"
                                         r"pretrained=True \(--pretrained\).*pretrained_file=FILE"):
        parse_zoo_spec("timm:resnet18:IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"timm model names have no ':' \(hf-hub: and local-dir: names"):
        parse_zoo_spec("timm:hf-hub:timm/resnet18.a1_in1k")
    for bad in ("torchvision:resnet18:", "torchvision:resnet18:A:B"):
        with pytest.raises(ValueError, match=r"expected torchvision:NAME:WEIGHTS, a member of the model's weights"):
            parse_zoo_spec(bad)
    with pytest.raises(ValueError, match=r"no model name after 'torchvision:'"):
        parse_zoo_spec("torchvision::DEFAULT")


def test_spec_refusals_build_nothing(fake_timm):
    with pytest.raises(ValueError, match=r"timm model names have no ':'"):
        create_model("timm:hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(ValueError, match=r"no model name after 'timm:'"):
        create_model("timm:")
    with pytest.raises(ValueError, match=r"weights='IMAGENET1K_V1' names a torchvision weights enum"):
        create_model("timm:resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"':' is reserved for the zoo prefixes"):
        register_model("timm:mine")
    with pytest.raises(ValueError, match=r"model 'resnet18': pretrained=True takes a zoo model"):
        create_model("resnet18", num_classes=10, pretrained=True)
    assert fake_timm.calls == []


def test_timm_pretrained_goes_to_timms_loader(fake_timm, tmp_path):
    create_model("timm:resnet18", num_classes=7, pretrained=True)
    assert fake_timm.calls[-1] == ("resnet18", True, {"num_classes": 7}) and fake_timm.overlays[-1] is None
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    create_model("timm:resnet50.a1_in1k", pretrained_file=file)  # a file alone means pretrained
    assert fake_timm.calls[-1] == ("resnet50.a1_in1k", True, {})
    assert fake_timm.overlays[-1] == {"file": str(file)}
    with pytest.raises(FileNotFoundError, match=rf"'timm:resnet18': pretrained_file not found: {tmp_path / 'no'}"):
        create_model("timm:resnet18", pretrained=True, pretrained_file=tmp_path / "no")
    assert len(fake_timm.calls) == 2


def test_torchvision_weights_enum_from_the_spec_or_the_argument(fake_torchvision):
    create_model("torchvision:resnet18:IMAGENET1K_V1", num_classes=1000)
    assert fake_torchvision.calls[-1] == ("resnet18", {"weights": StandinWeights.IMAGENET1K_V1})
    create_model("torchvision:resnet18", weights="TINY_V1", num_classes=4)  # the head is the weights' own
    assert fake_torchvision.calls[-1] == ("resnet18", {"weights": StandinWeights.TINY_V1})
    create_model("torchvision:resnet18", pretrained=True)
    create_model("torchvision:resnet18:DEFAULT")
    create_model("torchvision:resnet18", weights="StandinWeights.DEFAULT")
    assert [c[1]["weights"] for c in fake_torchvision.calls[-3:]] == [StandinWeights.DEFAULT] * 3
    n = len(fake_torchvision.calls)
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET1K_V9' for torchvision's resnet18; "
                                         r"StandinWeights has IMAGENET1K_V1, TINY_V1, DEFAULT$"):
        create_model("torchvision:resnet18:IMAGENET1K_V9")
    with pytest.raises(ValueError, match=r"StandinWeights.IMAGENET1K_V1 have a 1000-class head, but num_classes=10 "
                                         r"was asked for.*use data with 1000 classes, a timm teacher"):
        create_model("torchvision:resnet18:IMAGENET1K_V1", num_classes=10)
    with pytest.raises(ValueError, match=r"weights='TINY_V1' and the spec's 'DEFAULT' disagree"):
        create_model("torchvision:resnet18:DEFAULT", weights="TINY_V1")
    with pytest.raises(ValueError, match=r"pretrained_file is timm's"):
        create_model("torchvision:resnet18", pretrained_file="x.pth")
    assert len(fake_torchvision.calls) == n


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


def test_cli_takes_published_teacher_weights(tmp_path, fake_timm, fake_torchvision, capsys):
    out = tmp_path / "gens"
    assert main(["train-generators", "--teacher", "timm:resnet18", "--pretrained", "--channels", "3", *GEN,
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert fake_timm.calls == [("resnet18", True, {"num_classes": 4, "in_chans": 3})]
    assert (out / "generators.pt").is_file()
    capsys.readouterr()
    weights = tmp_path / "t.pt"
    torch.save(TinyNet(4, 3).state_dict(), weights)
    refusals = {
        (): r"timm:resnet18: no weights; give --weights FILE \(a trained state_dict\), or for a zoo model "
            r"--pretrained",
        ("--weights", str(weights), "--pretrained"): rf"--weights {weights} and --pretrained: give one source",
        ("--weights-enum", "IMAGENET1K_V1"): r"weights='IMAGENET1K_V1' names a torchvision weights enum",
        ("--teacher", "resnet18", "--pretrained"): r"--pretrained takes a zoo model .*, not 'resnet18'",
        ("--teacher", "torchvision:resnet18", "--weights-enum", "TINY_V9"):
            r"unknown weights 'TINY_V9' for torchvision's resnet18; StandinWeights has IMAGENET1K_V1, TINY_V1",
        ("--teacher", "torchvision:resnet18:IMAGENET1K_V1"): r"the weights StandinWeights.IMAGENET1K_V1 have a "
                                                            r"1000-class head, but num_classes=4",
    }
    for i, (flags, message) in enumerate(refusals.items()):
        teacher = [] if "--teacher" in flags else ["--teacher", "timm:resnet18"]
        assert main(["train-generators", *teacher, *flags, *GEN, "--out", str(tmp_path / f"r{i}")]) == 2, flags
        err = capsys.readouterr().err
        assert re.search(message, err), (flags, err)
        assert not (tmp_path / f"r{i}").exists()
    assert len(fake_timm.calls) == 1  # --weights-enum reached torchvision's enum (TINY_V9), timm was not called


def test_recipes_take_published_teacher_weights(fake_timm, fake_torchvision):
    # digits trains its teacher; asking for published weights drops [teacher_training]
    recipe = load_recipe("digits", ["teacher.model='timm:resnet18'", "teacher.pretrained=true"])
    assert recipe["teacher"]["pretrained"] is True and not recipe.has("teacher_training")
    prep = preflight(recipe)
    assert fake_timm.calls[0] == ("resnet18", True, {"num_classes": 10, "in_chans": 1})
    assert len(fake_timm.calls) == 1  # the student is fastdfd's digits_student
    assert prep.teacher_trained and prep.train_set is None and prep.teacher is fake_timm.built[0]
    recipe = load_recipe("digits", ["teacher.model='torchvision:resnet18'", "teacher.weights_enum='TINY_V1'",
                                    "data.num_classes=4", "data.channels=3", "teacher.input_space='imagenet'"])
    assert recipe["teacher"]["weights_enum"] == "TINY_V1" and not recipe.has("teacher_training")
    assert "pretrained" not in recipe["teacher"]  # optional: absent means false
    refusals = {
        ("teacher.pretrained=true",): r"recipe key teacher.pretrained = True takes a zoo teacher .* teacher.model = "
                                      r"'digits_teacher'",
        ("teacher.model='timm:resnet18'", "teacher.pretrained=1"): r"recipe key teacher.pretrained = 1: expected",
        ("teacher.model='timm:resnet18'", "teacher.weights='t.pt'", "teacher.pretrained=true"):
            r"teacher.weights = 't.pt' and teacher.pretrained = True: give one source",
        ("teacher.model='torchvision:resnet18:DEFAULT'", "teacher.weights='t.pt'"):
            r"teacher.weights = 't.pt' and teacher.model = 'torchvision:resnet18:DEFAULT': give one source",
    }
    for overrides, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            load_recipe("digits", list(overrides))
    with pytest.raises(ValueError, match=r"recipe key teacher.model = 'timm:resnet18': .*weights='IMAGENET1K_V1' "
                                         r"names a torchvision weights enum"):
        preflight(load_recipe("digits", ["teacher.model='timm:resnet18'", "teacher.weights_enum='IMAGENET1K_V1'"]))
