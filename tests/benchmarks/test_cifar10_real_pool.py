"""benchmarks.cifar10_real_pool at toy size on a synthetic test tar: the real-image diagnostic beside the CIFAR-10
benchmark learns from the tune half labelled by the teacher, scores the held-out half, and refuses bad flags."""

from __future__ import annotations

import json

import pytest
import torch

from .test_cifar10_datafree import data_dir  # noqa: F401  (the fixture: a synthetic tar and a teacher)


def test_the_pool_holds_the_tune_half_with_the_teachers_logits_not_the_labels(data_dir):  # noqa: F811
    from benchmarks.cifar10_datafree import INPUT_SPACE, Settings, _teacher
    from benchmarks.cifar10_real_pool import real_pool
    from fastdfd.data import CIFAR10JPEG
    from fastdfd.input_space import InputSpace

    s = Settings(data=str(data_dir), teacher="resnet20")
    teacher = _teacher(s)
    pool = real_pool(s, teacher)
    tune = CIFAR10JPEG(data_dir, split="tune", normalize=False)
    assert len(pool) == len(tune) == 20  # two tune images per class; the held-out one is not in it
    x, logits = pool.draw(200, torch.Generator().manual_seed(0))
    expected = InputSpace.parse(INPUT_SPACE).normalize(tune.pixels())
    # every drawn row is one of the tune images, normalised as the teacher expects, beside the teacher's logits
    match = (x.flatten(1)[:, None] - expected.flatten(1)[None]).abs().amax(2).argmin(1)
    torch.testing.assert_close(x, expected[match])
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(expected)[match])


def test_a_toy_run_writes_its_result_and_spends_exactly_its_steps(data_dir, tmp_path):  # noqa: F811
    from benchmarks import cifar10_real_pool

    out = tmp_path / "run"
    result = cifar10_real_pool.main(["--data", str(data_dir), "--teacher", "resnet20", "--steps", "3",
                                     "--out", str(out)])
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["distill_steps"] == 3 and result["settings"]["distill"]["mix"] == "cutmix"
    assert 0.0 <= result["student_top1_heldout"] <= 1.0 and result["teacher_top1_heldout"] >= 0.0
    assert f"({torch.backends.cpu.get_cpu_capability()})" in result["machine"]


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_a_step_count_that_is_not_positive_is_refused(data_dir, tmp_path, steps, capsys):  # noqa: F811
    from benchmarks import cifar10_real_pool

    with pytest.raises(SystemExit):
        cifar10_real_pool.main(["--data", str(data_dir), "--steps", steps, "--out", str(tmp_path / "x")])
    assert "--steps must be positive" in capsys.readouterr().err
