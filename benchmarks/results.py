"""One results folder per benchmark run: results.json (the data), report.md (the tables), PNG plots.

Every suite (`python -m benchmarks SUITE ...`, or one suite's own `python -m benchmarks.SUITE`)
returns a `Suite`: named `Table`s of plain rows plus matplotlib figures. `write_folder` writes
them all; nothing is half-written (every file goes to a temporary name and is renamed).

results.json, schema "benchmarks/results/v1":

    {
      "schema": "benchmarks/results/v1",
      "created_utc": "2026-12-03T07:00:00Z",
      "argv": ["--quick", ...],            # the command line after `python -m benchmarks`
      "quick": true,
      "machine": {...},                    # report.machine_info(): CPU model and flags, threads,
                                           # GPU, python/torch/jax/optax versions, git commit, load
      "methodology": "text",               # how times were taken (warm-up, repeats, statistic)
      "suites": [
        {
          "name": "orthogonalize",
          "status": "ok" | "skipped" | "failed",
          "reason": null | "why skipped or failed (one line)",
          "seconds": 12.3,                 # wall time of the suite
          "notes": "suite-specific methodology and caveats",
          "config": {"device": "cpu", ...},  # the settings its rows depend on beyond their key columns
                                           # (sizes, device, compile, ...): --compare only compares
                                           # a suite's rows between runs of equal config
          "plots": ["orthogonalize_time_vs_shape.png", ...],   # relative to the folder
          "tables": [
            {
              "name": "speed", "title": "Per call, every implementation",
              "columns": [{"key": "shape", "header": "shape"}, ...],   # report.md order
              "key": ["shape", "dtype", "method", "implementation"],   # identifies a row
              "metric": "ms" | null,       # the number --compare compares (null: not compared)
              "lower_is_better": true,
              "best": ["torch eager", "jax.jit"],   # columns whose best per row is marked
              "spread": ["min_ms", "max_ms"] | null,   # the metric's min and max over the repetitions
              "rows": [{"shape": "128x512", "ms": 1.2, ...}, ...]
            }
          ]
        }
      ],
      "compare": null | {"against": "old/results.json", "threshold": 0.1, "rows": [...]}
    }

Row values are JSON scalars (numbers, strings, booleans, null). Times are in the unit their
column header names (ms or s).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import DeviceMissing, atomic_write, machine_info

SCHEMA = "benchmarks/results/v1"
METHODOLOGY = (
    "Wall time per call with time.perf_counter. Every implementation gets untimed warm-up calls first "
    "(jit / torch.compile compilation, lazy state, allocator), then the timed repetitions; implementations "
    "compared in one table are interleaved (one timed call of each in turn, repeated), so noise from other "
    "work on the machine hits all alike. Reported: the median, with min and max. Each timed call blocks "
    "until its result exists (torch.cuda.synchronize on CUDA, jax.block_until_ready for JAX). Thread counts, "
    "machine, versions and git commit are in 'machine'. MFU on CUDA is against the dense bf16 peak "
    "(989 TFLOP/s for H100/H200 SXM, not the 2:4-sparsity figure); on CPU against this machine's measured "
    "matmul rate (no datasheet number for a shared vCPU).")


@dataclass
class Table:
    """Rows of one measurement. `key` names the columns that identify a row (for --compare);
    `metric` the number compared between runs; `best` the columns among which the best value of
    each row is marked in report.md (min when lower_is_better)."""
    name: str
    title: str
    columns: list[tuple[str, str]]
    rows: list[dict]
    key: tuple[str, ...] = ()
    metric: str | None = None
    lower_is_better: bool = True
    best: tuple[str, ...] = ()
    spread: tuple[str, str] | None = None  # the columns of the metric's min and max over the repetitions

    def to_json(self) -> dict:
        return dict(name=self.name, title=self.title, columns=[dict(key=k, header=h) for k, h in self.columns],
                    key=list(self.key), metric=self.metric, lower_is_better=self.lower_is_better,
                    best=list(self.best), spread=list(self.spread) if self.spread else None, rows=self.rows)


@dataclass
class Suite:
    """What one suite measured: tables, notes (its methodology), figures by short name (written as
    <suite>_<name>.png). `status` "skipped"/"failed" with a one-line `reason` when it could not run."""
    name: str
    tables: list[Table] = field(default_factory=list)
    notes: str = ""
    figures: dict = field(default_factory=dict)
    status: str = "ok"
    reason: str | None = None
    seconds: float | None = None
    config: dict = field(default_factory=dict)  # the settings the rows depend on beyond their key columns


def fmt(v) -> str:
    """Floats to 4 significant digits (whole numbers from 1000 up to 10⁷, so ms stay readable): a val
    bpb of 3.913 against 3.916 must not print as 3.91 twice. results.json keeps every digit."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else ("yes" if v else "no")
    if isinstance(v, float):
        return f"{v:.0f}" if 1e3 <= abs(v) < 1e7 else f"{v:.4g}"
    return str(v)


def best_of_row(table: Table, row: dict) -> str | None:
    values = {c: row[c] for c in table.best if isinstance(row.get(c), (int, float)) and not isinstance(row[c], bool)}
    if not values:
        return None
    return (min if table.lower_is_better else max)(values, key=values.get)


