"""Plot the metrics.jsonl of one or more training runs (torch_impl.train's --out-dir) as one PNG.

    python -m torch_impl.plot runs/NAME                     # -> runs/NAME/metrics.png
    python -m torch_impl.plot runs/A runs/B --out cmp.png   # runs overlaid, labelled by directory
    python -m torch_impl.plot runs/NAME --x time            # against wall time instead of step

Four panels: training and validation loss; validation bits per byte; the lr multiplier and
Muon momentum; tokens per second. The x axis is the step, or the cumulative step time (the sum
of the logged `dt`, so evaluation and checkpoint pauses do not count). A last line cut short by
a crash is skipped with a message, as training's own resume does; any other unreadable line, a
missing file or a run with no training steps is an error (exit 2) and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PANELS = (("loss", "loss (train, and val dashed)"), ("val_bpb", "val bits per byte"),
          ("schedule", "lr multiplier, Muon momentum (dotted)"), ("tokens_per_s", "tokens / s"))


class PlotError(ValueError):
    """A run that cannot be plotted, with a message naming the file and the problem."""


def load_metrics(run_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """The records of run_dir/metrics.jsonl by type ("train", "val", "summary"), in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file (is {run_dir} a training run's --out-dir?)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records: dict[str, list[dict]] = {"train": [], "val": [], "summary": []}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["type"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines):  # the torn last write of a killed run
                print(f"{path}: skipped its last line, cut short (a write interrupted by a crash)", file=sys.stderr)
                continue
            raise PlotError(f"{path}:{i}: not a metrics record: {line[:80]!r}") from None
        records.setdefault(kind, []).append(record)
    if not records["train"]:
        raise PlotError(f"{path}: no training steps logged yet")
    return records


def series(records: list[dict], key: str, x: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of the records that have a number under `key`; x is "step" or "time" (the
    cumulative training-step time at that record's step)."""
    kept = [r for r in records if isinstance(r.get(key), (int, float))]  # mfu, grad_norm may be null
    return [r["_time"] if x == "time" else r["step"] for r in kept], [r[key] for r in kept]


def with_time(runs: dict[str, dict[str, list[dict]]]) -> None:
    """Add "_time" to every train and val record: the sum of the train records' dt up to its step."""
    for records in runs.values():
        clock, at_step = 0.0, {0: 0.0}
        for r in records["train"]:
            clock += r.get("dt") or 0.0
            at_step[r["step"]] = clock
            r["_time"] = clock
        for r in records["val"]:  # evaluated after its step's training (step 0: before any)
            r["_time"] = at_step.get(r["step"], clock)


def plot(runs: dict[str, dict[str, list[dict]]], out: Path, x: str = "step") -> None:
    """Write the four panels for `runs` ({label: load_metrics(...)}) to `out` (PNG) atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_time(runs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for (panel, title), ax in zip(PANELS, axes.flat):
        for i, (label, records) in enumerate(runs.items()):
            color = f"C{i}"
            if panel == "loss":
                ax.plot(*series(records["train"], "loss", x), color=color, lw=0.8, label=label)
                ax.plot(*series(records["val"], "val_loss", x), color=color, ls="--", marker="o", ms=3)
            elif panel == "val_bpb":
                ax.plot(*series(records["val"], "val_bpb", x), color=color, marker="o", ms=3, label=label)
            elif panel == "schedule":
                ax.plot(*series(records["train"], "lr_multiplier", x), color=color, label=label)
                ax.plot(*series(records["train"], "muon_momentum", x), color=color, ls=":")
            else:
                ax.plot(*series(records["train"], "tokens_per_s", x), color=color, lw=0.8, label=label)
        ax.set_title(title)
        ax.set_xlabel("step" if x == "step" else "training time, s")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_impl.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="training --out-dir(s) holding metrics.jsonl")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN/metrics.png of the first run)")
    parser.add_argument("--x", choices=("step", "time"), default="step", help="x axis")
    args = parser.parse_args(argv)
    out = args.out or Path(args.runs[0]) / "metrics.png"
    if out.suffix.lower() != ".png":
        parser.error(f"--out must be a .png file, got {out}")
    if out.exists() and out.is_dir():
        parser.error(f"--out {out} is a directory")
    try:
        runs = {}
        for run in args.runs:
            label = Path(run).resolve().name
            runs[label if label not in runs else str(run)] = load_metrics(run)
        plot(runs, out, args.x)
    except ImportError as e:
        print(f"error: plotting needs matplotlib ({e}); pip install matplotlib", file=sys.stderr)
        return 2
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
