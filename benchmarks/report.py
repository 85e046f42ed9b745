"""Benchmark reports: one JSON (the data), one Markdown table and optional PNG per suite.

Files are written to a temporary name and renamed, so an interrupted run never leaves a
half-written report behind."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch


def machine_info() -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    try:
        import jax
        info.update(jax=jax.__version__, jax_backend=jax.default_backend())
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
    """columns: (key, header) pairs; floats formatted to 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_report(out_dir: Path, name: str, title: str, rows: list[dict],
                 columns: list[tuple[str, str]], notes: str = "", figure=None) -> dict[str, Path]:
    """Write <name>.json, <name>.md and (if `figure`, a matplotlib Figure) <name>.png."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    meta = machine_info()
    atomic_write(paths["json"], json.dumps(dict(title=title, machine=meta, rows=rows), indent=2))
    md = [f"# {title}", "", markdown_table(rows, columns), ""]
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


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds; fn must block until its result is ready."""
    import statistics
    import time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
