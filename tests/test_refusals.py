"""Set-ups that cannot work are refused when the trainer or distiller is built, naming both figures.

Before, each failed mid-run with a torch error naming neither argument.
"""

import pytest
import torch
from torch import nn

from fastdfd import Distiller, GeneratorEnsemble, GeneratorTrainer
from fastdfd.input_space import InputSpace
from fastdfd.models import create_model

from .conftest import randomize_bn_stats


def _teacher(num_classes=10, channels=1):
    return randomize_bn_stats(create_model("digits_teacher", num_classes=num_classes, in_channels=channels))


def _ensemble(k=10, num_classes=10, channels=1, size=16):
    return GeneratorEnsemble(k, num_classes, image_size=size, channels=channels, latent_dim=8, widths=(8, 8),
                             output_bn=False)


def test_ensemble_classes_beyond_the_teacher():
    with pytest.raises(ValueError, match=r"class ids up to 9 \(num_classes=10\) but the teacher has 5 outputs"):
        GeneratorTrainer(_teacher(num_classes=5), _ensemble(), progress=False)
    with pytest.raises(ValueError, match="class ids up to 9 .* 5 outputs"):
        Distiller(_teacher(num_classes=5), create_model("digits_student", num_classes=5), _ensemble(),
                  progress=False)


def test_a_subset_of_the_teachers_classes_is_fine():
    """Generators of classes 3 and 7 of a 10-class teacher train, with labels from their own classes only.

    The teacher here answers 7 whatever the image: its top-1 on the generated images is then
    exactly 0 for the class-3 generator and 1 for the class-7 one, which a label drawn from the
    wrong set (a local index 0, another generator's class, any class of the teacher) would change.
    """
    teacher = _teacher()
    head = [m for m in teacher.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(10.0 * torch.nn.functional.one_hot(torch.tensor(7), 10))
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 8), classes=[[3], [7]])
    before = {n: p.detach().clone() for n, p in ens.named_parameters()}
    trainer = GeneratorTrainer(teacher, ens, progress=False)
    rows = trainer.fit(2)

    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert [r["teacher_acc"] for r in rows] == [0.5, 0.5]  # half the images are class 7's
    assert all(not torch.equal(before[n], p) for n, p in ens.named_parameters() if n.startswith(("fc_", "conv"))), \
        "the generators did not train"
    z, y, local = ens.draw(16, None, torch.Generator().manual_seed(1))
    assert y.shape == (2, 16) and set(y[0].tolist()) == {3} and set(y[1].tolist()) == {7}
    assert set(local.flatten().tolist()) == {0}  # one class each: the position in its own set
    _, labels = ens.sample(5, rng=torch.Generator().manual_seed(2))
    assert labels.tolist() == [3] * 5 + [7] * 5
    report = trainer.quality(n_per_class=4, log=False)
    assert report.classes == [3, 7]
    assert report.teacher_per_class == {3: 0.0, 7: 1.0} and report.teacher_top1 == 0.5


def test_generator_channels_against_the_teacher():
    with pytest.raises(ValueError, match=r"1-channel images but the teacher's first convolution '.*' takes 3"):
        GeneratorTrainer(_teacher(channels=3), _ensemble(channels=1), progress=False)


def test_image_size_the_teacher_cannot_take():
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    with pytest.raises(ValueError, match=r"teacher \(Sequential\) cannot take the generators' images \[N, 1, 32, 32\]"):
        GeneratorTrainer(randomize_bn_stats(teacher), _ensemble(size=32), progress=False)


def test_non_square_images_refused():
    with pytest.raises(ValueError, match=r"non-square images are not supported: image_size=\(32, 48\)"):
        GeneratorEnsemble(10, 10, image_size=(32, 48))
    assert GeneratorEnsemble(2, 10, image_size=(16, 16), channels=1, widths=(8, 8)).spec.image_size == 16


def test_student_with_another_class_count():
    with pytest.raises(ValueError, match="the student has 7 outputs but the teacher has 10"):
        Distiller(_teacher(), create_model("digits_student", num_classes=7), _ensemble(), progress=False)


def test_student_that_is_the_teacher():
    teacher = _teacher()
    with pytest.raises(ValueError, match="the student is the teacher"):
        Distiller(teacher, teacher, _ensemble(), progress=False)
    shared = nn.Sequential(*teacher.children())  # a new module over the teacher's own layers
    with pytest.raises(ValueError, match=r"shares \d+ parameter\(s\) with the teacher"):
        Distiller(teacher, shared, _ensemble(), progress=False)


