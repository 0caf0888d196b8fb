"""The metrics log's TensorBoard copy: the same scalars as the CSV, rank 0 only, optional."""

import csv
import sys

import numpy as np
import pytest
import torch

from fastdfd import GeneratorEnsemble, GeneratorTrainer
from fastdfd.models import create_model
from fastdfd.train.metrics import MetricsLog, tensorboard_available

from ..conftest import randomize_bn_stats

needs_tb = pytest.mark.skipif(not tensorboard_available(), reason="tensorboard not installed")


def _trainer(tmp_path, **kw):
    torch.manual_seed(0)
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    return GeneratorTrainer(teacher, ens, batch_size=3, progress=False, log_every=2,
                            log_path=tmp_path / "run" / "metrics.csv", **kw)


def _events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@needs_tb
def test_event_scalars_equal_the_csv_rows(tmp_path):
    tr = _trainer(tmp_path)
    tr.fit(3)
    tr.fit(2)  # a second fit: a second event file in the same run directory
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    tb_dir = tmp_path / "run" / "tensorboard" / "metrics"
    assert len(list(tb_dir.glob("events.out.tfevents.*"))) == 2
    events = _events(tb_dir)
    assert set(events) == set(rows[0]) - {"step"}
    assert set(events) >= {"loss", "moment", "ce", "tv", "teacher_acc", "images_per_s"}
    for row in rows:
        step = int(row["step"])
        for tag, values in events.items():
            # TensorBoard's scalar summaries hold float32; the CSV the float64 value
            assert values[step] == np.float32(float(row[tag])), (step, tag)


@needs_tb
def test_tensorboard_false_writes_no_events(tmp_path):
    tr = _trainer(tmp_path, tensorboard=False)
    tr.fit(2)
    assert (tmp_path / "run" / "metrics.csv").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_required_but_missing_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    assert not tensorboard_available()
    with pytest.raises(ImportError, match="pip install tensorboard"):
        _trainer(tmp_path, tensorboard=True)
    # default: silently CSV only
    tr = _trainer(tmp_path)
    tr.fit(2)
    assert (tmp_path / "run" / "metrics.csv").is_file() and not (tmp_path / "run" / "tensorboard").exists()


@needs_tb
def test_other_ranks_and_no_log_path_write_nothing(tmp_path):
    from fastdfd.distributed import DistContext

    torch.manual_seed(0)
    teacher = randomize_bn_stats(create_model("digits_teacher", num_classes=10))
    ens = GeneratorEnsemble(2, 10, image_size=16, channels=1, latent_dim=8, widths=(8, 4), output_bn=False)
    tr = GeneratorTrainer(teacher, ens, batch_size=2, progress=False, log_path=tmp_path / "m.csv",
                          distributed=DistContext(1, 2), tensorboard=True)
    assert tr.log.path is None and tr.log.tensorboard_dir is None
    log = MetricsLog(None, tensorboard=True)
    log.write([{"step": 1, "loss": 1.0}])
    log.close()
    assert list(tmp_path.iterdir()) == []


@needs_tb
def test_metrics_log_rows_by_epoch_and_json_lines(tmp_path):
    """A log of epochs (the teacher trainer's) plots against the epoch; JSON-lines logs get events too."""
    log = MetricsLog(tmp_path / "teacher.jsonl")
    log.write([{"epoch": 1, "train_loss": 2.5, "note": "x"}, {"epoch": 2, "train_loss": 1.25}])
    del log  # closed on collection
    events = _events(tmp_path / "tensorboard" / "teacher")
    assert events == {"train_loss": {1: 2.5, 2: 1.25}}
    with pytest.raises(ValueError, match="tensorboard must be"):
        MetricsLog(tmp_path / "x.csv", tensorboard="yes")
