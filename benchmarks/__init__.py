"""Benchmark suites (python -m benchmarks --list) and the Muon vs AdamW study (python -m benchmarks.study).

OMP_WAIT_POLICY=PASSIVE, set here before torch loads libgomp: the suites interleave torch and XLA
calls in one process, and torch's OpenMP threads spin-waiting between parallel regions (the default,
ACTIVE) fight XLA's threads for the cores. Measured on a 2-core EPYC: the torch d2 training step
took 3.2 s interleaved with a jitted JAX step, 48 ms with PASSIVE (and 49 ms with one OMP thread).
OPENBLAS_NUM_THREADS=1 likewise: numpy's OpenBLAS only does the untimed bookkeeping here (quality
metrics, SVDs), and its spinning threads made a 128×512 quality_metrics call 13× slower (0.15 s vs
0.012 s). XLA_PYTHON_CLIENT_PREALLOCATE=false: a CUDA jaxlib shares the GPU with torch. Explicit settings
in the environment are kept; machine_info records the OMP policy."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# a CUDA jaxlib would otherwise take 75% of the GPU's memory at its first call, next to torch in one process
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
