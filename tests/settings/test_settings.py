"""The settings classes are the one source of every setting: the CLI flags, the recipe keys and the trainers'
config() are made from them, and checkpoints written before they existed still resume."""

import argparse
import dataclasses

import pytest
import torch

from fastdfd.checkpoint import check_config
from fastdfd.cli import build_parser
from fastdfd.models import create_model
from fastdfd.nn import GeneratorEnsemble
from fastdfd.recipes.schema import SECTIONS, settings_keys
from fastdfd.settings import (DISTILL_STAGE, GENERATOR_STAGE, REQUIRED, ArchitectureSettings, DistillSettings,
                              ExecutionSettings, LoopSettings, LossSettings, OptimizerSettings, Settings, preset,
                              setting)
from fastdfd.settings.cli import add_flags, flags_to_settings
from fastdfd.train import Distiller, GeneratorTrainer

ALL = (*GENERATOR_STAGE, DistillSettings)


def _parser_dests(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest for a in sub.choices[command]._actions}


def _example(spec):
    """A valid value of the field that differs from its default."""
    return {"int": 3, "float": 0.25, "bool": True, "str": spec.choices[-1] if spec.choices else "x",
            "ints": (4, 2), "floats": (0.25, 0.5), "chunk": 2, "count": 2, "switch": "auto",
            "optional_bool": False, "layer_weights": (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)}[spec.kind]


def test_stage_field_names_are_disjoint():
    for stage in (GENERATOR_STAGE, DISTILL_STAGE):
        names = [n for cls in stage for n in cls.field_names()]
        assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("command,stage,section", [("train-generators", GENERATOR_STAGE, "generators"),
                                                   ("distill", DISTILL_STAGE, "distill")])
def test_every_field_reaches_the_cli_and_the_recipes(command, stage, section):
    dests, keys = _parser_dests(command), SECTIONS[section]
    for cls in stage:
        for spec in cls.specs():
            if spec.name == "sample_every" and section == "distill":
                continue  # the generator trainer's alone
            assert (spec.name in dests) == spec.cli, (cls.__name__, spec.name)
            assert (spec.name in keys) == spec.recipe, (cls.__name__, spec.name)
            if spec.recipe:
                assert keys[spec.name] is spec  # the recipe checks the value with the field's own spec


def test_every_config_field_reaches_the_trainers_config(digits_teacher, tmp_path):
    torch.manual_seed(0)
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4))
    student = create_model("digits_student", num_classes=10)
    for cls in (LossSettings, OptimizerSettings, ExecutionSettings, LoopSettings):
        for spec in cls.specs():
            value = _example(spec)
            t = GeneratorTrainer(digits_teacher, ens, student=student, sample_dir=tmp_path,
                                 **{"progress": False, spec.name: value})
            assert getattr({LossSettings: t.loss, OptimizerSettings: t.optim, ExecutionSettings: t.execution,
                            LoopSettings: t.loop}[cls], spec.name) == spec.check(value, spec.name)
            # the chunk is recorded resolved (an int, whatever was asked), so it is in every config
            assert (spec.name in t.config()) == (spec.config or spec.name == "generators_per_step"), spec.name
    for spec in DistillSettings.specs():
        if spec.name == "student_bn":
            continue  # per_generator: checked by the distiller tests
        d = Distiller(digits_teacher, student, ens, **{"progress": False, spec.name: _example(spec)})
        assert getattr(d.settings, spec.name) == spec.check(_example(spec), spec.name)
        assert (spec.name in d.config()) == (spec.config or spec.name == "generators_per_step"), spec.name


def test_a_new_field_reaches_every_surface():
    """What adding one field to a settings class does: a flag, a recipe key, a config entry; nothing else to edit."""

    @dataclasses.dataclass(frozen=True)
    class Extended(LossSettings):
        probe_weight: float = setting(0.0, "a new loss weight", kind="float", minimum=0, absent=0.0)

    p = argparse.ArgumentParser()
    add_flags(p, Extended)
    args = p.parse_args(["--probe-weight", "0.5", "--ce-weight", "1"])
    s = flags_to_settings(args, Extended)
    assert s.probe_weight == 0.5 and s.ce_weight == 1.0
    assert "probe_weight" in settings_keys(Extended)
    assert Extended.from_mapping({"probe_weight": 2}).probe_weight == 2.0
    assert s.config()["probe_weight"] == 0.5 and "probe_weight" not in Extended().config()  # old checkpoints match
    with pytest.raises(SystemExit):
        p.parse_args(["--probe-weight", "-1"])


def test_a_flag_may_take_another_name_and_still_land_on_its_field():
    p = argparse.ArgumentParser()
    add_flags(p, DistillSettings, names={"batch_size": "--distill-batch"})
    args = p.parse_args(["--distill-batch", "7", "--lr", "0.2"])
    assert flags_to_settings(args, DistillSettings) == DistillSettings(batch_size=7, lr=0.2)
    assert "--distill-batch" in p.format_help() and "--batch-size" not in p.format_help()
    for bad in (["--distill-batch", "0"], ["--batch-size", "7"]):  # checked by the field's spec; the old name is gone
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(ValueError, match="batch_sise is not a flag of DistillSettings"):
        add_flags(argparse.ArgumentParser(), DistillSettings, names={"batch_sise": "--distill-batch"})
    with pytest.raises(ValueError, match="batch_size is not a flag"):  # a skipped field cannot be renamed
        add_flags(argparse.ArgumentParser(), DistillSettings, skip=("batch_size",), names={"batch_size": "--b"})