def test_softmax_teacher_refused_unless_declared():
    teacher = nn.Sequential(_teacher(), nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="outputs are probabilities .* teacher_outputs='probabilities'"):
        GeneratorTrainer(teacher, _ensemble(), progress=False)
    trainer = GeneratorTrainer(teacher, _ensemble(), progress=False, teacher_outputs="probabilities")
    history = trainer.fit(2)
    assert all(torch.isfinite(torch.tensor(r["ce"])) for r in history)
    with pytest.raises(ValueError, match="teacher_outputs='probabilities', but the teacher's rows are not"):
        GeneratorTrainer(_teacher(), _ensemble(), progress=False, teacher_outputs="probabilities")


def test_probabilities_teacher_trains_as_its_logits_teacher():
    """log(softmax(z)) has the softmax of z: cross-entropy and distillation are the logits teacher's."""
    base = _teacher()
    soft = nn.Sequential(base, nn.Softmax(dim=1))
    runs = []
    for teacher, outputs in ((base, "logits"), (soft, "probabilities")):
        torch.manual_seed(0)
        ens = _ensemble()
        # lr 1e-3: Adam's first steps move each weight by about lr whatever its gradient's size, so at the
        # default 1e-2 the last-bit differences of near-zero gradients show at 1e-5
        GeneratorTrainer(teacher, ens, progress=False, teacher_outputs=outputs, seed=3, lr=1e-3).fit(2)
        runs.append(ens.fc_z.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-6)


def test_input_space_channels_against_the_generators():
    with pytest.raises(ValueError, match="input space 'imagenet' has 3 channels of mean/std but the generators' "
                                         "images have 1"):
        GeneratorTrainer(_teacher(), _ensemble(), progress=False, input_space="imagenet")
    with pytest.raises(ValueError, match="unknown input space 'imagenet21k'"):
        GeneratorTrainer(_teacher(), _ensemble(), progress=False, input_space="imagenet21k")


def test_teacher_sees_normalised_pixels_and_the_student_the_same():
    """imagenet: the teacher's input is ((g + 1) / 2 - mean) / std of the generator's output g."""
    seen = {}

    class Spy(nn.Module):
        def __init__(self, net, tag):
            super().__init__()
            self.net, self.tag = net, tag

        def forward(self, x):
            seen[self.tag] = x.detach().clone()
            return self.net(x)

    teacher = Spy(_teacher(channels=3), "teacher")
    student = Spy(create_model("digits_student", num_classes=10, in_channels=3), "student")
    ens = _ensemble(channels=3)
    sample, drawn = ens.sample, []

    def recorded(*args, **kwargs):
        out = sample(*args, **kwargs)
        drawn.append(out[0].detach().clone())
        return out

    ens.sample = recorded
    # fold_teacher off: the Spy's forward records its input by a Python side effect, which a traced copy of the
    # teacher does not repeat (docs/api.md: such a forward is traced without it)
    distiller = Distiller(teacher, student, ens, progress=False, input_space="imagenet", batch_size=2, seed=5,
                          fold_teacher=False)
    distiller.fit(1)
    (g,) = drawn
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["teacher"], ((g + 1) / 2 - mean) / std)
    torch.testing.assert_close(seen["student"], seen["teacher"])


