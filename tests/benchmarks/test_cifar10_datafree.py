"""benchmarks.cifar10_datafree at toy size on a synthetic test tar and an untrained teacher, so the script that
makes the CIFAR-10 figures cannot rot unseen: its outputs, its flags' refusals, several generators per class."""

from __future__ import annotations

import json

import pytest
import torch

from fastdfd.models import create_model

from ..data.test_cifar10_real import _write_tar


@pytest.fixture
def data_dir(tmp_path):
    from fastdfd.data import CIFAR10_CLASSES

    root = tmp_path / "cifar10"
    root.mkdir()
    # two tune images (0000-0499) and one held-out image (0500-0999) per class
    _write_tar(root / "test.tar", {c: [0, 1, 500] for c in CIFAR10_CLASSES})
    torch.manual_seed(0)
    state = create_model("cifar_resnet20", num_classes=10).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "resnet20.th")
    return root


def _argv(data_dir, out, *extra):
    return ["--data", str(data_dir), "--teacher", "resnet20", "--student", "resnet20", "--minutes", "0.02",
            "--gen-batch", "2", "--distill-batch", "2", "--pool", "64", "--curve-points", "2",
            "--quality-per-class", "2", "--out", str(out), *extra]


def test_a_toy_run_writes_every_output_with_two_generators_per_class_and_cutmix(data_dir, tmp_path, monkeypatch):
    from benchmarks import cifar10_datafree
    from fastdfd.train import Distiller

    made = []

    class Spy(Distiller):  # the distiller the run makes, to check it is given the parsed settings whole
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cifar10_datafree, "Distiller", Spy)
    out = tmp_path / "run"
    argv = _argv(data_dir, out, "--generators-per-class", "2", "--mix", "cutmix", "--lr", "0.02", "--temperature", "3")
    result = cifar10_datafree.main(argv)
    (d,) = made
    assert d.settings == cifar10_datafree.parse(argv)[0].distill and d.settings.temperature == 3.0
    assert 0 <= d.scheduler.base_lrs[0] <= 0.02  # the cosine in time starts from --lr
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["settings"]["generators_per_class"] == 2 and result["settings"]["distill"]["mix"] == "cutmix"
    assert result["generator_steps"] > 0 and result["distill_steps"] > 0
    # every generator step pushes each of the 20 generators' gen_batch images into the pool
    assert result["pool_images_pushed"] == result["generator_steps"] * 20 * 2
    assert 0.0 <= result["student_top1_heldout"] <= 1.0 and result["teacher_top1_heldout"] > 0
    # the CPU's vector ISA is named: step counts at a fixed budget differ between machines of one core count
    assert f"({torch.backends.cpu.get_cpu_capability()})" in result["machine"]
    assert result["curve"] and result["curve"][-1]["distill_steps"] == result["distill_steps"]
    student = create_model("cifar_resnet20", num_classes=10)
    student.load_state_dict(torch.load(out / "student.pt"))
    quality = json.loads((out / "quality" / "quality.json").read_text())
    # the diversity figure is per class, over the images of both of a class's generators (2 from each)
    per_class = quality["diversity"]["per_class"]
    assert sorted(map(int, per_class)) == list(range(10)) and {c["images"] for c in per_class.values()} == {4}


@pytest.mark.parametrize("warmup, warmup_steps", [("0.1", 5), ("0", 0)])
def test_a_budget_shorter_than_the_setup_still_runs_one_warm_up_fit_and_one_round(data_dir, tmp_path, warmup,
                                                                                 warmup_steps):
    from benchmarks import cifar10_datafree

    # 6 ms: the teacher's load alone takes longer
    argv = _argv(data_dir, tmp_path / "run", "--minutes", "0.0001", "--warmup-fraction", warmup)
    s = cifar10_datafree.parse(argv)[0]
    result = cifar10_datafree.main(argv)
    # one warm-up fit of 5 (none when there is no warm-up), then one round
    assert result["generator_steps"] == warmup_steps + s.turns.generator_steps
    assert result["distill_steps"] == s.turns.student_steps
    assert len(result["curve"]) == 1 and result["curve"][0]["distill_steps"] == s.turns.student_steps


@pytest.mark.parametrize("flag, value", [("--generators-per-class", "0"), ("--student-steps", "0"),
                                         ("--warmup-fraction", "1.0"), ("--mix", "blend"), ("--distill-batch", "0"),
                                         ("--temperature", "0"), ("--momentum", "1.0"), ("--generator", "bogus=1"),
                                         ("--generator", "batch_size=4"), ("--generator", "betas=0.5,1.0"),
                                         ("--gen-batch", "-1")])
