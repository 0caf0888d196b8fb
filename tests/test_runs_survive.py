"""Runs under torchrun, and runs that are killed: the CLI as a user drives it, in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdfd.models import create_model
from fastdfd.settings import LoopSettings, OptimizerSettings

from .conftest import randomize_bn_stats

ARGS = ["--teacher", "digits_teacher", "--num-classes", "10", "--channels", "1", "--image-size", "16",
        "--widths", "8,4", "--latent-dim", "8", "--batch-size", "2", "--device", "cpu"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def test_train_and_distill_under_torchrun_with_two_processes(tmp_path, teacher_file):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdfd",
           "train-generators", *ARGS, "--weights", str(teacher_file), "--scope", "ensemble", "--steps", "4",
           "--checkpoint-every", "2", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ensemble = _params(tmp_path / "run" / "generators.pt")
    assert ensemble["fc_z"].shape[0] == 10  # both shards, put back together by rank 0
    for rank in (0, 1):
        assert len(list((tmp_path / "run" / "checkpoints" / f"rank_{rank:05d}").glob("step_*.pt"))) == 2
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "manifest_step_00000004.json").read_text())
    assert manifest["shards"] == ["rank_00000/step_00000004.pt", "rank_00001/step_00000004.pt"]
    # a step whose manifest is missing (as if a rank died while saving) is not resumed from
    (tmp_path / "run" / "checkpoints" / "manifest_step_00000004.json").unlink()
    again = subprocess.run(cmd[:-2] + ["--resume", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                           timeout=300, env=_env())
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed at step 2" in again.stdout

    distill = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdfd",
               "distill", "--teacher", "digits_teacher", "--teacher-weights", str(teacher_file), "--student",
               "digits_student", "--generators", str(tmp_path / "run" / "generators.pt"), "--steps", "3",
               "--batch-size", "2", "--device", "cpu", "--eval", "digits", "--out", str(tmp_path / "student")]
    proc = subprocess.run(distill, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "student" / "student.pt").is_file() and (tmp_path / "student" / "summary.json").is_file()


def test_a_killed_run_resumes_bit_identically(tmp_path, teacher_file):
    base = [sys.executable, "-m", "fastdfd", "train-generators", *ARGS, "--weights", str(teacher_file),
            "--steps", "150", "--checkpoint-every", "10"]
    whole = subprocess.run(base + ["--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=600,
                           env=_env())
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    victim = subprocess.Popen(base + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=_env())
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_00000030.pt").exists():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "generators.pt").exists()
    resumed = subprocess.run(base + ["--resume", "--out", str(out)], capture_output=True, text=True, timeout=600,
                             env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stdout
    a, b = _params(tmp_path / "whole" / "generators.pt"), _params(out / "generators.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    from fastdfd import GeneratorEnsemble, GeneratorTrainer

    torch.manual_seed(0)
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))

    def trainer():
        torch.manual_seed(1)
        ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
        return GeneratorTrainer(teacher, ens, batch_size=2, progress=False, checkpoint_dir=tmp_path / "ck",
                                checkpoint_every=2, keep_checkpoints=3)

    trainer().fit(6)
    newest = tmp_path / "ck" / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # cut short, as by a full disk
    again = trainer()
    with pytest.warns(RuntimeWarning, match="(unreadable|SHA-256).*trying the previous"):
        assert again.resume()
    assert again.step == 4


def test_a_checkpoint_overwritten_in_place_is_refused_and_the_run_still_ends_bit_identical(tmp_path):
    """4 KB overwritten in the middle of the newest checkpoint, the size unchanged: torch.load reads it, the
    digest does not match, so the resume takes the previous one and the final generators are an uninterrupted
    run's."""
    from fastdfd import GeneratorEnsemble, GeneratorTrainer
    from fastdfd.checkpoint import CorruptCheckpointError, load_file

    torch.manual_seed(0)
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))

    def trainer(ck):
        torch.manual_seed(1)
        ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
        return GeneratorTrainer(teacher, ens, batch_size=2, progress=False, checkpoint_dir=ck, checkpoint_every=2,
                                keep_checkpoints=3)

    whole = trainer(tmp_path / "whole")
    whole.fit(8)
    cut = trainer(tmp_path / "ck")
    cut.fit(6)
    newest = tmp_path / "ck" / "step_00000006.pt"
    data = bytearray(newest.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(4096)[: len(data[mid:mid + 4096])]
    newest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="does not match its SHA-256"):
        load_file(newest, GeneratorTrainer.FORMAT)
    again = trainer(tmp_path / "ck")
    with pytest.warns(RuntimeWarning, match="SHA-256.*trying the previous"):
        assert again.resume()
    assert again.step == 4
    again.fit(4)
    for name, value in whole.ensemble.state_dict().items():
        assert torch.equal(value, again.ensemble.state_dict()[name]), name
    assert not list((tmp_path / "ck").glob(".*.tmp"))  # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.sha256")) == [
        "step_00000004.pt.sha256", "step_00000006.pt.sha256", "step_00000008.pt.sha256"]