def test_values_are_checked_and_normalised():
    assert OptimizerSettings(lr=1, betas=[0.9, 0.99]).betas == (0.9, 0.99)
    assert isinstance(OptimizerSettings(lr=1).lr, float)
    assert ExecutionSettings(cuda_graph=True).cuda_graph == "on" and ExecutionSettings(generators_per_step="all") \
        .generators_per_step is None
    for cls, bad, match in [(LossSettings, {"kind": "js"}, "LossSettings.kind = 'js': expected one of kl"),
                            (LossSettings, {"moment_weight": -1}, "at least 0"),
                            (LossSettings, {"ce_weight": float("nan")}, "ce_weight = nan"),
                            (OptimizerSettings, {"lr": 0}, "above 0"),
                            (OptimizerSettings, {"betas": (0.9,)}, "2 of them"),
                            (OptimizerSettings, {"betas": (0.9, 1.0)}, r"in \[0, 1\)"),
                            (OptimizerSettings, {"batch_size": 2.5}, "an integer"),
                            (ArchitectureSettings, {"widths": (8, 0)}, "positive integers"),
                            (ExecutionSettings, {"generators_per_step": 0}, "'all' or 'auto'"),
                            (ExecutionSettings, {"cuda_graph": "maybe"}, "off, auto or on"),
                            (DistillSettings, {"generators_per_step": "auto"}, "positive integer or 'all'"),
                            (DistillSettings, {"momentum": 1.0}, "below 1"),
                            (LoopSettings, {"checkpoint_every": -1}, "at least 0")]:
        with pytest.raises(ValueError, match=match):
            cls(**bad)
    with pytest.raises(TypeError, match="no setting.*lrr"):
        OptimizerSettings().replace(lrr=1)
    weights = LossSettings(layer_weights={"a": 1}).layer_weights
    with pytest.raises(TypeError, match="frozen"):
        weights["a"] = 2.0
    assert hash(LossSettings(layer_weights={"a": 1})) == hash(LossSettings(layer_weights={"a": 1.0}))


def test_defaults_agree_everywhere():
    arch = ArchitectureSettings()
    ens = GeneratorEnsemble(2, 2, image_size=8, channels=1)
    assert (ens.spec.latent_dim, ens.spec.widths, ens.spec.output_bn) == (arch.latent_dim, arch.widths, arch.output_bn)
    assert not ens.spec.output_bn  # the ablation's 22 points: off unless asked (preset "paper" asks)
    assert preset("paper").architecture.output_bn


# config() of fastdfd as it was before the settings classes (commit fbfd6bc), for the same runs as below
OLD_CONFIGS = {
    "default": {"kind": "kl", "scope": "ensemble", "batch_size": 32, "generators_per_step": 10, "moment_weight": 10.0,
                "ce_weight": 0.1, "tv_weight": 0.0, "lr": 0.01, "betas": [0.5, 0.999], "first_layer_multiplier": 1.0,
                "seed": 0, "layer_weights": None, "normalization": "mean"},
    "paper_like": {"kind": "kl", "scope": "generator", "batch_size": 64, "generators_per_step": 5,
                   "moment_weight": 10.0, "ce_weight": 1.0, "tv_weight": 0.0, "lr": 0.001, "betas": [0.5, 0.999],
                   "first_layer_multiplier": 3.0, "seed": 7, "layer_weights": [2.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                   "l2_weight": 0.5, "input_space": "minus_one_one"},
    "distill": {"temperature": 4.0, "batch_size": 32, "generators_per_step": 10, "optimizer": "sgd", "lr": 0.05,
                "total_steps": 100, "seed": 0, "momentum": 0.9, "weight_decay": 0.0005},
    "distill_aug": {"temperature": 4.0, "batch_size": 32, "generators_per_step": 5, "optimizer": "adam", "lr": 0.05,
                    "total_steps": None, "seed": 3, "momentum": 0.9, "weight_decay": 0.0005,
                    "student_bn": "per_generator", "augment": "crop_flip"},
}


def test_checkpoints_written_before_the_settings_classes_still_resume(digits_teacher):
    def ens():
        torch.manual_seed(0)
        return GeneratorEnsemble(10, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)

    student = create_model("digits_student", num_classes=10)
    now = {
        "default": GeneratorTrainer(digits_teacher, ens(), progress=False).config(),
        "paper_like": GeneratorTrainer(digits_teacher, ens(), progress=False, scope="generator", normalization="sum",
                                       ce_weight=1.0, lr=1e-3, batch_size=64, l2_weight=0.5,
                                       layer_weights=[2.0] + [1.0] * 5, first_layer_multiplier=3.0,
                                       generators_per_step=5, seed=7, input_space="minus_one_one").config(),
        "distill": Distiller(digits_teacher, student, ens(), progress=False, total_steps=100).config(),
        "distill_aug": Distiller(digits_teacher, student, ens(), progress=False, optimizer="adam", augment="crop_flip",
                                 student_bn="per_generator", generators_per_step=5, seed=3).config(),
    }
    for name, old in OLD_CONFIGS.items():
        check_config(f"<{name}>", old, now[name], name)  # raises, naming the keys, if they differ
    with pytest.raises(Exception, match="lr"):
        check_config("<x>", OLD_CONFIGS["default"], {**now["default"], "lr": 0.02}, "default")


def test_required_and_optional_recipe_keys():
    keys = SECTIONS["generators"]
    assert keys["moment_weight"].absent is REQUIRED and keys["l2_weight"].absent == 0.0
    assert issubclass(LossSettings, Settings)
