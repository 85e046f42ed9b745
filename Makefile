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
	$(PY) -m pip install -q -e '.[test,bench,train,dev]'
	touch $@

.PHONY: setup run bench-quick test parity bench study gpu-check
setup: $(VENV)/.installed

# Main job: a 2-rank CPU (gloo) training run of a tiny GPT on the embedded default corpus (the
# Python standard library's source), then a sample from its checkpoint. ~2-3 min on 2 cores.
RUN_DIR ?= runs/readme
run: $(VENV)/.installed
	$(PY) -m torch_impl.launch --standalone --nproc_per_node=$(NPROC) -m torch_impl.train --depth 2 --seq-len 256 \
		--device-batch-size 8 --steps 300 --eval-every 50 --eval-tokens 32768 --sample-tokens 0 \
		--out-dir $(RUN_DIR) --overwrite
	$(PY) -m torch_impl.sample --checkpoint $(RUN_DIR) --prompt "def " --max-tokens 200

# Every benchmark suite at small sizes into reports/quick (results.json, report.md, PNGs; ~1-2 min on 2 cores)
bench-quick: $(VENV)/.installed
	$(PY) -m benchmarks --quick --out reports/quick

# The CI suite on TEST_WORKERS processes (pytest-xdist; work stealing keeps the long tests from
# ending up last on one worker). Each worker computes on one thread (conftest.py).
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow and not cuda"

parity: $(VENV)/.installed
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q parity_tests

# Every suite at full size into reports/latest (long on a CPU: meant for a GPU machine)
bench: $(VENV)/.installed
	$(PY) -m benchmarks --out reports/latest

# The Muon vs AdamW training study, quick mode (~2.5 min on 2 cores)
study: $(VENV)/.installed
	$(PY) -m benchmarks.study --quick --out reports/study

# On a machine with one GPU: cuda tests, GPU suites, a d12 --compile run (~8 min), reports/gpu_check/summary.md
gpu-check:
	bash benchmarks/gpu_check.sh reports/gpu_check
