"""The command line: the quick demo end to end, and the user-teacher commands."""

import json

import pytest

from fastdfd.cli import main


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
    assert "data-free, 10-generator ensemble" in capsys.readouterr().out


def test_train_generators_distill_evaluate(tmp_path, teacher_file, capsys):
    gens = tmp_path / "gens"
    common = ["--teacher", "digits_teacher"]
    assert main(["train-generators", *common, "--weights", str(teacher_file), "--num-classes", "10",
                 "--channels", "1", "--image-size", "16", "--widths", "8,4", "--latent-dim", "8",
                 "--steps", "4", "--batch-size", "2", "--generators-per-step", "5", "--checkpoint-every", "2",
                 "--out", str(gens)]) == 0
    assert (gens / "generators.pt").is_file() and (gens / "metrics.csv").is_file()
    assert len(list((gens / "checkpoints").glob("step_*.pt"))) == 2
    # resuming a finished run does no more steps
    assert main(["train-generators", *common, "--weights", str(teacher_file), "--num-classes", "10",
                 "--channels", "1", "--image-size", "16", "--widths", "8,4", "--latent-dim", "8",
                 "--steps", "4", "--batch-size", "2", "--generators-per-step", "5", "--checkpoint-every", "2",
                 "--resume", "--out", str(gens)]) == 0
    assert "resumed at step 4" in capsys.readouterr().out

    dist = tmp_path / "dist"
    assert main(["distill", *common, "--teacher-weights", str(teacher_file), "--student", "digits_student",
                 "--generators", str(gens / "generators.pt"), "--steps", "3", "--batch-size", "2",
                 "--eval", "digits", "--out", str(dist)]) == 0
    summary = json.loads((dist / "summary.json").read_text())
    assert 0.0 <= summary["student_accuracy"] <= 1.0

    capsys.readouterr()
    assert main(["evaluate", "--model", "digits_student", "--weights", str(dist / "student.pt"),
                 "--data", "digits"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["student_accuracy"])


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
