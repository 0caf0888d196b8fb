"""benchmarks/device_check.sh --tiny end to end on the CPU: the card script cannot rot unseen,
and a wrong result makes it exit non-zero."""

import json
import os
import subprocess
import sys
from pathlib import Path

from ..conftest import require_triton

require_triton()

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def _run(out: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "--tiny", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})


def test_tiny_run_writes_every_part_and_passes(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 10 and all((tmp_path / f).stat().st_size < 16 << 20 for f in files if f != "imagenet_scale")
    if (tmp_path / "imagenet_scale").exists():  # no ensemble or checkpoint comes back from the card
        assert sum(p.stat().st_size for p in (tmp_path / "imagenet_scale").iterdir()) < 16 << 20
    reports = {f: json.loads((tmp_path / f).read_text()) for f in files if f.endswith(".json")}
    summary = reports["summary.json"]
    assert summary["ok"] and summary["torch"] and summary["triton"] and summary["python"]
    assert list(summary["parts"]) == ["correctness", "cuda_graph", "teacher", "imagenet_scale", "whole_step", "suite"]
    assert all(p["status"] in ("passed", "skipped") for p in summary["parts"].values()), summary["parts"]
    correctness = reports["correctness.json"]
    assert {"torch", "triton", "cpp"} <= set(correctness["backends"]) and "cuda" in correctness["not_here"]
    ran = {(r["backend"], r["dtype"]) for r in correctness["moment_tap"]}
    assert {("triton", "float32"), ("triton", "bfloat16"), ("cpp", "bfloat16")} <= ran
    assert correctness["generator_kernels"] and all(r["ok"] for r in correctness["generator_kernels"])
    assert reports["cuda_graph.json"]["rows"] and reports["cuda_graph.json"]["ok"]
    teacher = reports["teacher.json"]
    assert teacher.get("skipped") or teacher["rel_err_vs_float64_hooks"]["tap_dx"] < 1e-4
    scale = reports["imagenet_scale.json"]
    assert scale.get("skipped") or (scale["generators"] == 4 and scale["steps_per_generator"] == 2
                                    and scale["perf_model_estimate"]["seconds_per_generator_step"] > 0
                                    and scale["memory"]["planner"]["chunk"] == scale["chunk"])
    whole = reports["whole_step.json"]
    assert set(whole["ms"]) == {"hooks", "fastdfd-cpp"} and all(v > 0 for v in whole["ms"].values())
    assert whole["fastest_vs_hooks"] == whole["ms"]["hooks"] / whole["ms"]["fastdfd-cpp"]
    assert "perf_model" not in whole  # the H200 model's prediction goes beside a card's measurement only
    (suite,) = [r for f, r in reports.items() if f.startswith("gpu-suite-")]
    assert suite["layers"] and all("predicted_ms" in r and r["predicted_ms"] > 0 for r in suite["layers"])


def test_a_wrong_result_fails_the_check(tmp_path):
    proc = _run(tmp_path, "--parts", "correctness,cuda_graph", FASTDFD_CHECK_PLANT="1")
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parts"]["correctness"]["status"] == "failed" and not summary["ok"]
    correctness = json.loads((tmp_path / "correctness.json").read_text())
    bad = [r for r in correctness["moment_tap"] if not r["ok"]]
    assert bad and {r["backend"] for r in bad} == {correctness["backends"][-1]}
    assert json.loads((tmp_path / "cuda_graph.json").read_text())["ok"]  # the later part still ran and wrote
