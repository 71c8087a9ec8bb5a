# `make demo` and `make test` work on a fresh machine: both build .venv first (pip, Python 3.10+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check fuzz venv clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,hf,peers]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/sparsecc demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15

# The inner loop: every unit and conformance test on small models and the fuzz sample, not the tests marked
# slow (whole torchvision / Hugging Face models, fresh processes, the wheel); `make test` runs everything.
# Compiled kernels are kept in .cache/test-kernels between runs (keyed by their source: edits recompile).
check: $(STAMP)
	SPARSECC_TEST_CACHE=.cache/test-kernels $(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow" \
		--durations=10

fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz --cases $(or $(CASES),2000)

clean:
	rm -rf $(VENV) build *.egg-info
