"""python -m benchmarks: run benchmark suites by name into one results folder.

    python -m benchmarks --quick                          # every suite, small sizes (CPU smoke, ~2 min)
    python -m benchmarks orthogonalize training           # those suites at full size
    python -m benchmarks --quick --compare OLD/results.json   # and the per-row changes since OLD
    python -m benchmarks --list                           # the suites and what each measures

Writes OUT/results.json (schema: benchmarks/results.py), OUT/report.md and each suite's PNG plots.
A suite that cannot run here (an optional framework not installed, --device cuda without a GPU)
is reported as skipped with the reason, one that raises as failed; the other suites still run.
Exit status: 0 all requested suites ran or were skipped for a missing optional dependency;
1 a suite failed; 2 bad input (an unknown suite name, an unreadable --compare file, --device cuda
without a GPU), reported after the remaining suites ran.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from benchmarks.compare import FULL_THRESHOLD, QUICK_THRESHOLD, against
from benchmarks.results import ResultsError, Suite, load_results, run_suite, write_folder

# name: (module, what it measures). Each module has parser() (with --quick) and measure(args) -> Suite,
# and runs alone as python -m benchmarks.<module>.
SUITES = {
    "orthogonalize": ("benchmarks.orthogonalize", "every orthogonalizer per call: torch eager / compiled, jax.jit, "
                      "optax, torch.optim.Muon, nanochat; % of the matmul rate; quality"),
    "muon_step": ("benchmarks.muon_step", "a Muon step over d12 matrices with each orthogonalizer vs "
                  "torch.optim.Muon, optax.contrib.muon, nanochat"),
    "optimizer": ("benchmarks.optimizer_step", "Muon / AdamW / hybrid steps of d12 and d20 parameter sets vs "
                  "torch.optim.Muon, torch.optim.AdamW (foreach, fused), optax"),
    "distributed": ("benchmarks.distributed", "DistMuon / DistAdamW vs all_reduce + local step at 1, 2, 4 gloo "
                    "ranks: step time, bytes vs the ring model, owner balance"),
    "sharding": ("benchmarks.sharding", "ZeRO-2 (step / backward) vs FSDP2 vs torch.optim.Muon on DTensors: "
                 "memory per rank vs theory, bytes, step time"),
    "training": ("benchmarks.training", "GPT training step: tokens/s and MFU, torch vs a jitted JAX step, "
                 "the orthogonalizer's share of the step"),
    "spectra": ("benchmarks.spectra", "singular values of one matrix's AdamW, momentum and orthogonalized updates"),
}


# the optional frameworks of the [bench] extra: a suite that needs a missing one is skipped, not failed
OPTIONAL = ("jax", "jaxlib", "optax", "matplotlib")


def build_args(module, quick: bool, device: str | None) -> argparse.Namespace:
    """The suite's own defaults, with --quick and --device passed through where it has them."""
    p = module.parser()
    argv = ["--quick"] if quick else []
    if device is not None and any("--device" in a.option_strings for a in p._actions):
        argv += ["--device", device]
    return p.parse_args(argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run (default: all): {', '.join(SUITES)}")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run in seconds per suite")
    p.add_argument("--out", type=Path, default=Path("reports/latest"), help="results folder (default reports/latest)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="for the suites that take one (default: each suite's own, auto = CUDA where visible)")
    p.add_argument("--compare", type=Path, metavar="OLD.json", help="report per-row changes against this results.json")
    p.add_argument("--threshold", type=float, default=None,
                   help="relative change --compare calls a regression or improvement (default "
                        f"{QUICK_THRESHOLD} if either run is --quick, else {FULL_THRESHOLD}: benchmarks/compare.py)")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (_, what) in SUITES.items():
            print(f"{name:14} {what}")
        print("\nThe Muon vs AdamW training study is its own command: python -m benchmarks.study [--quick]")
        return 0
    if args.threshold is not None and not args.threshold > 0:
        p.error(f"--threshold must be > 0, got {args.threshold}")
    errors = []
    unknown = [s for s in args.suites if s not in SUITES]
    for s in unknown:
        errors.append(f"unknown suite {s!r} (known: {', '.join(SUITES)})")
        print(f"error: {errors[-1]}; running the others", file=sys.stderr, flush=True)
    names = [s for s in dict.fromkeys(args.suites) if s in SUITES] if args.suites else list(SUITES)
    old = None
    if args.compare is not None:  # checked before the (long) run, reported again at the end
        try:
            old = load_results(args.compare)
        except ResultsError as e:
            errors.append(f"--compare: {e}")
            print(f"error: {errors[-1]}; running the suites without the comparison", file=sys.stderr, flush=True)
    suites = []
    for name in names:
        print(f"=== {name} ===", flush=True)
        module_name = SUITES[name][0]
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            missing = (e.name or "").split(".")[0]
            if missing in OPTIONAL:
                suites.append(Suite(name, status="skipped", reason=f"needs {missing}: pip install -e '.[bench]'"))
            else:  # our own code is broken (a renamed symbol): a failure, not a missing extra
                suites.append(Suite(name, status="failed", reason=f"{type(e).__name__}: {e}"))
            print(f"{name}: {suites[-1].status} ({suites[-1].reason})", file=sys.stderr, flush=True)
            continue
        suite = run_suite(name, module.measure, build_args(module, args.quick, args.device))
        suites.append(suite)
        print(f"{name}: {suite.status}" + (f" ({suite.reason})" if suite.reason else "") + f", {suite.seconds:.1f} s",
              file=sys.stderr if suite.status != "ok" else sys.stdout, flush=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda: no CUDA device is visible here; the suites that take a device were skipped")
    data = write_folder(args.out, suites, sys.argv[1:] if argv is None else list(argv), args.quick,
                        compare_with=None if old is None else against(old, args.threshold, str(args.compare)))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'report.md'}"
          + "".join(f", {args.out / p}" for s in data["suites"] for p in s["plots"]))
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    failed = [s.name for s in suites if s.status == "failed"]
    if failed:
        print(f"error: suite(s) failed: {', '.join(failed)} (see results.json for the reason)", file=sys.stderr)
    return 2 if errors else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
