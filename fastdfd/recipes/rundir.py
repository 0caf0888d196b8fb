"""A run directory that describes itself, and the comparison of two of them.

    RUN/recipe.toml        the recipe file as written
    RUN/resolved.json      every value the run used (file + --set overrides)
    RUN/environment.json   versions, hardware, processes, command line, start time
    RUN/status.json        each stage: done or not, wall seconds (what --resume skips)
    RUN/results.json       accuracies, stage times, the paper's figure beside them
    RUN/teacher/ generators/ distill/   each stage's metrics.csv, checkpoints, samples
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..version import __version__
from .loader import Recipe


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, value: dict) -> None:
    """Atomic: a reader (or a resumed run) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def environment(world: int, device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "fastdfd": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "host": socket.gethostname(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "processes": world, "device": str(device),
        "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def open_run_dir(out: Path, recipe: Recipe, resume: bool) -> dict:
    """Create ``out`` for a new run, or check that ``--resume`` continues the same recipe.

    Returns the stage status so far. A non-empty directory without --resume is refused (it
    would mix two runs' files), and so is resuming with a recipe whose values differ.
    """
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise ValueError(f"run directory {out} is not empty; pass --resume to continue it, or choose another --out")
        before = _json(out / "resolved.json")
        if before and before != json.loads(recipe.resolved_json()):
            changed = diff_values(before, json.loads(recipe.resolved_json()))
            raise ValueError(f"--resume: {out} was run with a different recipe ({'; '.join(changed[:5])})")
    out.mkdir(parents=True, exist_ok=True)
    return _json(out / "status.json")


def write_run_header(out: Path, recipe: Recipe, env: dict) -> None:
    (out / "recipe.toml").write_text(recipe.text)
    (out / "resolved.json").write_text(recipe.resolved_json() + "\n")
    runs = _json(out / "environment.json").get("sessions", [])
    write_json(out / "environment.json", {**env, "sessions": [*runs, env["started"]],
                                          "recipe_source": recipe.source, "overrides": recipe.overrides})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def diff_values(a: dict, b: dict) -> list[str]:
    """``key: a -> b`` for every leaf that differs (absent shown as <none>)."""
    fa, fb = _flatten(a), _flatten(b)
    return [f"{k}: {fa.get(k, '<none>')!r} -> {fb.get(k, '<none>')!r}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k, "<none>") != fb.get(k, "<none>")]


_ENV_KEYS = ("fastdfd", "torch", "triton", "cuda", "gpus", "processes", "device", "cpus")


def compare_runs(a: str | Path, b: str | Path) -> str:
    """What differs between two run directories: recipe values, environment, results."""
    a, b = Path(a), Path(b)
    for run in (a, b):
        if not (run / "resolved.json").is_file():
            raise FileNotFoundError(f"not a fastdfd run directory (no resolved.json): {run}")
    lines = [f"A = {a}", f"B = {b}", "", "recipe:"]
    lines += [f"  {d}" for d in diff_values(_json(a / "resolved.json"), _json(b / "resolved.json"))] or ["  identical"]
    ea, eb = _json(a / "environment.json"), _json(b / "environment.json")
    lines += ["", "environment:"]
    lines += [f"  {d}" for d in diff_values({k: ea.get(k) for k in _ENV_KEYS}, {k: eb.get(k) for k in _ENV_KEYS})] \
        or ["  identical"]
    ra, rb = _json(a / "results.json"), _json(b / "results.json")
    lines += ["", f"{'result':<28} {'A':>12} {'B':>12}"]
    for key in sorted({*ra, *rb}):
        va, vb = ra.get(key), rb.get(key)
        if isinstance(va, (dict, list)) or isinstance(vb, (dict, list)):
            continue
        lines.append(f"{key:<28} {_fmt(va):>12} {_fmt(vb):>12}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)
