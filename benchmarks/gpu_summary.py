"""summary.md of a GPU check folder (benchmarks/gpu_check.sh): each stage's result and issue 12's two goals.

- Newton-Schulz (NS5) in bf16, torch eager, at ≥ 85% of the measured bf16 matmul rate at the same shape
  (the orthogonalize suite's "% matmul": NS5's matmul FLOPs per second over the plain X·Xᵀ rate);
- d12 training with --compile at ≥ 50% MFU against the dense bf16 peak (median over the steps after the
  first 10, which pay for torch.compile).

    python -m benchmarks.gpu_summary OUT     # prints the Markdown (gpu_check.sh tees it to OUT/summary.md)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

NS_GOAL, MFU_GOAL = 85.0, 0.50
WARMUP_STEPS = 10


def ns_rows(out: Path) -> list[dict]:
    data = json.loads((out / "orthogonalize" / "results.json").read_text())
    speed = next(t["rows"] for s in data["suites"] if s["name"] == "orthogonalize" for t in s["tables"]
                 if t["name"] == "speed")
    return [r for r in speed if r["method"] == "newton_schulz" and r["implementation"] == "torch eager"
            and r["dtype"] == "bfloat16"]


def steady_train(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "train_d12" / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in recs if r.get("type") == "train" and r.get("mfu") is not None]
    return train[WARMUP_STEPS:] or train


def summary(out: Path) -> tuple[str, dict]:
    """(the Markdown, {goal: met?} for the goals that could be measured)."""
    md, met = [f"# GPU check ({out})", ""], {}
    smi = out / "nvidia-smi.txt"
    if smi.exists():
        md += ["```", *smi.read_text().splitlines()[:12], "```", ""]
    md += ["| stage | result |", "|---|---|"]
    stages = out / "stages.txt"
    for line in stages.read_text().splitlines() if stages.exists() else []:
        name, _, result = line.partition(": ")
        md.append(f"| {name} | {result} |")
    md.append("")
    try:
        ns = ns_rows(out)
        md += [f"Newton-Schulz (NS5) bf16, torch eager, % of the measured bf16 matmul rate at each shape "
               f"(goal ≥ {NS_GOAL:.0f}%):", "", "| shape | median ms | TFLOP/s | % matmul |", "|---|---|---|---|"]
        md += [f"| {r['shape']} | {r['ms']:.3f} | {r['gflops'] / 1e3:.1f} | {r['pct_matmul']:.0f} |" for r in ns]
        best = max(r["pct_matmul"] for r in ns)
        met["ns_bf16"] = best >= NS_GOAL
        md += ["", f"Best {best:.0f}%: goal {'met' if met['ns_bf16'] else 'not met'}.", ""]
    except (OSError, StopIteration, KeyError, ValueError) as e:
        md += [f"Orthogonalizer results missing ({type(e).__name__}: {e}).", ""]
    try:
        steady = steady_train(out)
        mfu = statistics.median(r["mfu"] for r in steady)
        tok = statistics.median(r["tokens_per_s"] for r in steady)
        met["d12_mfu"] = mfu >= MFU_GOAL
        md += [f"d12 training with --compile: median over steps {steady[0]['step']}–{steady[-1]['step']}: "
               f"{tok:,.0f} tokens/s, MFU {100 * mfu:.1f}% of the dense bf16 peak (goal ≥ {100 * MFU_GOAL:.0f}%: "
               f"{'met' if met['d12_mfu'] else 'not met'}).", ""]
    except (OSError, KeyError, ValueError, statistics.StatisticsError) as e:
        md += [f"d12 training metrics missing ({type(e).__name__}: {e}).", ""]
    return "\n".join(md), met


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m benchmarks.gpu_summary OUT  (a gpu_check.sh output folder)", file=sys.stderr)
        return 2
    md, _ = summary(Path(args[0]))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
