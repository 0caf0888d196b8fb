"""The ahead-of-time check under several Triton versions, with one table across them.

    python -m fastdfd.kernels.tools.aot_versions [--triton venv --triton .triton/3.6.0] [--arch 90] [--json r.json]

Each ``--triton`` is ``venv`` (the environment's own Triton, the newest) or a directory that
``pip install --target`` filled with another release (``make test-triton`` installs 3.6.0,
the oldest supported: the card machine's). Each runs :mod:`fastdfd.kernels.tools.aot` in its own
process with that directory first on PYTHONPATH, so one torch serves every Triton: the
check needs ``triton.compile`` only, not torch's Triton integration. Exits non-zero if any
version fails the check; the failing configurations are named per version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .aot_rules import REG_LIMIT, violations

ROOT = Path(__file__).resolve().parents[2]  # the repository (kernels/tools/ -> kernels/ -> .)
SIDE_BY_SIDE = ".triton"  # where make test-triton installs the older releases


def installed() -> list[str]:
    """``venv`` and every Triton installed beside it under .triton/ (oldest first)."""
    root = ROOT / SIDE_BY_SIDE
    extra = sorted((p for p in root.glob("*") if (p / "triton" / "__init__.py").exists()),
                   key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))
    return [str(p) for p in extra] + ["venv"]


def env_for(triton: str) -> dict:
    """The environment of a process that imports the given Triton, with the real JIT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default today; 3.9 warns until it is set
    if triton != "venv":
        path = str(Path(triton).resolve())
        if not (Path(path) / "triton").is_dir():
            raise FileNotFoundError(f"no Triton under {path} (make test-triton installs it)")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    return env


def run_one(triton: str, archs: list[int], extra: list[str] = ()) -> tuple[int, list[dict], str]:
    """(exit status, rows, stdout) of the check under one Triton."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "fastdfd.kernels.tools.aot", "--json", str(out), *extra]
        for a in archs:
            cmd += ["--arch", str(a)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env_for(triton), cwd=ROOT)
        rows = json.loads(out.read_text()) if out.exists() else []
    return proc.returncode, rows, proc.stdout + proc.stderr


def table(by_version: dict[str, list[dict]]) -> str:
    """Markdown: one line per configuration; registers, spills, local, shared memory, MMA per version."""
    versions = list(by_version)
    keyed = {v: {(r["arch"], r["kernel"]): r for r in rows} for v, rows in by_version.items()}
    names = list(dict.fromkeys(k for v in versions for k in keyed[v]))

    def cell(r):
        if r is None:
            return "- | - | - | - | -"
        if not r.get("ok"):
            return "compile error | | | |"
        mark = " **!**" if violations(r) else ""
        return (f"{r.get('reg', '?')}{mark} | {r.get('stack', '?')} | {r.get('local', '?')}/{r.get('local_ops', '?')}"
                f" | {r.get('shared', '?')} | {r.get('mma', '')}")

    head = "| arch | configuration | " + " | ".join(
        f"regs {v} | spill B {v} | local B/LDL+STL {v} | shared B {v} | mma {v}" for v in versions) + " |"
    lines = [head, "|" + "---|" * (2 + 5 * len(versions))]
    for arch, kernel in names:
        cells = " | ".join(cell(keyed[v].get((arch, kernel))) for v in versions)
        lines.append(f"| {arch} | {kernel} | {cells} |")
    return "\n".join(lines)


def summary(by_version: dict[str, list[dict]]) -> str:
    out = []
    for v, rows in by_version.items():
        ok = [r for r in rows if r.get("ok") and "reg" in r]
        top = max(ok, key=lambda r: r["reg"]) if ok else None
        bad = sum(bool(violations(r)) for r in rows)
        out.append(f"triton {v}: {len(rows)} configurations, {len(rows) - len(ok)} not compiled, "
                   f"max {top['reg'] if top else '?'} registers ({top['kernel'] if top else '-'}), "
                   f"{sum(1 for r in ok if r.get('stack') or r.get('local') or r.get('local_ops'))} with local memory, "
                   f"{bad} over the rules (registers <= {REG_LIMIT}, no local memory)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="append", help="venv or a pip --target directory (default: all installed)")
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 90)")
    parser.add_argument("--json", help="write {version: rows} here")
    parser.add_argument("--table", help="write the markdown table here")
    args = parser.parse_args(argv)
    archs = args.arch or [90]
    by_version, failed = {}, []
    for triton in args.triton or installed():
        rc, rows, out = run_one(triton, archs)
        version = rows[0]["triton"] if rows else triton
        by_version[version] = rows
        print(f"== triton {version} ({triton}): exit {rc}")
        if rows:
            print("\n".join(ln for ln in out.splitlines() if ln.startswith(("FAIL", "triton "))))
        else:  # it died before compiling anything: show why
            print(out[-3000:])
        if rc != 0 or not rows:
            failed.append(version)
    print(table(by_version))
    print(summary(by_version))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": [f"sm_{a}" for a in archs], "rule":
                                               {"max_registers": REG_LIMIT, "local_memory": 0},
                                               "versions": by_version}, indent=1))
    if args.table:
        Path(args.table).write_text(table(by_version) + "\n")
    if failed:
        print(f"FAILED under triton {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