def test_bad_flags_are_refused_before_any_work(data_dir, tmp_path, flag, value, capsys):
    from benchmarks import cifar10_datafree

    with pytest.raises(SystemExit):
        cifar10_datafree.parse(_argv(data_dir, tmp_path / "run", flag, value))
    assert flag.lstrip("-") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_students_flags_land_on_one_distill_settings_over_the_benchmarks_defaults(data_dir, tmp_path):
    from benchmarks.cifar10_datafree import DISTILL, Settings, parse

    s, _ = parse(_argv(data_dir, tmp_path / "run", "--temperature", "4", "--mix", "none", "--optimizer", "adam"))
    # the flags not given keep DISTILL's values, --distill-batch is DistillSettings.batch_size, and the
    # benchmark keeps no copy of any of them beside s.distill
    assert s.distill == DISTILL.replace(temperature=4.0, mix="none", optimizer="adam", batch_size=2)
    copies = {"lr", "temperature", "mix", "augment", "weight_decay", "distill_batch", "pool", "student_steps",
              "gen_steps", "generator_steps"}
    assert not copies & set(Settings.__dataclass_fields__)
    assert parse(["--data", str(data_dir), "--out", str(tmp_path / "run")])[0].distill == DISTILL


def test_the_rounds_flags_land_on_one_turns_settings(data_dir, tmp_path, capsys):
    from benchmarks.cifar10_datafree import parse
    from fastdfd.settings import TurnsSettings

    s, _ = parse(_argv(data_dir, tmp_path / "run", "--gen-steps", "2", "--student-steps", "3"))
    assert s.turns == TurnsSettings(pool=64, generator_steps=2, student_steps=3)
    assert parse(["--data", str(data_dir), "--out", str(tmp_path / "run")])[0].turns == TurnsSettings()
    # a check across the fields: a pool that no round's generator step fills
    with pytest.raises(SystemExit):
        parse(_argv(data_dir, tmp_path / "run", "--gen-steps", "0"))
    assert "pool = 64 needs generator_steps >= 1" in capsys.readouterr().err


def test_generator_overrides_lie_over_the_kept_ones_and_the_preset(data_dir, tmp_path):
    from benchmarks.cifar10_datafree import generator_settings, parse
    from fastdfd.settings import preset

    def g(*extra):
        return generator_settings(parse(_argv(data_dir, tmp_path / "run", *extra))[0])

    # one knob keeps the kept per-generator statistics (the preset's own scope is "ensemble")
    assert preset("default").loss.scope == "ensemble"
    assert g().loss.scope == "generator" and g().optimizer.batch_size == 2
    one_knob = g("--generator", "adversarial_weight=0.1")
    assert one_knob.loss.scope == "generator" and one_knob.loss.adversarial_weight == 0.1
    assert g("--generator", "scope=ensemble").loss.scope == "ensemble"
    # and a weight of 30 on the first BN layer (the preset's own is 1), which a knob can set back
    assert preset("default").loss.first_layer_multiplier == 1.0
    assert g().loss.first_layer_multiplier == one_knob.loss.first_layer_multiplier == 30.0
    assert g("--generator", "first_layer_multiplier=1").loss.first_layer_multiplier == 1.0
    assert g("--preset", "paper").loss.first_layer_multiplier == 1.0  # the paper's generators as it has them
    # and DeepInversion's L2 image prior (the preset has none), which a knob can set back too
    assert preset("default").loss.l2_weight == 0.0 and preset("paper").loss.l2_weight == 0.0
    assert g().loss.l2_weight == one_knob.loss.l2_weight == 1.0
    assert g("--generator", "l2_weight=0.3").loss.l2_weight == 0.3
    assert g("--preset", "paper").loss.l2_weight == 0.0
    assert g("--preset", "paper", "--generator", "ce_weight=2") == preset("paper").replace(
        scope="generator", ce_weight=2.0, batch_size=2)


def test_without_gen_batch_the_kept_batch_serves_the_default_preset_and_the_papers_its_own(data_dir, tmp_path):
    from benchmarks.cifar10_datafree import generator_settings, parse
    from fastdfd.settings import preset

    def g(*extra):
        argv = ["--data", str(data_dir), "--out", str(tmp_path / "run"), *extra]
        return generator_settings(parse(argv)[0])

    assert g().optimizer.batch_size == 16 and preset("default").optimizer.batch_size != 16
    assert g("--preset", "paper") == preset("paper") and preset("paper").optimizer.batch_size == 64
    assert g("--preset", "paper", "--gen-batch", "16").optimizer.batch_size == 16