def test_sample_grids_are_written_and_leave_training_unchanged(tmp_path):
    from fastdfd import GeneratorEnsemble, GeneratorTrainer

    torch.manual_seed(0)
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))

    def run(**kw):
        torch.manual_seed(1)
        ens = GeneratorEnsemble(3, 9, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
        GeneratorTrainer(teacher, ens, batch_size=2, progress=False, **kw).fit(4)
        return ens

    with_grids = run(sample_every=2, sample_dir=tmp_path / "samples")
    plain = run()
    pngs = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert pngs == ["step_00000002.png", "step_00000004.png"]
    data = (tmp_path / "samples" / pngs[0]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[16:24] == (8 * 16).to_bytes(4, "big") + (3 * 16).to_bytes(4, "big")  # 8 images x 3 generators
    for name, p in plain.state_dict().items():
        assert torch.equal(p, with_grids.state_dict()[name]), name


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_one_line(tmp_path, teacher_file, sig, status):
    """Ctrl-C or SIGTERM: the current step ends, a checkpoint of it is written (however far the next periodic one
    is), one line says so, the exit status is 128 + the signal; --resume then goes on from that step."""
    base = [sys.executable, "-m", "fastdfd", "train-generators", *ARGS, "--weights", str(teacher_file),
            "--steps", "100000", "--checkpoint-every", "100000", "--out", str(tmp_path / "run")]
    victim = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 1):
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(sig)
    err = victim.communicate(timeout=120)[1]
    assert victim.returncode == status, err[-3000:]
    said = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("generators:")]  # less the progress bar
    assert len(said) == 1 and f"stopped by {signal.Signals(sig).name} after step" in said[0], said
    assert "Traceback" not in err
    step = int(said[0].split("after step ")[1].split(":")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step_{step:08d}.pt").exists()
    rows = metrics.read_text().splitlines()[1:]
    assert int(rows[-1].split(",")[0]) == step  # every step up to the stop was logged


@pytest.mark.parametrize("log_name", ["metrics.csv", "metrics.jsonl"])
def test_a_resumed_run_logs_each_step_once(tmp_path, log_name):
    from fastdfd import GeneratorEnsemble, GeneratorTrainer

    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))

    def trainer():
        torch.manual_seed(1)
        ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
        return GeneratorTrainer(teacher, ens, batch_size=2, progress=False, checkpoint_dir=tmp_path / "ck",
                                checkpoint_every=4, log_every=1, log_path=tmp_path / log_name, tensorboard=False)

    trainer().fit(6)  # steps 5 and 6 logged, the newest checkpoint at 4
    again = trainer()
    assert again.resume() and again.step == 4
    again.fit(3)
    text = (tmp_path / log_name).read_text().splitlines()
    steps = ([int(r.split(",")[0]) for r in text[1:]] if log_name.endswith(".csv")
             else [json.loads(r)["step"] for r in text])
    assert steps == [1, 2, 3, 4, 5, 6, 7]


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    from fastdfd import GeneratorEnsemble
    from fastdfd.distributed import DistContext
    from fastdfd.pipeline import train_generators

    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    train_generators(teacher, ens, tmp_path / "typo", ctx=DistContext(), device=torch.device("cpu"), steps=1,
                     resume=True, quality_per_class=0, optim=OptimizerSettings(batch_size=2),
                     loop=LoopSettings(progress=False, tensorboard=False))
    assert (f"generators: --resume found nothing to resume in {tmp_path / 'typo' / 'checkpoints'} "
            "(no such directory); starting at step 0") in capsys.readouterr().out


