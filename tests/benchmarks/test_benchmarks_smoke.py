"""The benchmark scripts themselves, at toy sizes on the CPU, so they cannot rot unseen."""

import json

from ..conftest import require_triton

require_triton()


def test_gpu_suite_runs_end_to_end_in_tiny_mode(tmp_path):
    from benchmarks import gpu_suite

    assert gpu_suite.main(["--tiny", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-suite-*-tiny.json")
    report = json.loads(path.read_text())
    assert report["copy_gbps"] > 0 and report["machine"]["torch"]
    assert report["correctness"] and all(r["ok"] for r in report["correctness"])
    providers = {r["provider"] for r in report["layers"]}
    assert {"hooks", "fastdfd-torch", "fastdfd-triton"} <= providers
    for row in report["steps"]:
        assert row["loss_rel_diff_vs_hooks"] < 1e-4, row
    assert report["ensemble_checks"] and all(r["ok"] for r in report["ensemble_checks"])
    timed = {(r["mode"], r["provider"]) for r in report["ensemble_timings"] if "error" not in r}
    for mode in ("sample", "train"):
        assert {(mode, p) for p in ("python-loop", "vmap", "grouped-eager", "fastdfd-triton")} <= timed
    rows = report["imagenet"]["rows"]
    assert [r["provider"] for r in rows] == ["hooks+loop", "fastdfd"] and all(r["projected_gpu_hours"] > 0 for r in rows)


def test_whole_step_interleaves_providers_and_writes_ratios(tmp_path):
    from benchmarks import whole_step

    out = tmp_path / "whole.json"
    record = whole_step.main(["--teacher", "digits", "--providers", "hooks,fastdfd-cpp,fastdfd-torch", "--rounds", "2",
                              "--inner", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == record
    rows = record["providers"]
    assert list(rows) == ["hooks", "fastdfd-cpp", "fastdfd-torch"] and all(len(r["times_ms"]) == 2 for r in rows.values())
    assert rows["hooks"]["x_vs_hooks"] == 1.0
    assert rows["fastdfd-cpp"]["x_vs_hooks"] == rows["hooks"]["median_ms"] / rows["fastdfd-cpp"]["median_ms"]
