"""Recipes: the bundled files, the schema's refusals, preflight refusals, and a digits run end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fastdfd.cli import main
from fastdfd.models import create_model, list_models
from fastdfd.models.weights import load_weights
from fastdfd.nn import GeneratorEnsemble
from fastdfd.recipes import compare_runs, list_recipes, load_recipe
from fastdfd.recipes.preflight import preflight
from fastdfd.recipes.schema import SECTIONS, TOP

REPO = Path(__file__).resolve().parents[2]
BUNDLED = ["cifar10_resnet34_resnet18", "cifar100_resnet34_resnet18", "cifar10_wrn40_2_wrn16_2",
           "cifar100_wrn40_2_wrn16_2", "imagenet_resnet50_resnet50", "imagenet_resnet50_resnet18",
           "imagenet_resnet50_mobilenetv2", "imagenet32_ensemble", "imagenet32_single", "digits",
           "cifar10_resnet56_resnet20"]

# a digits run of seconds: every stage, every file
TINY = ["teacher_training.epochs=1", "generators.updates_per_generator=4", "generators.batch_size=4",
        "generators.checkpoint_every=2", "generators.sample_every=2", "distill.steps=3", "distill.batch_size=4",
        "distill.checkpoint_every=2"]


def test_the_issue_s_settings_are_bundled():
    assert set(BUNDLED) <= set(list_recipes())


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_checks_builds_and_has_its_page(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    for section in ("teacher", "student"):
        assert recipe[section]["model"] in list_models()
    data, g = recipe["data"], recipe["generators"]
    with torch.device("meta"):
        GeneratorEnsemble(g["num_generators"], data["num_classes"], image_size=data["image_size"],
                          channels=data["channels"], latent_dim=g["latent_dim"], widths=g["widths"],
                          output_bn=g["output_bn"])
    page = re.search(r"^# Page: (\S+)", recipe.text, re.MULTILINE)
    assert page, f"{name}.toml names no docs page"
    text = (REPO / page.group(1)).read_text()
    assert name.split("_")[0] in text or name in text
    # the teacher's input space: the normalisation each dataset's teachers are trained with, stated on the page
    # (the JPEG test set's recipe: the field's pretrained checkpoints, trained on ImageNet mean/std)
    space = {"cifar10": "cifar10", "cifar100": "cifar100", "digits": "minus_one_one", "folder": "imagenet",
             "cifar10-jpeg-heldout": "imagenet"}
    assert recipe["teacher"]["input_space"] == space[data["dataset"]]
    assert f'`teacher.input_space = "{space[data["dataset"]]}"`' in " ".join(text.split())


def test_docs_key_table_is_the_schemas():
    """docs/recipes/README.md holds the table the schema makes (python -m fastdfd.recipes.keys_doc --write FILE)."""
    from fastdfd.recipes.keys_doc import BEGIN, END, keys_table

    text = (REPO / "docs" / "recipes" / "README.md").read_text()
    assert text.split(BEGIN)[1].split(END)[0].strip() == keys_table()
    documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", keys_table(), re.MULTILINE))
    assert documented == set(TOP) | {f"{s}.{k}" for s, fields in SECTIONS.items() for k in fields}


def _write(tmp_path: Path, edit) -> Path:
    text = (REPO / "fastdfd" / "recipes" / "digits.toml").read_text()
    path = tmp_path / "recipe.toml"
    path.write_text(edit(text))
    return path


def test_unknown_key_is_named_with_the_closest_known_one(tmp_path):
    path = _write(tmp_path, lambda t: t.replace("moment_weight = 10.0", "moment_wieght = 10.0"))
    with pytest.raises(ValueError, match=r"unknown recipe key generators\.moment_wieght .*did you mean 'moment_weight'"):
        load_recipe(path)
    with pytest.raises(ValueError, match=r"unknown recipe key distill\.lr_max"):
        load_recipe("digits", ["distill.lr_max=0.1"])
    with pytest.raises(ValueError, match=r"unknown recipe section 'generator'.*did you mean 'generators'"):
        load_recipe("digits", ["generator.lr=0.1"])
    with pytest.raises(ValueError, match=r"unknown recipe key bogus"):
        load_recipe(_write(tmp_path, lambda t: "bogus = 1\n" + t))


def test_missing_key_or_table_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing the key distill\.temperature"):
        load_recipe(_write(tmp_path, lambda t: t.replace("temperature = 4.0\n", "")))
    with pytest.raises(ValueError, match=r"missing the key teacher\.input_space \(the normalisation"):
        load_recipe(_write(tmp_path, lambda t: re.sub(r"\ninput_space = .*\n", "\n", t)))
    with pytest.raises(ValueError, match=r"missing the table \[student\]"):
        load_recipe(_write(tmp_path, lambda t: t.replace('[student]\nmodel = "digits_student"\n', "")))
    with pytest.raises(ValueError, match=r"\[teacher_training\] table but also teacher\.weights = 't\.pt'"):
        load_recipe(_write(tmp_path, lambda t: t.replace('weights = ""', 'weights = "t.pt"')))
    with pytest.raises(ValueError, match=r"no \[teacher_training\] table"):
        load_recipe(_write(tmp_path, lambda t: t.split("\n[teacher_training]")[0] + "\n[generators]" + t.split("\n[generators]")[1]))
    with pytest.raises(ValueError, match=r"not valid TOML"):
        load_recipe(_write(tmp_path, lambda t: t + "\n[distill\n"))


@pytest.mark.parametrize("override, message", [
    ("generators.kind='cosine'", r"generators\.kind = 'cosine': expected one of kl, kl_reverse, l2, mse"),
    ("generators.widths=[32, 0]", r"generators\.widths .*positive integers"),
    ("distill.steps=0", r"distill\.steps = 0: expected an integer, at least 1"),
    ("distill.steps=2.5", r"distill\.steps = 2\.5: expected an integer"),
    ("generators.autocast=1", r"generators\.autocast = 1: expected true or false"),
    ("generators.betas=[0.5]", r"generators\.betas = \[0\.5\]: expected a list of numbers, at least 0, 2 of them"),
    ("generators.l2_weight=-1", r"generators\.l2_weight = -1: expected a number, at least 0"),
    ("generators.generators_per_step=11", r"exceeds generators\.num_generators = 10"),
    ("distill.generators_per_step='auto'", r"distill\.generators_per_step = 'auto'"),
    ("data.root='/data'", r"digits takes root"),
    ("teacher.input_space='imagnet'", r"teacher\.input_space = 'imagnet': unknown input space 'imagnet'; presets are"),
    ("teacher.input_space='imagenet'", r"teacher\.input_space = 'imagenet': input space 'imagenet' has 3 channels of "
                                       r"mean/std but the data's images \(data\.channels = 1\) have 1 channel"),
    ("teacher.input_space='mean=0.5;std=-1'", r"teacher\.input_space = 'mean=0\.5;std=-1': .*std must be positive"),
    ("teacher.input_space=0.5", r"teacher\.input_space = 0\.5: expected a string"),
    # checks across a table's keys run at load too, not when the stage starts after the ones before it
    ("distill.momentum=1.0", r"distill\.momentum = 1\.0: must be below 1"),
    ("teacher_training.warmup_epochs=15", r"teacher_training\.warmup_epochs must be in \[0, epochs=15\)"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("digits", [override])


def test_overrides_are_typed_and_recorded():
    recipe = load_recipe("digits", ["generators.lr=3e-3", "generators.widths=[16, 8]", "name=mine"])
    assert recipe["generators"]["lr"] == 3e-3 and recipe["generators"]["widths"] == (16, 8)
    assert recipe.name == "mine" and recipe.overrides[0] == "generators.lr=3e-3"
    assert json.loads(recipe.resolved_json())["generators"]["widths"] == [16, 8]
    assert isinstance(load_recipe("digits", ["generators.lr=1"])["generators"]["lr"], float)


def test_the_input_space_reaches_the_data_and_every_stage():
    from fastdfd.recipes.runner import distill_settings, generator_settings

    raw_eval = torch.cat([x for x, _ in preflight(load_recipe("digits")).eval_loader])
    recipe = load_recipe("digits", ['teacher.input_space="identity"'])
    prep = preflight(recipe)
    assert prep.input_space.name == "identity"
    pixels = torch.cat([x for x, _ in prep.eval_loader])
    assert torch.allclose(pixels, (raw_eval + 1) / 2) and pixels.min() >= 0
    from fastdfd.data import make_train_dataset

    raw_train, _ = make_train_dataset("digits", image_size=16, augment=False)
    assert torch.allclose(prep.train_set[3][0], (raw_train[3][0] + 1) / 2)  # the teacher learns in its space
    assert preflight(load_recipe("digits")).train_set[3][0].min() < 0  # minus_one_one: the digits as they are
    # the stages' settings objects, each built from its own fields of the table, seeded per stage
    g, d = generator_settings(recipe), distill_settings(recipe, 1)
    assert g["loss"].kind == recipe["generators"]["kind"] and g["optim"].betas == recipe["generators"]["betas"]
    assert g["loop"].seed == recipe["seed"] + 1 and d["loop"].seed == recipe["seed"] + 2
    assert d["settings"].temperature == recipe["distill"]["temperature"]
    # an alias is recorded by the preset's name (resolved.json), custom values as written
    assert load_recipe("digits", ['teacher.input_space="[-1,1]"'])["teacher"]["input_space"] == "minus_one_one"
    assert load_recipe("digits", ['teacher.input_space="mean=0.5;std=0.5"'])["teacher"]["input_space"] == \
        "mean=0.5;std=0.5"


def _run(tmp_path, *args) -> int:
    return main(["run", "digits", "--out", str(tmp_path / "run"), "--no-progress", *args])


def test_missing_dataset_root_is_refused_before_any_work(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    args = ["--set", "data.dataset='cifar10'", "--set", f"data.root='{missing}'"]
    assert _run(tmp_path, *args) == 2
    assert f"dataset root not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_teacher_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("digits_student", num_classes=10).state_dict(), wrong)
    recipe = load_recipe("digits", [f"teacher.weights='{wrong}'"])
    assert "teacher_training" not in recipe.values  # a teacher of one's own replaces the training table
    with pytest.raises(ValueError, match=rf"teacher weights {re.escape(str(wrong))} do not match the architecture"):
        preflight(recipe)
    path = _write(tmp_path, lambda t: t.split("\n[teacher_training]")[0].replace('weights = ""', f"weights = '{wrong}'")
                  + "\n[generators]" + t.split("\n[generators]")[1])
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "do not match the architecture" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_whose_class_count_is_not_the_teacher_s_is_refused(tmp_path, capsys):
    assert _run(tmp_path, "--set", "data.num_classes=12") == 2
    assert "has 10 classes but the teacher has 12" in capsys.readouterr().err
    from tests.data.test_data import _batch, _dump  # the fake torchvision CIFAR layout

    rng = __import__("numpy").random.default_rng(0)
    for split in ("train", "test"):
        _dump(tmp_path / "c100" / "cifar-100-python" / split, _batch(rng, 4, 100, b"fine_labels")[2])
    recipe = load_recipe("cifar10_resnet34_resnet18", ["data.dataset='cifar100'", f"data.root='{tmp_path / 'c100'}'"])
    with pytest.raises(ValueError, match=r"has 100 classes but the teacher has 10 \(data\.num_classes\)"):
        preflight(recipe)


def test_torchvision_resnet_checkpoints_load_under_our_names(tmp_path):
    model = create_model("resnet18_imagenet", num_classes=7)
    state = {k.replace(".shortcut.", ".downsample."): v + 1 for k, v in model.state_dict().items()}
    assert any(".downsample." in k for k in state)
    path = tmp_path / "tv.pt"
    torch.save(state, path)
    fresh = load_weights(create_model("resnet18_imagenet", num_classes=7), path, "teacher")
    assert torch.equal(fresh.layer2[0].shortcut[0].weight, model.layer2[0].shortcut[0].weight + 1)


def test_digits_recipe_runs_end_to_end_and_describes_itself(tmp_path, capsys):
    assert _run(tmp_path, *[a for s in TINY for a in ("--set", s)]) == 0
    run = tmp_path / "run"
    for name in ("recipe.toml", "resolved.json", "environment.json", "status.json", "results.json",
                 "teacher/teacher.pt", "teacher/metrics.csv", "generators/generators.pt", "generators/metrics.csv",
                 "distill/student.pt", "distill/metrics.csv"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "generators" / "samples").glob("*.png")) == ["step_00000002.png", "step_00000004.png"]
    assert (run / "recipe.toml").read_text() == (REPO / "fastdfd/recipes/digits.toml").read_text()
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["generators"]["updates_per_generator"] == 4
    assert resolved["teacher"]["input_space"] == "minus_one_one"
    assert json.loads((run / "generators" / "summary.json").read_text())["input_space"]["name"] == "minus_one_one"
    assert json.loads((run / "distill" / "summary.json").read_text())["input_space"]["name"] == "minus_one_one"
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["processes"] == 1 and env["overrides"] == TINY
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["student_accuracy"] <= 1 and 0 <= results["teacher_accuracy"] <= 1
    assert results["paper"].startswith("none")
    status = json.loads((run / "status.json").read_text())
    assert all(status[s]["done"] for s in ("teacher", "generators", "distill"))
    rows = (run / "generators" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 4  # 10 generators all at once: 4 steps
    # a finished run is not overwritten, and a different recipe does not resume it
    assert _run(tmp_path, *[a for s in TINY for a in ("--set", s)]) == 2
    assert "not empty; pass --resume" in capsys.readouterr().err
    changed = [*TINY[:-1], "distill.checkpoint_every=3"]
    assert _run(tmp_path, "--resume", *[a for s in changed for a in ("--set", s)]) == 2
    assert "distill.checkpoint_every: 2 -> 3" in capsys.readouterr().err
    # resuming the finished run does nothing and changes nothing
    before = (run / "distill" / "student.pt").read_bytes()
    assert _run(tmp_path, "--resume", *[a for s in TINY for a in ("--set", s)]) == 0
    assert (run / "distill" / "student.pt").read_bytes() == before
    # two runs compared: the recipe value that differs, and the results side by side
    other = tmp_path / "other"
    assert main(["run", "digits", "--out", str(other), "--no-progress", "--set", "seed=1",
                 *[a for s in TINY for a in ("--set", s)]]) == 0
    text = compare_runs(run, other)
    assert "seed: 0 -> 1" in text and "student_accuracy" in text
    with pytest.raises(FileNotFoundError, match="not a fastdfd run directory"):
        compare_runs(run, tmp_path)


def test_digits_recipe_in_turns_keeps_training_the_generators(tmp_path):
    turns = ["generators.updates_per_generator=5", "turns.pool=64", "turns.generator_steps=1", "turns.student_steps=2"]
    assert _run(tmp_path, *[a for s in [*TINY, *turns] for a in ("--set", s)]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "resolved.json").read_text())["turns"] == {"pool": 64, "generator_steps": 1,
                                                                        "student_steps": 2}
    # the warm-up's last step is saved for the turns to continue from; 2 rounds for the student's 3 steps
    assert (run / "generators" / "checkpoints" / "step_00000005.pt").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["distill"]["done"] and status["distill"]["generator_steps"] == 5 + 2
    assert (run / "distill" / "generators.pt").is_file() and (run / "distill" / "student.pt").is_file()
    rows = (run / "generators" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 8))
    # refused before any work: offloaded generators, and a [turns] table that does not name every key
    with pytest.raises(ValueError, match=r"\[turns\] trains the generators beside the student"):
        load_recipe("digits", [*turns, "generators.offload=true"])
    with pytest.raises(ValueError, match="recipe is missing the key turns.student_steps"):
        load_recipe("digits", turns[:3])
    with pytest.raises(ValueError, match="needs generator_steps >= 1"):
        load_recipe("digits", [*turns, "turns.generator_steps=0"])
    with pytest.raises(ValueError, match=r"CUDA graph cannot capture; set generators\.cuda_graph"):
        load_recipe("digits", [*turns, "generators.cuda_graph='on'"])
    with pytest.raises(ValueError, match="no student to play against"):
        load_recipe("digits", [*turns, "generators.adversarial_weight=0.1"])
    # under torchrun the turns must make the warm-up's chunk: "auto" would plan it again
    from fastdfd.recipes.runner import _check_turns

    auto = load_recipe("digits", [*turns, "generators.generators_per_step='auto'"])
    _check_turns(auto, 1)
    with pytest.raises(ValueError, match="under torchrun with generators.generators_per_step"):
        _check_turns(auto, 2)


def test_recipe_runs_sharded_under_torchrun(tmp_path, teacher_file):
    import subprocess
    import sys

    from ..test_runs_survive import _env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdfd",
           "run", "digits", "--device", "cpu", "--no-progress", *[a for s in TINY[1:] for a in ("--set", s)]]
    # the teacher is trained in one process: refused up front under torchrun
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "refused")], capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode != 0 and "teacher training runs in one process" in proc.stderr
    assert not (tmp_path / "refused").exists()
    proc = subprocess.run([*cmd, "--set", f"teacher.weights='{teacher_file}'", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "run"
    assert json.loads((run / "environment.json").read_text())["processes"] == 2
    results = json.loads((run / "results.json").read_text())
    assert results["processes"] == 2 and 0 <= results["student_accuracy"] <= 1
    assert "teacher" not in json.loads((run / "status.json").read_text())
    assert torch.load(run / "generators" / "generators.pt", weights_only=True)["state"]["fc_z"].shape[0] == 10
    # each rank owns 5 generators and gave each the recipe's 4 updates: 4 steps per rank
    for rank in (0, 1):
        assert (run / "generators" / "checkpoints" / f"rank_{rank:05d}" / "step_00000004.pt").is_file()


def test_generators_that_cannot_be_built_and_uneven_splits_are_refused():
    from fastdfd.distributed import DistContext
    from fastdfd.recipes.runner import _distill_chunk

    with pytest.raises(ValueError, match=r"\[generators\] cannot be built: image_size 18"):
        preflight(load_recipe("digits", ["data.image_size=18"]))
    recipe = load_recipe("digits", ["distill.generators_per_step=4"])
    assert _distill_chunk(recipe, 2) == 2  # the recipe's chunk is global: each process samples its share
    with pytest.raises(ValueError, match=r"distill\.generators_per_step = 4 cannot be split evenly over 3"):
        _distill_chunk(recipe, 3)
    with pytest.raises(ValueError, match=r"10 generators cannot be split evenly over 3 processes"):
        DistContext(0, 3).shard(recipe["generators"]["num_generators"])
