"""What every suite shares: the machine description, interleaved timing, blocking on async work,
atomic file writes and argument types. The results folder itself is benchmarks/results.py.

Files are written to a temporary name and renamed, so an interrupted run never leaves a
half-written report behind."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that decide fp32/bf16 GEMM speed


def cpu_description() -> tuple[str | None, list[str]]:
    """(model name, the CPU_FLAGS present) from /proc/cpuinfo (None, [] where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(key)), "")
    flags = set(field("flags").split())
    return field("model name") or None, [f for f in CPU_FLAGS if f in flags]


def git_commit() -> str | None:
    """HEAD of the repository this file is in, "+dirty" when tracked files have changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD").stdout.strip()
        # untracked files (a results folder being written) do not make the measured code dirty
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    model, flags = cpu_description()
    info = dict(python=platform.python_version(), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), cpu_model=model, cpu_count=os.cpu_count(),
                cpu_flags=" ".join(flags) or None, threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), git_commit=git_commit(),
                load_average=" ".join(f"{x:.2f}" for x in os.getloadavg()))  # 1, 5, 15 min: other work here?
    try:
        import jax
        info.update(jax=jax.__version__, jax_backend=jax.default_backend())
        import optax
        info.update(optax=optax.__version__)
    except ImportError:
        pass
    return info


def atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def interleaved_times(fns: dict[str, object], repeats: int, warmup: int = 1,
                      progress=None) -> dict[str, dict[str, float]]:
    """Wall time of each fn() (which must block until its result is ready), interleaved: `warmup`
    untimed calls of each (compiles, caches), then `repeats` rounds of one timed call of each in turn,
    so machine noise hits every implementation alike. Returns {name: {median_s, min_s, max_s, n}}.
    `progress(name, seconds)`, if given, is called after every timed call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            if progress is not None:
                progress(name, times[name][-1])
    return {name: dict(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts), n=len(ts))
            for name, ts in times.items()}


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (the error names the value)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def resolve_device(name: str) -> str:
    """"auto" → "cuda" where a GPU is visible, else "cpu"; "cuda" without one raises (a clear message)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceMissing("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)")
    return name


class DeviceMissing(RuntimeError):
    """The requested device is not on this machine: the suite is skipped, not failed."""


def block(x):
    """Wait until x (a torch tensor, a JAX array, a pytree of them, or None) is computed: timed calls
    must include the work, not just its launch (CUDA kernels and XLA dispatch are asynchronous)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if x is not None and not isinstance(x, torch.Tensor) and "jax" in sys.modules:
        sys.modules["jax"].block_until_ready(x)
    return x


def jax_on(choice: str, device: str) -> tuple[bool, str]:
    """Whether a suite times JAX next to torch on `device`: "on"/"off" as asked; "auto" only where JAX's
    backend is the same kind of device (a CPU-only jaxlib beside a GPU is no comparison, and its large
    shapes would take minutes). Returns (on, the sentence the report says about it)."""
    try:
        import jax
        backend = jax.default_backend()
    except ImportError as e:
        return False, f"JAX not installed ({e}): JAX rows skipped"
    on = choice == "on" or (choice == "auto" and (backend == "gpu") == (device == "cuda"))
    return on, f"JAX on {backend}" + ("" if on else f": JAX rows skipped (torch on {device}; --jax on to force)")
