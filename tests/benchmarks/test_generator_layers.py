"""`python -m benchmarks.generator_layers` at the digits case's sizes: every layer timed, the record written."""

import json

import pytest
import torch

from benchmarks import generator_layers
from fastdfd.ops.dispatch import unavailable


def test_generator_layers_times_every_layer_of_a_case(tmp_path):
    why = unavailable("ensemble_forward", "cpp", torch.empty(0))
    if why:
        pytest.skip(f"the cpp generator backend is unavailable here: {why}")
    out = tmp_path / "layers.json"
    record = generator_layers.main(["--case", "digits", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == record
    # the digits demo's generator: 32 -> 32 and 32 -> 16 after x2 upsamples, then the 1-channel image layer
    shapes = [(r["CIN"], r["COUT"], r["side"], r["upsample"], r["tanh"]) for r in record["layers"]]
    assert shapes == [(32, 32, 4, 2, False), (32, 16, 8, 2, False), (16, 1, 16, 1, True)]
    assert all(r["forward_ms"] > 0 and r["backward_gflops"] > 0 for r in record["layers"])
    assert record["total_ms"] == pytest.approx(sum(r["forward_ms"] + r["backward_ms"] for r in record["layers"]))


def test_bad_repeats_are_refused(capsys):
    with pytest.raises(SystemExit):
        generator_layers.main(["--case", "digits", "--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
