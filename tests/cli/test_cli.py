"""The command line: the quick demo end to end, the user-teacher commands, and the teacher's input space
(flags, and the eval and training data fed in it)."""

import json

import pytest
import torch

from fastdfd.cli import build_parser, main
from fastdfd.data import CIFAR, make_eval_loader, make_train_dataset
from fastdfd.data.loaders import in_input_space
from fastdfd.input_space import InputSpace
from tests.data.test_data import _write_folder, cifar10_root  # noqa: F401  (a fixture: fake CIFAR-10 on disk)


def test_quick_demo_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("teacher_accuracy", "ensemble_student_accuracy", "single_generator_student_accuracy",
                "real_data_student_accuracy", "seconds"):
        assert key in metrics
    for key in ("teacher_accuracy", "ensemble_student_accuracy", "real_data_student_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["teacher_accuracy"] > 0.5  # one epoch already learns digits
    assert (out / "samples.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
    for name in ("ensemble", "single_generator"):
        for key in ("teacher_top1_on_generated", "verifier_top1_on_generated"):
            assert 0.0 <= metrics[key][name] <= 1.0
        assert json.loads((out / f"quality_{name}" / "quality.json").read_text())["n_per_class"] == 100
        assert (out / f"quality_{name}" / "quality_samples.png").stat().st_size > 0
    assert "data-free, 10-generator ensemble" in capsys.readouterr().out


def test_train_generators_distill_evaluate(tmp_path, teacher_file, capsys):
    gens = tmp_path / "gens"
    common = ["--teacher", "digits_teacher", "--input-space", "minus_one_one"]  # the digits teacher sees [-1, 1]
    gen_args = [*common, "--weights", str(teacher_file), "--num-classes", "10", "--channels", "1", "--image-size",
                "16", "--widths", "8,4", "--latent-dim", "8", "--steps", "4", "--batch-size", "2",
                "--generators-per-step", "5", "--checkpoint-every", "2", "--out", str(gens)]
    assert main(["train-generators", *gen_args]) == 0
    assert (gens / "generators.pt").is_file() and (gens / "metrics.csv").is_file()
    assert len(list((gens / "checkpoints").glob("step_*.pt"))) == 2
    assert json.loads((gens / "summary.json").read_text())["input_space"] == {
        "name": "minus_one_one", "spec": "minus_one_one", "mean": [0.5], "std": [0.5]}
    # resuming a finished run does no more steps
    assert main(["train-generators", *gen_args, "--resume"]) == 0
    assert "resumed at step 4" in capsys.readouterr().out

    dist = tmp_path / "dist"
    assert main(["distill", *common, "--teacher-weights", str(teacher_file), "--student", "digits_student",
                 "--generators", str(gens / "generators.pt"), "--steps", "3", "--batch-size", "2",
                 "--eval", "digits", "--out", str(dist)]) == 0
    summary = json.loads((dist / "summary.json").read_text())
    assert 0.0 <= summary["student_accuracy"] <= 1.0 and summary["input_space"]["name"] == "minus_one_one"

    capsys.readouterr()
    assert main(["evaluate", "--model", "digits_student", "--weights", str(dist / "student.pt"),
                 "--data", "digits", "--input-space", "[-1,1]"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(summary["student_accuracy"]) and result["input_space"] == "minus_one_one"

    # distilling in another space than the generators were trained against is refused before any work
    assert main(["distill", "--teacher", "digits_teacher", "--teacher-weights", str(teacher_file), "--student",
                 "digits_student", "--generators", str(gens / "generators.pt"), "--steps", "3",
                 "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "--input-space identity: the generators in" in err and "pass --input-space minus_one_one" in err
    assert not (tmp_path / "never").exists()


def test_train_generators_flags_start_from_a_preset():
    from fastdfd.cli.commands import generator_settings_from_flags
    from fastdfd.settings import preset

    base = ["train-generators", "--teacher", "t", "--weights", "w", "--num-classes", "10", "--out", "o"]
    s = generator_settings_from_flags(build_parser().parse_args(base))
    assert (s["architecture"], s["loss"], s["optim"]) == tuple(vars(preset("default")).values())
    paper = generator_settings_from_flags(build_parser().parse_args(
        [*base, "--preset", "paper", "--ce-weight", "0.5", "--no-output-bn", "--widths", "16,8", "--betas", "0.9,0.99",
         "--layer-weights", "2,1,1", "--cuda-graph", "auto", "--generators-per-step", "all"]))
    want = preset("paper").replace(ce_weight=0.5, output_bn=False, widths=(16, 8), betas=(0.9, 0.99),
                                   layer_weights=(2.0, 1.0, 1.0))
    assert (paper["architecture"], paper["loss"], paper["optim"]) == tuple(vars(want).values())
    assert paper["execution"].cuda_graph == "auto" and paper["execution"].generators_per_step is None


def test_a_bad_setting_flag_is_one_line_naming_the_flag(capsys):
    base = ["train-generators", "--teacher", "t", "--weights", "w", "--num-classes", "10", "--out", "o"]
    for flag, value, expected in [("--ce-weight", "-1", "at least 0"), ("--scope", "class", "expected one of ensemble, generator"),
                                  ("--betas", "0.9", "2 of them"), ("--generators-per-step", "0", "'all' or 'auto'")]:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*base, flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and expected in err, err


def test_cli_refuses_bad_input_clearly(tmp_path, teacher_file, capsys):
    assert main(["evaluate", "--model", "resnet18", "--weights", str(teacher_file), "--data", "digits",
                 "--channels", "1"]) == 2
    assert "do not match the architecture" in capsys.readouterr().err
    assert main(["evaluate", "--model", "digits_teacher", "--weights", str(tmp_path / "none.pt"),
                 "--data", "digits"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["evaluate", "--model", "digits_teacher", "--weights", str(teacher_file),
                 "--data", "imagenet:/x"]) == 2
    assert "digits" in capsys.readouterr().err
    assert main(["evaluate", "--model", "digits_teacher", "--weights", str(teacher_file), "--data", "digits",
                 "--num-classes", "5"]) == 2
    assert "classes" in capsys.readouterr().err


# ---------------------------------------------------------------- the teacher's input space


def _images(loader) -> torch.Tensor:
    return torch.cat([x for x, _ in loader])


def test_eval_digits_in_an_input_space():
    native = _images(make_eval_loader("digits")[0])  # no input space: the digits' own [-1, 1]
    pixels = _images(make_eval_loader("digits", input_space="identity")[0])
    assert torch.allclose(pixels, (native + 1) / 2) and pixels.min() >= 0 and pixels.max() <= 1
    assert torch.allclose(_images(make_eval_loader("digits", input_space="minus_one_one")[0]), native, atol=1e-6)
    custom = _images(make_eval_loader("digits", input_space="mean=0.25;std=0.5")[0])
    assert torch.allclose(custom, (pixels - 0.25) / 0.5, atol=1e-6)
    with pytest.raises(ValueError, match=r"input space 'imagenet' has 3 channels of mean/std but the images of "
                                         r"digits have 1 channel"):
        make_eval_loader("digits", input_space="imagenet")


def test_eval_cifar_and_folders_in_an_input_space(cifar10_root, tmp_path):
    root, batches = cifar10_root
    spec = f"cifar10:{root}"
    expect = torch.from_numpy(batches["test_batch"][0]).view(-1, 3, 32, 32).float() / 255
    pixels = _images(make_eval_loader(spec, input_space="identity")[0])
    assert torch.allclose(pixels, expect)
    assert torch.allclose(_images(make_eval_loader(spec, input_space="cifar10")[0]),
                          _images(make_eval_loader(spec)[0]), atol=1e-5)
    imagenet = InputSpace.preset("imagenet")
    assert torch.allclose(_images(make_eval_loader(spec, input_space=imagenet)[0]), imagenet.normalize(expect),
                          atol=1e-5)
    assert _images(make_eval_loader(spec, image_size=16, input_space="identity")[0]).shape[1:] == (3, 16, 16)

    folder = tmp_path / "folder"
    _write_folder(folder)
    native = _images(make_eval_loader(f"folder:{folder}", image_size=28)[0])  # ImageNet mean/std by itself
    pixels = _images(make_eval_loader(f"folder:{folder}", image_size=28, input_space="identity")[0])
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert torch.allclose(imagenet.normalize(pixels), native, atol=1e-5)


def test_training_data_in_an_input_space(cifar10_root):
    root, _ = cifar10_root
    spec = f"cifar10:{root}"
    train, _ = make_train_dataset(spec, augment=False)
    pixels = in_input_space(train, spec, "identity")
    assert pixels.num_classes == 10 and len(pixels) == len(train)
    raw = CIFAR(root, name="cifar10", split="train", normalize=False)
    for i in (0, 3):
        assert torch.allclose(pixels[i][0], raw[i][0], atol=1e-6) and pixels[i][1] == raw[i][1]
    assert in_input_space(train, spec, "cifar10") is train and in_input_space(train, spec, None) is train
    digits, _ = make_train_dataset("digits")
    assert torch.allclose(in_input_space(digits, "digits", "identity")[5][0], (digits[5][0] + 1) / 2)
    with pytest.raises(ValueError, match=r"'imagenet' has 3 channels"):
        in_input_space(digits, "digits", "imagenet")


def test_input_space_refusals_name_the_flag(tmp_path, teacher_file, capsys):
    never = tmp_path / "never"
    base = ["train-generators", "--teacher", "digits_teacher", "--weights", str(teacher_file), "--num-classes", "10",
            "--channels", "1", "--steps", "1", "--out", str(never)]
    assert main([*base, "--input-space", "imagnet"]) == 2
    assert "--input-space 'imagnet': unknown input space 'imagnet'; presets are" in capsys.readouterr().err
    assert main([*base, "--input-space", "imagenet"]) == 2
    assert ("--input-space 'imagenet': input space 'imagenet' has 3 channels of mean/std but the images (--channels) "
            "have 1 channel(s)") in capsys.readouterr().err
    assert main([*base, "--input-space", "mean=0.5;std=0"]) == 2
    assert "--input-space 'mean=0.5;std=0': input space std must be positive" in capsys.readouterr().err
    assert main(["distill", "--teacher", "digits_teacher", "--teacher-weights", str(teacher_file), "--student",
                 "digits_student", "--generators", str(tmp_path / "g.pt"), "--input-space", "bogus",
                 "--out", str(never)]) == 2
    assert "--input-space 'bogus': unknown input space" in capsys.readouterr().err
    assert main(["evaluate", "--model", "digits_teacher", "--weights", str(teacher_file), "--data", "digits",
                 "--input-space", "imagenet"]) == 2
    assert ("--input-space imagenet and --data digits: input space 'imagenet' has 3 channels of mean/std but the "
            "images of digits have 1 channel(s)") in capsys.readouterr().err
    assert not never.exists()


def test_train_teacher_feeds_its_training_and_eval_data_in_its_input_space(tmp_path, monkeypatch):
    import fastdfd.cli.teacher as cli_teacher

    seen = {}

    def fake_train_teacher(model, train_set, settings, *, eval_loader, checkpoint_path, **kwargs):
        seen["train"], seen["eval"] = train_set, eval_loader
        torch.save(model.state_dict(), checkpoint_path)
        return {"accuracy": 0.5, "history": [{"train_loss": 1.0, "train_acc": 0.5, "seconds": 0.1}]}

    monkeypatch.setattr(cli_teacher, "train_teacher", fake_train_teacher)
    argv = ["train-teacher", "--model", "digits_teacher", "--data", "digits", "--workers", "0", "--no-progress"]
    assert build_parser().parse_args([*argv, "--out", "x"]).input_space == "identity"  # the default everywhere
    raw, _ = make_train_dataset("digits")
    held_out = _images(make_eval_loader("digits")[0])
    for space, expect in (("identity", lambda x: (x + 1) / 2), ("minus_one_one", lambda x: x),
                          ("mean=0.25;std=0.5", lambda x: ((x + 1) / 2 - 0.25) / 0.5)):
        out = tmp_path / space.replace(";", "_")
        assert main([*argv, "--input-space", space, "--out", str(out)]) == 0
        assert torch.allclose(seen["train"][7][0], expect(raw[7][0]), atol=1e-6)
        assert torch.allclose(_images(seen["eval"]), expect(held_out), atol=1e-6)
        recorded = json.loads((out / "summary.json").read_text())["input_space"]
        assert InputSpace.parse(recorded) == InputSpace.parse(space)  # a spec that parses back
