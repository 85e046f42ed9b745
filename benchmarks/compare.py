"""Regressions and improvements between two benchmark runs, row by row.

Rows are matched by (suite, table, the table's key columns); the table's `metric` column is
compared as ratio = new / old. With threshold t:

    lower is better:  ratio > 1 + t → "regression",   ratio < 1 / (1 + t) → "improvement"
    higher is better: ratio < 1 / (1 + t) → "regression", ratio > 1 + t → "improvement"

except that a row whose two runs' [min, max] ranges overlap (the table's `spread`) stays "same":
the change is within the runs' own noise. Anything between is "same"; rows in only one run are
"new" / "gone"; rows of a suite run with other settings (its `config`: sizes, device, compile, ...)
are "settings differ". The report warns when CPU model, GPU, thread count or versions differ.

Default t: 0.5 when either run is --quick, 0.1 otherwise. Measured on the 2-core EPYC: two
back-to-back quick runs of the same commit moved the medians by 2–20% (median over a suite's rows)
and up to 2.4x (an FSDP2 step of 66 ms, within its own min–max; flagged: a 1-rank AdamW step
of 1-2 ms at 0.5x, torch.optim.Muon's quick step at 1.9x): machine drift between runs that the
in-run min/max do not cover. At t = 0.1, 20 of their 177 rows were flagged; at t = 0.5, 3.
Full-size runs (seconds per call) were not measured twice here; 0.1 is a starting point for
them, and a run on another day or machine wants a larger t.

    python -m benchmarks.compare OLD/results.json NEW/results.json [--threshold T]
    python -m benchmarks SUITE ... --compare OLD/results.json     # the same, after the run
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from benchmarks.results import ResultsError, load_results

QUICK_THRESHOLD, FULL_THRESHOLD = 0.5, 0.1  # see the module docstring for the measurement


def default_threshold(old: dict, new: dict) -> float:
    return QUICK_THRESHOLD if old.get("quick") or new.get("quick") else FULL_THRESHOLD
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


def compare(old: dict, new: dict, threshold: float | None = None, against: str | None = None) -> dict:
    """The per-row comparison of two results dicts (load_results); JSON-ready. threshold None: the
    default for the runs' kind (default_threshold)."""
    threshold = default_threshold(old, new) if threshold is None else threshold
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
                if verdict != "same" and _overlap(t.get("spread"), before[ident][1], row):
                    verdict = "same"  # the two runs' [min, max] overlap: within their own noise
            entry.update(old=o, new=n, ratio=ratio, verdict=verdict)
        rows.append(entry)
    om, nm = old.get("machine", {}), new.get("machine", {})
    differs = [f"{k}: {om.get(k)} → {nm.get(k)}" for k in MACHINE_KEYS if om.get(k) != nm.get(k)]
    return dict(against=against, threshold=threshold, old_commit=om.get("git_commit"), new_commit=nm.get("git_commit"),
                machine_differs=differs, settings_differ=settings, rows=rows)


def _overlap(spread, old: dict, new: dict) -> bool:
    """Whether the [min, max] ranges of the two rows' repetitions overlap (False without a spread)."""
    if not spread:
        return False
    lo_col, hi_col = spread
    lo_o, hi_o, lo_n, hi_n = (_number(r.get(c)) for r, c in ((old, lo_col), (old, hi_col), (new, lo_col),
                                                            (new, hi_col)))
    if None in (lo_o, hi_o, lo_n, hi_n):
        return False
    return lo_n <= hi_o and lo_o <= hi_n


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


def against(old: dict, threshold: float | None, path: str):
    """For results.write_folder's compare_with: this run's results -> (the comparison with `old`
    (load_results checked its structure), its Markdown section)."""
    def compare_with(new: dict) -> tuple[dict, str]:
        c = compare(old, new, threshold, path)
        return c, compare_markdown(c)
    return compare_with


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    p.add_argument("old", type=Path, help="the earlier run's results.json")
    p.add_argument("new", type=Path, help="the later run's results.json")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"relative change that counts (default {QUICK_THRESHOLD} if either run is --quick, "
                        f"else {FULL_THRESHOLD})")
    args = p.parse_args(argv)
    if args.threshold is not None and not args.threshold > 0:
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
