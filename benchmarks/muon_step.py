"""Muon step time over a nanochat d12 matrix set with every registered orthogonalizer, against the
outside implementations, with the polar error of each one's orthogonalized direction.

Parameter set: `--layers` blocks of the 6 matrices of a d12 block (width 768: q, k, v, proj
768×768, c_fc 3072×768, c_proj 768×3072, torch layout); 12 layers is the full d12. Fixed
Gaussian gradients, lr 0.02, momentum 0.95 (Nesterov), no weight decay. Implementations:
  - torch_impl.optim.Muon with each orthogonalizer (registry.default_steps, NS in each --ns-dtype, fp32
    by default), plain Muon (no NorMuon); plus Polar Express with NorMuon (β₂ 0.95), MuonEq and Muon+
    (nanochat's feature set); with --compile, Muon(compile=True) of each (cold compile in warm-up);
  - torch.optim.Muon (NS5 in bf16 inside, whatever the parameters' dtype; skipped on CPUs where
    bf16 GEMM is emulated unless --torch-optim on);
  - optax.contrib.muon (NS5, fp32, MuonDimensionNumbers(1, 0) for torch layout) under jax.jit;
  - nanochat's MuonAdamW (Polar Express + NorMuon + MuonEq + Muon+, fp32 COMPUTE_DTYPE), its fused
    step run eagerly (or compiled with --compile), when NANOCHAT_OPTIM is set (benchmarks/outside.py);
  - jax_reference.optim.muon (NS5, fp32) under jax.jit, for reference (not an outside implementation).
All are timed interleaved (report.interleaved_times: one untimed warm-up step each, then
`repeats` rounds of one step each); median, min and max. "speed-up" = fastest outside
implementation's median / this one's. Quality: polar_error (.specs/orthogonalizers.md §7) of the
direction each implementation's orthogonalization gives for one 768×3072 matrix (c_proj), Gaussian
and ill-conditioned U·diag(logspace(0, −6))·Vᵀ (benchmarks.orthogonalize.inputs). "goal met":
speed-up ≥ 1.3 and polar error ≤ NS5's (torch_impl newton_schulz, same dtype) on both inputs.

    python -m benchmarks.muon_step --quick        # 1 layer of width 256, 3 rounds (seconds)
    python -m benchmarks.muon_step                # 4 layers (24 matrices), 5 rounds
    python -m benchmarks.muon_step --layers 12    # the full d12 (memory: ~1 GB per implementation)
    python -m benchmarks.muon_step --ns-dtype float32 bfloat16   # ours in bf16 too (fast only with AVX512-BF16)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jax_reference.optim.muon as JM
import jax_reference.orthogonalizers.registry as JR
import torch_impl.orthogonalizers.balance as TB
import torch_impl.orthogonalizers.registry as TR
from benchmarks import outside
from benchmarks.harness import interleaved_times, positive_int
from benchmarks.optimizer_step import jax_step, matrix_shapes, torch_params
from benchmarks.orthogonalize import inputs
from benchmarks.results import Suite, Table, cli_main, pyplot
from torch_impl.optim import Muon
from torch_impl.orthogonalizers.newton_schulz import NS5_COEFFS, exact_polar

WIDTH = 768
LR = 0.02
GOAL = 1.3
OUTSIDE = ("torch.optim.Muon", "optax.contrib.muon", "nanochat")


def named(shapes) -> dict[str, tuple[int, ...]]:
    """The matrix list as the {name: shape} dict optimizer_step.jax_step takes (same order, same draws)."""
    return {f"{i:03d}": s for i, s in enumerate(shapes)}


def polar_errors(orth, G: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """polar_error (§7: ‖O − U Vᵀ‖_F/√s, as quality.quality_metrics, with the fp64 U Vᵀ computed
    once per input) of O = orth(X) for each input X: G maps a name to (X fp32, its exact polar factor)."""
    out = {}
    for kind, (X, polar) in G.items():
        O = orth(X)
        O = O.float().numpy() if isinstance(O, torch.Tensor) else np.asarray(O, np.float32)
        out[kind] = float(np.linalg.norm(O.astype(np.float64) - polar) / np.sqrt(min(X.shape)))
    return out


class Case(NamedTuple):
    label: str
    kind: str  # "ours", "outside" or "reference"
    dtype: str  # the orthogonalization's compute dtype
    make: Callable[[], Callable[[], object]]  # builds the optimizer, returns its zero-argument step
    orth: Callable[[np.ndarray], object]  # its orthogonalized direction for one fp32 matrix (quality)


def cases(args, shapes, nanochat) -> list[Case]:
    out = []
    for dtype in args.ns_dtype:
        tdt = getattr(torch, dtype)
        for name in args.methods:
            steps = TR.default_steps(name)
            orth = TR.resolve_orthogonalizer(name, steps, tdt)
            for compiled in (False, True) if args.compile else (False,):
                make = lambda n=name, k=steps, c=compiled, d=tdt: Muon(
                    torch_params(shapes), lr=LR, orthogonalizer=n, ns_steps=k, ns_dtype=d, compile=c).step
                out.append(Case(f"torch_impl Muon, {name}, {dtype}" + (" (compile)" if compiled else ""), "ours",
                                dtype, make, lambda X, f=orth: f(torch.from_numpy(X))))
        if "polar_express" in args.methods:
            eq = TB.balanced(TR.resolve_orthogonalizer("polar_express", 5, tdt), True, True)
            make = lambda d=tdt: Muon(torch_params(shapes), lr=LR, orthogonalizer="polar_express", ns_dtype=d,
                                      normuon_beta2=0.95, row_equilibration=True, frobenius_renormalization=True).step
            out.append(Case(f"torch_impl Muon, polar_express + NorMuon + MuonEq + Muon+, {dtype}", "ours", dtype,
                            make, lambda X, f=eq: f(torch.from_numpy(X))))
    if args.torch_optim:
        out.append(Case("torch.optim.Muon (NS5 in bf16)", "outside", "bfloat16",
                        lambda: torch.optim.Muon(torch_params(shapes), lr=LR, weight_decay=0.0).step,
                        lambda X: outside.torch_optim_ns(torch.from_numpy(X))))
    from optax.contrib import MuonDimensionNumbers
    from optax.contrib._muon import orthogonalize_via_newton_schulz
    ns5 = jnp.asarray(NS5_COEFFS)
    tx = optax.contrib.muon(LR, muon_weight_dimension_numbers=MuonDimensionNumbers(1, 0))
    out.append(Case("optax.contrib.muon NS5 fp32 (jit)", "outside", "float32", lambda: jax_step(tx, named(shapes)),
                    jax.jit(lambda X: orthogonalize_via_newton_schulz(X, ns5, 5))))
    for mode in ("eager", "compiled") if args.compile and nanochat else ("eager",) if nanochat else ():
        def make(mode=mode):
            opt = outside.nanochat_optimizer(nanochat, torch_params(shapes), LR)

            def step():  # eager and compiled share the module: set its mode per call
                outside.nanochat_mode(nanochat, mode, torch.float32)
                opt.step()
            return step
        out.append(Case(f"nanochat MuonAdamW fp32 ({mode})", "outside", "float32", make,
                        lambda X: outside.nanochat_orthogonalize(nanochat, torch.from_numpy(X))))
    jns = jax.jit(lambda X: JR.ORTHOGONALIZERS["newton_schulz"](X, steps=5, eps=1e-7, compute_dtype=jnp.float32))
    out.append(Case("jax_reference.optim.muon NS5 fp32 (jit)", "reference", "float32",
                    lambda: jax_step(JM.muon(LR, ns_dtype=jnp.float32, nonfinite="skip"), named(shapes)), jns))
    return out


COLUMNS = [("implementation", "implementation"), ("kind", "kind"), ("ms", "median ms"), ("min_ms", "min ms"),
           ("max_ms", "max ms"), ("speedup", "speed-up vs fastest outside"),
           ("speedup_fp32", "speed-up vs fastest fp32 outside"), ("polar_gaussian", "polar err (Gaussian)"),
           ("polar_ill", "polar err (ill-cond)"), ("goal", f"≥{GOAL}× and ≤ NS5 error")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.muon_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 layer of width 256, 3 rounds")
    p.add_argument("--layers", type=positive_int, default=None, help="blocks of 6 matrices (default 4; 1 with --quick)")
    p.add_argument("--width", type=positive_int, default=None, help=f"model width (default {WIDTH}; 256 with --quick)")
    p.add_argument("--methods", nargs="+", default=list(TR.ORTHOGONALIZERS), choices=list(TR.ORTHOGONALIZERS))
    p.add_argument("--ns-dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                   help="ours' NS compute dtype(s)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed rounds (default 5; 3 with --quick)")
    p.add_argument("--compile", action="store_true", help="also Muon(compile=True) and nanochat compiled")
    p.add_argument("--torch-optim", choices=("auto", "on", "off"), default="auto",
                   help="include torch.optim.Muon (bf16 NS inside); auto: where bf16 GEMM is native")
    p.add_argument("--out", type=Path, default=Path("reports/muon_step"), help="results folder")
    return p


def measure(args) -> Suite:
    layers = args.layers or (1 if args.quick else 4)
    width = args.width or (256 if args.quick else WIDTH)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.torch_optim = args.torch_optim == "on" or (args.torch_optim == "auto" and outside.bf16_gemm_native("cpu"))
    jax.config.update("jax_default_matmul_precision", "highest")
    nanochat, why = outside.load_nanochat()
    print(f"nanochat: {why}", flush=True)
    shapes = matrix_shapes(layers, width)
    G = {kind: (X, exact_polar(torch.from_numpy(X)).numpy()) for kind, X in inputs((width, 4 * width)).items()}
    todo = {case.label: case for case in cases(args, shapes, nanochat)}
    quality = {}
    for label, case in todo.items():
        quality[label] = polar_errors(case.orth, G)
        print(f"{label:62} polar error {quality[label]['gaussian']:.3e} (Gaussian), "
              f"{quality[label]['ill-cond']:.3e} (ill-cond)", flush=True)
    stats = interleaved_times({label: case.make() for label, case in todo.items()}, args.repeats)
    outside_t = {k: s["median_s"] for k, s in stats.items() if todo[k].kind == "outside"}
    fp32_t = {k: t for k, t in outside_t.items() if todo[k].dtype == "float32"}
    fastest = min(outside_t, key=outside_t.get) if outside_t else None
    fastest32 = min(fp32_t, key=fp32_t.get) if fp32_t else None
    rows = []
    for label, st in stats.items():
        q, case = quality[label], todo[label]
        r = dict(implementation=label, kind=case.kind, ms=st["median_s"] * 1e3, min_ms=st["min_s"] * 1e3,
                 max_ms=st["max_s"] * 1e3, n=st["n"], polar_gaussian=q["gaussian"], polar_ill=q["ill-cond"],
                 speedup=outside_t[fastest] / st["median_s"] if fastest else None,
                 speedup_fp32=fp32_t[fastest32] / st["median_s"] if fastest32 else None)
        ns5 = quality.get(f"torch_impl Muon, newton_schulz, {case.dtype}")
        if case.kind == "ours" and fastest and ns5:
            r["goal"] = "yes" if r["speedup"] >= GOAL and all(q[k] <= ns5[k] for k in q) else "no"
        rows.append(r)
        print(f"{label:62} {r['ms']:9.1f} ms [{r['min_ms']:.1f}, {r['max_ms']:.1f}]"
              + (f"  ×{r['speedup']:.2f} vs fastest outside" if fastest else ""), flush=True)
    torch_optim = "included (its NS runs in bf16)" if args.torch_optim else "skipped (bf16 GEMM emulated here)"
    nano = (f"{why}; its fused step run eagerly (the function torch.compile wraps), with MuonEq and Muon+ "
            "(always on in that version) and NorMuon; its polar error is of Muon+(PE(MuonEq(G))), NorMuon held "
            "neutral" + (", and compiled (cold compile in the warm-up)" if args.compile else "")
            if nanochat else f"skipped ({why})")
    notes = (f"Parameter set: {layers} layer(s) of width {width}: {len(shapes)} matrices. Ours: NS in "
             f"{', '.join(args.ns_dtype)} (goal: polar error vs NS5 in the same dtype). Median of {args.repeats} "
             f"interleaved rounds after one untimed warm-up step each; torch threads {torch.get_num_threads()}. "
             f"Fastest outside implementation: {fastest}; fastest fp32 outside: {fastest32}. "
             f"torch.optim.Muon: {torch_optim}. nanochat: {nano}. The NorMuon row's polar error is of "
             "Muon+(PE(MuonEq(G))) (NorMuon comes after orth). Polar errors on one "
             f"{width}×{4 * width} matrix; ill-cond = U·diag(logspace(0, −6))·Vᵀ.")
    table = Table("step", f"Muon step over {layers} layer(s) of width {width}: orthogonalizers vs outside "
                  "implementations", COLUMNS, rows, key=("implementation",), metric="ms",
                  spread=("min_ms", "max_ms"))
    config = dict(layers=layers, width=width, ns_dtype=args.ns_dtype, compile=args.compile, repeats=args.repeats,
                  torch_optim=args.torch_optim, nanochat=nanochat is not None)
    return Suite("muon_step", [table], notes, {"time_vs_quality": figure(rows)}, config=config)


def figure(rows: list[dict]):
    """Median step time against the polar error (Gaussian input) of each implementation: the
    speed / quality trade-off in one picture (lower left is better)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for r in rows:
        marker = {"ours": "o", "outside": "s", "reference": "^"}[r["kind"]]
        ax.errorbar(r["polar_gaussian"], r["ms"], yerr=[[r["ms"] - r["min_ms"]], [r["max_ms"] - r["ms"]]],
                    marker=marker, capsize=2, label=r["implementation"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("polar error of the direction (Gaussian input; lower is better)")
    ax.set_ylabel("median ms per step (bars: min–max)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="best")
    ax.set_title("Muon step: time vs orthogonalization quality (circles ours, squares outside)")
    return fig


def main(argv=None) -> int:
    return cli_main(parser(), measure, argv, title="Muon step: orthogonalizers vs outside implementations")


if __name__ == "__main__":
    sys.exit(main())
