# Everything runs from a local virtualenv that `make setup` builds from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test test-fast lint bench-latency clean

setup: $(VENV)/.installed

# torch is pinned and installed first: a bare `torch` would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[serve,ui,test]"
	touch $@

demo: setup
	$(BIN)/diffusionx demo --out outputs/demo

# The whole suite, slow end-to-end tests included (that is what CI runs).
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Skip the slow end-to-end tests and the fault suite while iterating.
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not faults"

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench-latency: setup
	$(BIN)/python benchmarks/unet_latency.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
