"""Benchmark reports: one JSON (the data), one Markdown table and optional PNG per suite.

Files are written to a temporary name and renamed, so an interrupted run never leaves a
half-written report behind."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
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
    """HEAD of the repository this file is in, "+dirty" when the work tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD").stdout.strip()
        return (head + ("+dirty" if run("status", "--porcelain").stdout.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    model, flags = cpu_description()
    info = dict(python=platform.python_version(), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), cpu_model=model, cpu_count=os.cpu_count(),
                cpu_flags=" ".join(flags) or None, threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                git_commit=git_commit(),
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


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header) pairs; floats formatted to 3 significant digits (whole numbers from 1000 up
    to 10⁷, so times in ms stay readable)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.0f}" if 1e3 <= abs(v) < 1e7 else f"{v:.3g}"
        return "" if v is None else str(v)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_report(out_dir: Path, name: str, title: str, rows: list[dict],
                 columns: list[tuple[str, str]], notes: str = "", figure=None,
                 tables: list[tuple[str, list[dict], list[tuple[str, str]]]] = ()) -> dict[str, Path]:
    """Write <name>.json, <name>.md and (if `figure`, a matplotlib Figure) <name>.png.
    `tables`: further (heading, rows, columns) tables, after the first under their own heading
    (their rows in the JSON under "tables")."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    meta = machine_info()
    data = dict(title=title, machine=meta, rows=rows)
    if tables:
        data["tables"] = {heading: t_rows for heading, t_rows, _ in tables}
    atomic_write(paths["json"], json.dumps(data, indent=2))
    md = [f"# {title}", "", markdown_table(rows, columns), ""]
    for heading, t_rows, t_columns in tables:
        md += [f"## {heading}", "", markdown_table(t_rows, t_columns), ""]
    if notes:
        md += [notes, ""]
    md += ["Machine: " + ", ".join(f"{k}={v}" for k, v in meta.items() if v is not None), ""]
    atomic_write(paths["md"], "\n".join(md))
    if figure is not None:
        import io
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        paths["png"] = out_dir / f"{name}.png"
        atomic_write(paths["png"], buf.getvalue())
    return paths


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


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds; fn must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
