"""Run tests_zoo and write its per-case table as JSON (default benchmarks/results/zoo-cpu-2core.json).

    .venv-zoo/bin/python tests_zoo/report.py [PATH] [extra pytest args]

The table (one row per architecture / mode): library, name, variant, BN flavours found
(class names and counts), BN-like layers vs layers the matcher tapped, max relative logit
and input-gradient errors of the tapped run against the untapped one, the moment loss
against a float64 hook reference, each check's outcome and pass/fail.
"""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parent / "benchmarks" / "results" / "zoo-cpu-2core.json"

if __name__ == "__main__":
    args = sys.argv[1:]
    path = args.pop(0) if args and not args[0].startswith("-") else str(DEFAULT)
    sys.exit(pytest.main(["-q", str(HERE), f"--zoo-report={path}", *args]))