def test_the_recipe_trains_its_generators_with_the_loss_the_benchmark_kept():
    # KEPT and the cifar10_resnet56_resnet20 recipe both write the studies' choices (the first-layer weight, the
    # L2 prior, the scope): one changed without the other fails here. Batches, rates and the student's settings
    # are the card's own in the recipe, so only the loss is compared.
    from benchmarks.cifar10_datafree import Settings, generator_settings
    from fastdfd.recipes import load_recipe
    from fastdfd.recipes.runner import generator_settings as recipe_generator_settings

    recipe = recipe_generator_settings(load_recipe("cifar10_resnet56_resnet20"))
    assert recipe["loss"] == generator_settings(Settings()).loss
    assert recipe["loss"].first_layer_multiplier == 30.0


def test_a_generator_override_that_is_not_a_setting_is_named():
    from benchmarks.cifar10_datafree import overrides

    assert overrides("scope=ensemble") == {"scope": "ensemble"}
    with pytest.raises(ValueError, match="'no_such_knob' is not a generator setting"):
        overrides("no_such_knob=1")


def test_a_list_valued_generator_override_keeps_its_commas():
    # "widths=64,32" names one field: the parts that start no field belong to the list before them
    from benchmarks.cifar10_datafree import overrides

    assert overrides("widths=64,32") == {"widths": (64, 32)}
    assert overrides("lr=0.02,widths=96, 48,32,jitter=2,") == {"lr": 0.02, "widths": (96, 48, 32), "jitter": 2}
    assert overrides("betas=0.5,0.99") == {"betas": (0.5, 0.99)}
    assert overrides("layer_weights=0.5,1,1") == {"layer_weights": (0.5, 1.0, 1.0)}
    named = overrides("layer_weights=conv1.bn=10,layer1.0.bn1=2,ce_weight=1")
    assert dict(named["layer_weights"]) == {"conv1.bn": 10.0, "layer1.0.bn1": 2.0} and named["ce_weight"] == 1.0
    with pytest.raises(ValueError, match="'64' is not key=value"):
        overrides("64,widths=32")
    # a scalar's value takes no second part: the forgotten "=value" is named, not read into the flag before it
    with pytest.raises(ValueError, match="'jitter' is not key=value"):
        overrides("flip=true,jitter")
    with pytest.raises(ValueError, match=r"--generator widths = '64,x'"):
        overrides("widths=64,x")  # not a list of integers
    with pytest.raises(ValueError, match="'lr' is given twice"):
        overrides("lr=0.1,lr=0.2")


def test_label_autocast_is_the_distill_settings_autocast(data_dir, tmp_path):
    from benchmarks.cifar10_datafree import DISTILL, parse

    from fastdfd.train.bf16 import cpu_computes_bf16

    # on by default where the CPU computes in bf16 (the thirteenth knob, docs/cifar10.md), off where bf16 is the
    # slow path; --no-label-autocast / --label-autocast choose either way
    assert DISTILL.autocast is cpu_computes_bf16()
    assert parse(_argv(data_dir, tmp_path / "run"))[0].distill.autocast is cpu_computes_bf16()
    assert parse(_argv(data_dir, tmp_path / "run", "--no-label-autocast"))[0].distill.autocast is False
    assert parse(_argv(data_dir, tmp_path / "run", "--label-autocast"))[0].distill.autocast is True


@pytest.mark.parametrize("computes_bf16", [True, False])
def test_the_default_labels_follow_whether_the_cpu_computes_bf16(monkeypatch, computes_bf16):
    """The benchmark's DISTILL reads the check when it is imported: a fresh import under either answer."""
    import importlib
    import sys

    import benchmarks
    import benchmarks.cifar10_datafree as imported
    import fastdfd.train.bf16 as bf16

    monkeypatch.setattr(bf16, "cpu_computes_bf16", lambda: computes_bf16)
    # the module as imported is restored after, in sys.modules and on its package: other tests keep theirs
    monkeypatch.delitem(sys.modules, "benchmarks.cifar10_datafree")
    monkeypatch.setattr(benchmarks, "cifar10_datafree", imported)
    fresh = importlib.import_module("benchmarks.cifar10_datafree")
    assert fresh is not imported
    assert fresh.DISTILL.autocast is computes_bf16
    assert fresh.Settings().distill.autocast is computes_bf16