def test_a_resume_against_another_teacher_or_other_generators_is_refused(tmp_path):
    from fastdfd import Distiller, GeneratorEnsemble, GeneratorTrainer
    from fastdfd.checkpoint import CheckpointError

    def ens(seed=1):
        torch.manual_seed(seed)
        return GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)

    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10), seed=0)
    other = randomize_bn_stats(create_model("digits_teacher", num_classes=10), seed=5)
    a = GeneratorTrainer(teacher, ens(), batch_size=2, progress=False, checkpoint_dir=tmp_path / "g", checkpoint_every=2)
    a.fit(2)
    b = GeneratorTrainer(other, ens(), batch_size=2, progress=False, checkpoint_dir=tmp_path / "g")
    with pytest.raises(CheckpointError, match=r"trained against another teacher \(fingerprint \w+ in the checkpoint, "
                                              r"\w+ now\)"):
        b.resume()
    assert GeneratorTrainer(teacher, ens(), batch_size=2, progress=False, checkpoint_dir=tmp_path / "g").resume()
    student = create_model("digits_student", num_classes=10)
    d = Distiller(teacher, student, ens(), batch_size=2, progress=False, checkpoint_dir=tmp_path / "d",
                  checkpoint_every=1)
    d.fit(1)
    with pytest.raises(CheckpointError, match="trained against another generators"):
        Distiller(teacher, create_model("digits_student", num_classes=10), ens(seed=2), batch_size=2, progress=False,
                  checkpoint_dir=tmp_path / "d").resume()


def test_a_run_directory_has_one_owner(tmp_path):
    from fastdfd import GeneratorEnsemble
    from fastdfd.distributed import DistContext
    from fastdfd.pipeline import train_generators
    from fastdfd.rundir import RunLock

    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))

    def run(**kw):
        torch.manual_seed(1)
        ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
        return train_generators(teacher, ens, tmp_path / "run", ctx=DistContext(), device=torch.device("cpu"),
                                steps=2, quality_per_class=0, optim=OptimizerSettings(batch_size=2),
                                loop=LoopSettings(progress=False, tensorboard=False), **kw)

    run()
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(manifest) == {"identity", "settings", "software"} and len(manifest["identity"]["teacher"]) == 16
    assert manifest["settings"]["batch_size"] == 2 and manifest["software"]["torch"] == torch.__version__
    with pytest.raises(ValueError, match=r"already holds a run \(.*generators.pt.*\); pass --resume to continue it, "
                                         "--overwrite to discard it"):
        run()
    (tmp_path / "run" / "stray.txt").write_text("from the first run")
    run(overwrite=True)
    assert not (tmp_path / "run" / "stray.txt").exists() and (tmp_path / "run" / "generators.pt").exists()
    with pytest.raises(ValueError, match="pass one of them"):
        run(resume=True, overwrite=True)
    with RunLock(tmp_path / "run", "generator run"):  # another writer holds the directory
        with pytest.raises(ValueError, match=rf"in use by another generator run \(.*\"pid\": {os.getpid()}"):
            run(resume=True)
    run(resume=True)  # the lock went with its holder
