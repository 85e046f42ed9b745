"""Regressions and improvements between two benchmark runs, row by row.

Rows are matched by (suite, table, the table's key columns); the table's `metric` column is
compared as ratio = new / old. With threshold t (default 0.10):

    lower is better:  ratio > 1 + t → "regression",   ratio < 1 / (1 + t) → "improvement"
    higher is better: ratio < 1 / (1 + t) → "regression", ratio > 1 + t → "improvement"

anything between is "same"; rows in only one run are "new" / "gone"; rows of a suite run with other
settings (its `config`: sizes, device, compile, ...) are "settings differ". A t of 0.10 is above the
run-to-run spread of the interleaved medians on these shared 2-core machines (measured 3–8% for
the same commit) and below the effects worth knowing about; use a larger t for runs on different
days or machines (the report warns when CPU model, GPU or thread count differ).

    python -m benchmarks.compare OLD/results.json NEW/results.json [--threshold 0.1]
    python -m benchmarks SUITE ... --compare OLD/results.json     # the same, after the run
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from benchmarks.results import ResultsError, load_results

DEFAULT_THRESHOLD = 0.10
MACHINE_KEYS = ("cpu_model", "cuda", "threads", "torch", "jax")


def _rows(data: dict) -> dict[tuple, tuple[dict, dict]]:
    """{(suite, table, key values): (table, row)} of every comparable row."""
    out = {}
    for s in data["suites"]:
        for t in s.get("tables", []):
            if not t.get("metric"):
                continue
            for row in t.get("rows", []):
                out[(s["name"], t["name"], tuple(str(row.get(k)) for k in t.get("key", [])))] = (t, row)
    return out


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def compare(old: dict, new: dict, threshold: float = DEFAULT_THRESHOLD, against: str | None = None) -> dict:
    """The per-row comparison of two results dicts (load_results); JSON-ready."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    before, after = _rows(old), _rows(new)
    configs = [{s["name"]: s.get("config") for s in run["suites"]} for run in (old, new)]
    settings = {name: _diff(configs[0][name], configs[1][name]) for name in configs[0].keys() & configs[1].keys()
                if configs[0][name] != configs[1][name]}
    rows = []
    for ident in list(after) + [i for i in before if i not in after]:
        suite, table, key = ident
        t, row = after.get(ident) or before[ident]
        entry = dict(suite=suite, table=table, row=" / ".join(key), metric=t["metric"])
        if ident not in before or ident not in after:
            entry.update(verdict="new" if ident not in before else "gone",
                         old=_number(before[ident][1].get(t["metric"])) if ident in before else None,
                         new=_number(row.get(t["metric"])) if ident in after else None, ratio=None)
        else:
            o, n = _number(before[ident][1].get(t["metric"])), _number(row.get(t["metric"]))
            ratio = n / o if o and n is not None else None
            verdict = "not comparable"
            if suite in settings:  # a quick run against a full one, cpu against cuda: not the same row
                verdict = "settings differ"
            elif ratio is not None:
                worse = ratio > 1 + threshold if t["lower_is_better"] else ratio < 1 / (1 + threshold)
                better = ratio < 1 / (1 + threshold) if t["lower_is_better"] else ratio > 1 + threshold
                verdict = "regression" if worse else "improvement" if better else "same"
            entry.update(old=o, new=n, ratio=ratio, verdict=verdict)
        rows.append(entry)
    om, nm = old.get("machine", {}), new.get("machine", {})
    differs = [f"{k}: {om.get(k)} → {nm.get(k)}" for k in MACHINE_KEYS if om.get(k) != nm.get(k)]
    return dict(against=against, threshold=threshold, old_commit=om.get("git_commit"), new_commit=nm.get("git_commit"),
                machine_differs=differs, settings_differ=settings, rows=rows)


def _diff(old, new) -> str:
    """The settings that differ between two suite configs, as "key: old → new; ..."."""
    old, new = old or {}, new or {}
    return "; ".join(f"{k}: {old.get(k)} → {new.get(k)}" for k in sorted(old.keys() | new.keys())
                     if old.get(k) != new.get(k))


def compare_markdown(c: dict) -> str:
    counts = {}
    for r in c["rows"]:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    md = [f"## Compared with {c['against'] or 'the old run'} (commit {c['old_commit']} → {c['new_commit']})", "",
          f"Threshold ±{100 * c['threshold']:.0f}%: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), ""]
    for suite, what in c.get("settings_differ", {}).items():
        md += [f"**{suite}: run with other settings** ({what}): its rows are not compared.", ""]
    if c["machine_differs"]:
        md += ["**Different machine or versions** (differences may be the machine's): "
               + "; ".join(c["machine_differs"]), ""]
    changed = [r for r in c["rows"] if r["verdict"] != "same"]
    if changed:
        md += ["| suite | table | row | metric | old | new | new / old | verdict |",
               "|---|---|---|---|---|---|---|---|"]
        for r in sorted(changed, key=lambda r: (r["verdict"], r["suite"], r["table"])):
            f = lambda v: "" if v is None else f"{v:.3g}"
            md.append(f"| {r['suite']} | {r['table']} | {r['row']} | {r['metric']} | {f(r['old'])} | {f(r['new'])} | "
                      f"{f(r['ratio'])} | {r['verdict']} |")
    else:
        md.append("No row changed by more than the threshold.")
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    p.add_argument("old", type=Path, help="the earlier run's results.json")
    p.add_argument("new", type=Path, help="the later run's results.json")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="relative change that counts")
    args = p.parse_args(argv)
    if not args.threshold > 0:
        p.error(f"--threshold must be > 0, got {args.threshold}")
    try:
        old, new = load_results(args.old), load_results(args.new)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = compare(old, new, args.threshold, against=str(args.old))
    print(compare_markdown(c))
    return 1 if any(r["verdict"] == "regression" for r in c["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