def test_a_zero_running_variance_is_named_before_training():
    """A BN channel with running_var = 0 makes its moment distance divide by eps alone: said up front, with the layer."""
    import warnings as _w

    from fastdfd.nn.matcher import MomentMatcher

    teacher = _teacher()
    bn = next(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    name = next(n for n, m in teacher.named_modules() if m is bn)
    with torch.no_grad():
        bn.running_var[:2] = 0
    with pytest.warns(RuntimeWarning, match=rf"2 BatchNorm channel\(s\) have running_var = 0: {name} \(2 of"):
        MomentMatcher(teacher)
    with _w.catch_warnings():
        _w.simplefilter("error")
        MomentMatcher(_teacher())  # healthy statistics: nothing said


def test_devices_are_resolved_or_refused_in_one_line(capsys):
    """`--device cuda` means this process's GPU (torch.cuda.set_device refuses an index-less device); `gpu` and a
    GPU the machine lacks are one-line errors naming the device, for every subcommand."""
    from fastdfd.cli import main
    from fastdfd.distributed import local_device

    assert local_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        local_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device.*use --device cpu"):
            local_device("cuda")
    else:  # pragma: no cover - a GPU machine
        assert local_device("cuda").index is not None
    args = ["--teacher", "digits_teacher", "--num-classes", "10", "--channels", "1", "--image-size", "16",
            "--steps", "1", "--out", "unused", "--weights", "unused.pt"]
    assert main(["train-generators", *args, "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown device 'gpu'" in err[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_teacher_in_another_dtype_is_refused_before_the_first_step(dtype):
    teacher = _teacher().to(dtype)
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=f"the teacher is {name} but the generator ensemble is float32"):
        GeneratorTrainer(teacher, ens, batch_size=2, progress=False, input_space="minus_one_one")
    student = create_model("digits_student", num_classes=10).to(dtype)
    with pytest.raises(ValueError, match=f"the teacher is {name} but the generator ensemble is float32"):
        Distiller(teacher, student, ens, progress=False, input_space="minus_one_one")


def test_a_teacher_on_another_device_is_named_with_both_devices():
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    teacher = _teacher().to("meta")
    with pytest.raises(ValueError, match="the teacher is on meta but the generator ensemble is on cpu"):
        GeneratorTrainer(teacher, ens, batch_size=2, progress=False, input_space="minus_one_one")
    student = create_model("digits_student", num_classes=10).to("meta")
    with pytest.raises(ValueError, match="the student is on meta but the generator ensemble is on cpu"):
        Distiller(_teacher(), student, ens, progress=False, input_space="minus_one_one")


@pytest.mark.parametrize("chunk", [2.5, True, "auto", 0, 3])
def test_bad_generator_chunks_are_refused_not_truncated(chunk):
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    bad = r"generators_per_step (= .*: expected a positive integer|must be an integer in \[1, 2\])"
    with pytest.raises(ValueError, match=bad):
        Distiller(_teacher(), create_model("digits_student", num_classes=10), ens, generators_per_step=chunk,
                  progress=False, input_space="minus_one_one")
    if chunk != "auto":  # the trainer's 'auto' is the memory planner's
        with pytest.raises(ValueError, match=bad):
            GeneratorTrainer(_teacher(), ens, generators_per_step=chunk, progress=False, input_space="minus_one_one")


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "-5", "argument --steps: expected a positive integer, got '-5'"),
    ("--generators-per-step", "abc", "argument --generators-per-step: 'abc': expected a positive integer, 'all' or 'auto'"),
])
def test_bad_numbers_on_the_command_line_name_their_flag(flag, value, message, capsys):
    from fastdfd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train-generators", "--teacher", "digits_teacher", "--weights", "unused.pt", "--out", "unused",
              flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_teacher_with_nan_weights_is_named_not_blamed_on_the_learning_rate():
    teacher = _teacher()
    with torch.no_grad():
        next(m for m in teacher.modules() if isinstance(m, nn.Conv2d)).weight[0, 0, 0, 0] = float("nan")
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    with pytest.raises(ValueError, match=r"the teacher's .*weight holds NaN or Inf: its weights are broken"):
        GeneratorTrainer(teacher, ens, batch_size=2, progress=False, input_space="minus_one_one")
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        Distiller(teacher, create_model("digits_student", num_classes=10), ens, progress=False,
                  input_space="minus_one_one")


def test_a_disk_error_is_one_line_naming_the_cause(tmp_path, monkeypatch, capsys):
    """A full disk (ENOSPC from the checkpoint write) and an --out that cannot be a directory: one line, status 2."""
    import errno

    from fastdfd.cli import main

    weights = tmp_path / "teacher.pt"
    torch.save(_teacher().state_dict(), weights)
    args = ["train-generators", "--teacher", "digits_teacher", "--weights", str(weights), "--num-classes", "10",
            "--channels", "1", "--image-size", "16", "--widths", "8,4", "--latent-dim", "8", "--batch-size", "2",
            "--steps", "2", "--checkpoint-every", "1", "--device", "cpu"]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([*args, "--out", str(blocker / "run")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("generators:")]
    assert len(err) == 1 and "cannot write or read" in err[0] and "a_file" in err[0], err

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr("fastdfd.checkpoint.torch.save", full)
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("generators:")]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert not list((tmp_path / "run").rglob("*.tmp"))  # nothing half-written left behind


def test_written_files_follow_the_umask_and_the_loader_fits_the_machine(tmp_path):
    import os as _os

    from fastdfd.checkpoint import atomic_save
    from fastdfd.train.teacher import DEFAULT_WORKERS, TeacherSettings

    old = _os.umask(0o022)
    try:
        path = atomic_save({"x": torch.zeros(1)}, tmp_path / "generators.pt")
    finally:
        _os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and (tmp_path / "generators.pt.sha256").stat().st_mode & 0o777 == 0o644
    assert TeacherSettings().workers == DEFAULT_WORKERS == min(4, max(1, (_os.cpu_count() or 1) // 2))


def test_a_bn_without_running_statistics_gets_advice_that_works():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                          nn.LazyLinear(10))
    model(torch.randn(2, 1, 16, 16))
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    t = GeneratorTrainer(model, ens, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"MomentMatcher\(\.\.\., skip_without_stats=True\).*the trainers take none"):
        t.fit(1)
