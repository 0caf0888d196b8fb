"""Run tests_zoo and write its per-case table as JSON (default benchmarks/results/zoo-cpu-2core.json).

    .venv-zoo/bin/python tests_zoo/report.py [PATH] [extra pytest args]

The table (one row per architecture / mode; tests_zoo/zoo.py's docstring has the criteria):
library, name, variant, BN flavours found (class names and counts), BN-like layers vs layers
the matcher tapped;
- float64 tapped vs untapped: max rel err of logits / input gradient (/ running statistics),
  asserted <= 1e-10 (skipped under autocast);
- fp32 (autocast) vs the float64 untapped reference ref64, norm-wise ||a - ref64|| / ||ref64||,
  tapped and untapped, logits and input gradient, and the asserted rule
  tapped <= 2 x max(untapped, noise floor) + atol;
- the strict elementwise figure, max |tapped - untapped| / max |untapped| in fp32, and whether
  it is within 1e-5 elementwise (autocast: the dtype's tolerance): reported, not asserted;
- the noise floor (untapped, every BN input perturbed by one fp32 rounding; the first sample, and
  16 more where the tapped run is outside the first's bound);
- the moment loss against a float64 hook reference, each check's outcome and pass/fail.
The printed table (pytest's terminal summary) has the same columns in short.
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
