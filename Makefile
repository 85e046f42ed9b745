# Two entry points (see README): `make run` (main job) and `make test` (the CI suite).
# Both create the virtual environment on first use. torch is pinned to the CPU build that
# this workplace keeps on disk; pip would otherwise pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,bench,train]'
	touch $@

.PHONY: setup run test parity bench
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m benchmarks.orthogonalize --quick

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not cuda"

parity: $(VENV)/.installed
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q parity_tests

bench: $(VENV)/.installed
	$(PY) -m benchmarks.orthogonalize