def markdown(table: Table) -> str:
    head = "| " + " | ".join(h for _, h in table.columns) + " |"
    sep = "|" + "|".join("---" for _ in table.columns) + "|"
    body = []
    for row in table.rows:
        best = best_of_row(table, row)
        cells = [f"**{fmt(row.get(k))}**" if k == best else fmt(row.get(k)) for k, _ in table.columns]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on CI or GPU machines); imported when
    a suite draws, so the tables need no matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def report_markdown(data: dict, title: str, compare_section: str | None = None) -> str:
    md = [f"# {title}", "", f"{data['created_utc']} · commit {data['machine'].get('git_commit')}"
          + (" · quick mode" if data["quick"] else ""), ""]
    for s in data["suites"]:
        md += [f"## {s['name']}", ""]
        if s["status"] != "ok":
            md += [f"**{s['status']}**: {s['reason']}", ""]
            continue
        md += [f"{s['seconds']:.1f} s.", ""] if s.get("seconds") is not None else []
        for t in s["tables"]:
            table = Table(t["name"], t["title"], [(c["key"], c["header"]) for c in t["columns"]], t["rows"],
                          tuple(t["key"]), t["metric"], t["lower_is_better"], tuple(t["best"]))  # spread: compare only
            md += [f"### {t['title']}", "", markdown(table), ""]
        md += [f"![{p}]({p})" for p in s["plots"]] + ([""] if s["plots"] else [])
        if s["notes"]:
            md += [s["notes"], ""]
    if compare_section:
        md += [compare_section, ""]
    md += ["## Methodology", "", data["methodology"], "",
           "Machine: " + ", ".join(f"{k}={v}" for k, v in data["machine"].items() if v is not None), ""]
    return "\n".join(md)


def write_folder(out: Path, suites: list[Suite], argv: list[str], quick: bool, title: str = "Benchmarks",
                 compare_with: Callable[[dict], tuple[dict, str]] | None = None) -> dict:
    """Write out/results.json, out/report.md and every suite's figures; returns the results dict.
    compare_with: given this run's results, (the comparison with an older run, its Markdown section);
    benchmarks/compare.py makes both (it reads results files with this module, so this module never
    imports it)."""
    out = Path(out)
    suite_data = []
    for s in suites:
        plots = []
        for name, fig in s.figures.items():
            path = f"{s.name}_{name}.png"
            atomic_write(out / path, figure_png(fig))
            plots.append(path)
        # a figure of an earlier run into this folder that this run did not draw would sit there unlisted
        for old in out.glob(f"{s.name}_*.png"):
            if old.name not in plots:
                old.unlink()
        suite_data.append(dict(name=s.name, status=s.status, reason=s.reason, seconds=s.seconds, notes=s.notes,
                               config=s.config, plots=plots, tables=[t.to_json() for t in s.tables]))
    data = dict(schema=SCHEMA, created_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                argv=list(argv), quick=quick, machine=machine_info(), methodology=METHODOLOGY, suites=suite_data,
                compare=None)
    compare_section = None
    if compare_with is not None:
        data["compare"], compare_section = compare_with(data)
    atomic_write(out / "results.json", json.dumps(data, indent=1, allow_nan=True))
    atomic_write(out / "report.md", report_markdown(data, title, compare_section))
    return data


class ResultsError(ValueError):
    """A results.json that cannot be read or is not of this schema."""


def load_results(path: Path) -> dict:
    """Read and check a results.json (ResultsError naming the file and the problem)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ResultsError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ResultsError(f"{path}: not a benchmark results file (schema {found!r}, expected {SCHEMA!r})")
    if not isinstance(data.get("suites"), list):
        raise ResultsError(f"{path}: 'suites' must be a list of suites with 'tables'")
    for i, s in enumerate(data["suites"]):  # every field --compare reads, so a bad file fails here, not later
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("tables"), list)):
            raise ResultsError(f"{path}: suites[{i}] needs a 'name' and a list of 'tables'")
        for j, t in enumerate(s["tables"]):
            where = f"{path}: suites[{i}] ({s['name']}) tables[{j}]"
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("rows"), list)
                    and all(isinstance(r, dict) for r in t["rows"]) and isinstance(t.get("key", []), list)
                    and isinstance(t.get("metric"), (str, type(None)))
                    and (t.get("spread") is None or (isinstance(t["spread"], list) and len(t["spread"]) == 2))
                    and isinstance(t.get("lower_is_better", True), bool)):
                raise ResultsError(f"{where}: needs 'name', 'rows' (objects), 'key' (a list), 'metric', "
                                   "'lower_is_better' and 'spread' (two column names or null)")
    if not isinstance(data.get("machine", {}), dict):
        raise ResultsError(f"{path}: 'machine' must be an object")
    return data


def run_suite(name: str, measure: Callable[[argparse.Namespace], Suite], args: argparse.Namespace) -> Suite:
    """measure(args), timed; an exception becomes a failed Suite (the run goes on with the others)."""
    t = time.perf_counter()
    try:
        suite = measure(args)
    except DeviceMissing as e:  # --device cuda on a machine without one: not this suite's fault
        suite = Suite(name, status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 - reported in the results, and the exit code says failed
        import traceback
        traceback.print_exc()
        suite = Suite(name, status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
    suite.seconds = time.perf_counter() - t
    return suite


def cli_main(parser: argparse.ArgumentParser, measure: Callable[[argparse.Namespace], Suite], argv=None,
             title: str | None = None) -> int:
    """A suite's own command: parse, measure, write the folder args.out; exit 1 if it failed."""
    args = parser.parse_args(argv)
    suite = run_suite(parser.prog.split(".")[-1], measure, args)
    write_folder(args.out, [suite], sys.argv[1:] if argv is None else list(argv), bool(getattr(args, "quick", False)),
                 title=title or parser.description.split("\n")[0])
    print(f"wrote {Path(args.out) / 'report.md'}" + (f" ({suite.status}: {suite.reason})" if suite.reason else ""))
    return 0 if suite.status != "failed" else 1
