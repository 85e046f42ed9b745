"""Orthogonalizer benchmark: every registered method (.specs/orthogonalizers.md §1), speed and quality.

Speed — wall time per call on a Gaussian input of each GPT matrix shape (d12: 768×768, 3072×768,
768×3072; d20: 1280×1280, 5120×1280, 1280×5120; stacks 4×768×768 and 6×768×3072), of
  - torch_impl eager: registry.ORTHOGONALIZERS[name](X, steps=default_steps(name), eps=1e-7,
    compute_dtype=dtype), fp32 input (and torch.compile of it with --compile);
  - jax.jit of jax_reference.orthogonalizers.registry.ORTHOGONALIZERS[name], the same arguments;
  - optax's Newton-Schulz (NS5, the Polar Express table, AOL) under jax.jit; torch.optim.Muon's NS
    (bf16 inside); nanochat's fused Muon step run eagerly (its Polar Express *plus* momentum, MuonEq,
    Muon+, NorMuon and the update), when NANOCHAT_OPTIM is set (benchmarks/outside.py);
  - the plain matmul X·Xᵀ on the wide orientation (XᵀX for a tall X: the small s × s Gram product,
    NS's commonest GEMM) in torch and jax.jit: the machine's matmul rate at that shape.
All implementations of one shape and dtype are timed interleaved (report.interleaved_times: one
untimed warm-up call each, which includes jit/compile, then `repeats` rounds of one call each);
median, min and max are reported. GFLOP/s counts each method's matmul FLOPs (flops(); elementwise
work is not counted), and "% matmul" divides by the faster plain-matmul rate at that shape.

Quality — the §7 metrics (jax_reference.orthogonalizers.quality, fp64) of every output, on a Gaussian input and on
an ill-conditioned U·diag(logspace(0, −6))·Vᵀ, for the non-tall unstacked shapes (f(Xᵀ) = f(X)ᵀ).

    python -m benchmarks.orthogonalize --quick              # small shapes, ~15 s on 2 cores
    python -m benchmarks.orthogonalize                      # GPT shapes, fp32
    python -m benchmarks.orthogonalize --dtypes float32 bfloat16   # bf16 too (slow on AVX2-only CPUs)
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jax_reference.orthogonalizers.registry as JR
import torch_impl.orthogonalizers.registry as TR
from benchmarks import outside
from benchmarks.harness import block, interleaved_times, jax_on, positive_int, resolve_device
from benchmarks.results import Suite, Table, cli_main, pyplot
from jax_reference.orthogonalizers.quality import METRICS, quality_metrics
from torch_impl.orthogonalizers.gram_newton_schulz import RESTART_AFTER

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
FULL_SHAPES = ((768, 768), (3072, 768), (768, 3072), (1280, 1280), (5120, 1280), (1280, 5120),
               (4, 768, 768), (6, 768, 3072))
QUICK_SHAPES = ((128, 128), (128, 512), (4, 128, 512))
EPS = 1e-7
MATMUL = "plain matmul (small Gram)"
TORCH_OPTIM = "torch.optim.Muon NS (bf16 inside)"


def flops(method: str, shape: tuple[int, ...], steps: int) -> float:
    """Matmul FLOPs of one call on the wide orientation (s = min, l = max side), times the batch.
    NS step: X Xᵀ, A·A, B·X = 4s²l + 2s³ (AOL too: its preconditioner's Gram is step 1's); cubic
    (c = 0): X Xᵀ, A·X = 4s²l; Gram NS (§3): 2s²l for R₀, 4s²l per restart, 2s²l for the final QX,
    and per step R·R, Q·Z (not on a segment's first step), R·Z and Z·RZ (not on its last)."""
    *batch, m, n = shape
    s, l = min(m, n), max(m, n)
    if method == MATMUL:
        per = 2 * s * s * l
    elif method == "cubic":
        per = steps * 4 * s * s * l
    elif method == "gram_newton_schulz" and s < l:
        per, first = 4 * s * s * l, True
        for k in range(steps):  # k steps done before this one
            if k in RESTART_AFTER:
                per, first = per + 4 * s * s * l, True
            per += 2 * s**3 * (1 + (not first) + 2 * (k + 1 < steps and k + 1 not in RESTART_AFTER))
            first = False
    else:
        per = steps * (4 * s * s * l + 2 * s**3)
    return math.prod(batch) * per


def inputs(shape, seed: int = 0) -> dict[str, np.ndarray]:
    """fp32 benchmark inputs: "gaussian", and "ill-cond" = U·diag(logspace(0, −6, s))·Vᵀ per matrix."""
    rng = np.random.default_rng(seed)
    *batch, m, n = shape
    s = min(m, n)
    U = np.linalg.qr(rng.standard_normal((*batch, m, s)))[0]
    V = np.linalg.qr(rng.standard_normal((*batch, n, s)))[0]
    ill = (U * np.logspace(0, -6, s)) @ np.swapaxes(V, -1, -2)
    return {"gaussian": rng.standard_normal(shape).astype(np.float32), "ill-cond": ill.astype(np.float32)}


def implementations(methods, dtype: str, args, nanochat) -> dict[tuple[str, str], tuple]:
    """{(method, implementation): (steps, f, framework, cast)}: f takes a torch or jax array
    (framework), fp32 or already cast to the compute dtype (cast), and returns un-blocked results.
    f None: nanochat's fused step, built per input (it mutates its input)."""
    tdt, jdt = DTYPES[dtype]
    gram = lambda G, T: T(G) @ G if G.shape[-2] > G.shape[-1] else G @ T(G)  # s × s, as NS's X Xᵀ
    impls = {(MATMUL, "torch"): (1, lambda G: gram(G, lambda x: x.mT), "torch", True)}
    if args.jax:
        impls[(MATMUL, "jax.jit")] = (1, jax.jit(lambda G: gram(G, lambda x: jnp.swapaxes(x, -1, -2))), "jax", True)
    for name in methods:
        steps = TR.default_steps(name)
        t_fn = functools.partial(TR.ORTHOGONALIZERS[name], steps=steps, eps=EPS, compute_dtype=tdt)
        impls[(name, "torch eager")] = (steps, t_fn, "torch", False)
        if args.compile:
            impls[(name, "torch.compile")] = (steps, torch.compile(t_fn, fullgraph=True, dynamic=False), "torch", False)
        if args.jax:
            impls[(name, "jax.jit")] = (steps, jax.jit(functools.partial(
                JR.ORTHOGONALIZERS[name], steps=steps, eps=EPS, compute_dtype=jdt)), "jax", False)
    for name, (label, steps, fn) in outside.optax_orthogonalizers().items():
        if name in methods and args.jax:
            impls[(name, label)] = (steps, fn, "jax", True)  # optax computes in its input's dtype
    # its NS is bf16 whatever the input: timed next to the bf16 methods, or next to fp32 ones only when
    # no bf16 is run (then it is a reference point, never marked fastest: pivot())
    if args.torch_optim_ns and "newton_schulz" in methods and (dtype == "bfloat16" or "bfloat16" not in args.dtypes):
        impls[("newton_schulz", TORCH_OPTIM)] = (5, outside.torch_optim_ns, "torch", False)
    if nanochat is not None and "polar_express" in methods:
        impls[("polar_express", "nanochat fused step (eager)")] = (5, None, "torch", False)
    return impls


def as_numpy(x) -> np.ndarray:
    return (x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)).astype(np.float64)


def run_shape(shape, dtype: str, methods, args, nanochat) -> tuple[list[dict], list[dict]]:
    impls = implementations(methods, dtype, args, nanochat)
    tdt, jdt = DTYPES[dtype]
    data = inputs(shape)

    def arg(X: np.ndarray, framework: str, cast: bool):
        if framework == "torch":
            return torch.from_numpy(X).to(args.device, tdt if cast else torch.float32)
        return jnp.asarray(X, jdt if cast else jnp.float32)

    def call(fn, X: np.ndarray, framework: str, cast: bool):
        if fn is None:  # nanochat: a fused-step closure over its own copy of the input
            step = outside.nanochat_fused_step(nanochat, torch.from_numpy(X).to(args.device))
            return lambda: block(step())
        x = arg(X, framework, cast)
        return lambda: block(fn(x))

    fns = {key: call(fn, data["gaussian"], fw, cast) for key, (_, fn, fw, cast) in impls.items()}
    stats = interleaved_times(fns, args.repeats)
    peak = max(flops(MATMUL, shape, 1) / stats[(MATMUL, impl)]["median_s"]
               for impl in ("torch", "jax.jit") if (MATMUL, impl) in stats)
    base = stats.get(("newton_schulz", "torch eager"), {}).get("median_s")
    speed = []
    for (method, impl), st in stats.items():
        steps = impls[(method, impl)][0]
        rate = flops(method, shape, steps) / st["median_s"]
        r = dict(shape="x".join(map(str, shape)), dtype=dtype, method=method, implementation=impl, steps=steps,
                 ms=st["median_s"] * 1e3, min_ms=st["min_s"] * 1e3, max_ms=st["max_s"] * 1e3, n=st["n"],
                 gflops=rate / 1e9, pct_matmul=100 * rate / peak,
                 vs_torch_ns5=st["median_s"] / base if base and method != MATMUL else None)
        speed.append(r)
        print(f"{r['shape']:>11} {dtype:>8} {method:>18} {impl:>34} {r['ms']:9.1f} ms [{r['min_ms']:.1f}, "
              f"{r['max_ms']:.1f}] {r['gflops']:7.1f} GFLOP/s {r['pct_matmul']:5.1f}% of matmul", flush=True)
    quality = []
    if args.quality and len(shape) == 2 and shape[0] <= shape[1]:
        for kind, X in data.items():
            for (method, impl), (_, fn, fw, cast) in impls.items():
                if method == MATMUL:
                    continue
                O = (outside.nanochat_orthogonalize(nanochat, torch.from_numpy(X).to(args.device)) if fn is None
                     else fn(arg(X, fw, cast)))
                q = quality_metrics(as_numpy(O), X.astype(np.float64))
                quality.append(dict(input=kind, shape="x".join(map(str, shape)), dtype=dtype, method=method,
                                    implementation=impl, **{k: float(q[k]) for k in METRICS}))
                print(f"{quality[-1]['shape']:>11} {dtype:>8} {kind:>8} {method:>18} {impl:>34} polar error "
                      f"{quality[-1]['polar_error']:.2e}  σ [{quality[-1]['sigma_min']:.3f}, "
                      f"{quality[-1]['sigma_max']:.3f}]", flush=True)
    return speed, quality


def pivot(speed: list[dict]) -> Table:
    """One row per (dtype, shape, method), the implementations' median ms side by side (the fastest
    marked), jax.jit's time over torch eager's, and the best % of the matmul rate."""
    impls = list(dict.fromkeys(r["implementation"] for r in speed if r["method"] != MATMUL))
    rows: dict[tuple, dict] = {}
    for r in speed:
        if r["method"] == MATMUL:
            continue
        row = rows.setdefault((r["dtype"], r["shape"], r["method"]),
                              dict(dtype=r["dtype"], shape=r["shape"], method=r["method"], steps=r["steps"]))
        row[r["implementation"]] = r["ms"]
        if r["implementation"] != TORCH_OPTIM or r["dtype"] == "bfloat16":  # a bf16 rate over an fp32 one
            row["pct_matmul"] = max(row.get("pct_matmul", 0.0), r["pct_matmul"])
    for row in rows.values():
        if row.get("torch eager") and row.get("jax.jit"):
            row["jax_over_torch"] = row["jax.jit"] / row["torch eager"]
    columns = ([("dtype", "dtype"), ("shape", "shape"), ("method", "method"), ("steps", "steps")]
               + [(i, f"{i} ms") for i in impls]
               + [("jax_over_torch", "jax.jit ÷ torch eager"), ("pct_matmul", "best % of matmul rate")])
    return Table("time", "Median ms per call, implementations side by side (fastest in bold)", columns,
                 list(rows.values()), key=("dtype", "shape", "method"),
                 best=tuple(i for i in impls if i != TORCH_OPTIM))  # bf16 inside: not the fp32 rows' rival


SPEED_COLUMNS = [("shape", "shape"), ("dtype", "dtype"), ("method", "method"), ("implementation", "implementation"),
                 ("steps", "steps"), ("ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
                 ("gflops", "GFLOP/s"), ("pct_matmul", "% matmul"), ("vs_torch_ns5", "time / torch NS5")]
QUALITY_COLUMNS = [("input", "input"), ("shape", "shape"), ("dtype", "dtype"), ("method", "method"),
                   ("implementation", "implementation")] + [(m, m) for m in METRICS]


def figures(speed: list[dict]) -> dict:
    """time_vs_shape: one panel per method, median ms against the shape (ordered by FLOPs) for each
    implementation; pct_matmul: each implementation's share of the plain matmul rate, largest shape."""
    plt = pyplot()

    dtype = speed[0]["dtype"]
    rows = [r for r in speed if r["dtype"] == dtype]
    shapes = sorted(dict.fromkeys(r["shape"] for r in rows),
                    key=lambda s: flops(MATMUL, tuple(int(d) for d in s.split("x")), 1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols, nrows = 4, math.ceil(len(methods) / 4)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False, constrained_layout=True)
    for ax, method in zip(axes.flat, methods):
        for impl in dict.fromkeys(r["implementation"] for r in rows if r["method"] == method):
            pts = {r["shape"]: r for r in rows if r["method"] == method and r["implementation"] == impl}
            xs = [i for i, s in enumerate(shapes) if s in pts]
            ax.errorbar(xs, [pts[shapes[i]]["ms"] for i in xs], marker="o", ms=3, label=impl, capsize=2,
                        yerr=[[pts[shapes[i]]["ms"] - pts[shapes[i]]["min_ms"] for i in xs],
                              [pts[shapes[i]]["max_ms"] - pts[shapes[i]]["ms"] for i in xs]])
        ax.set_title(method, fontsize=10)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)), shapes, rotation=45, fontsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle(f"Median ms per call ({dtype}; bars: min–max)")
    big = shapes[-1]
    last = [r for r in rows if r["shape"] == big and r["method"] != MATMUL]
    impls = list(dict.fromkeys(r["implementation"] for r in last))
    fig2, ax = plt.subplots(figsize=(max(8, len(methods) * 1.3), 4), constrained_layout=True)
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        pts = {r["method"]: r["pct_matmul"] for r in last if r["implementation"] == impl}
        xs = [i for i, m in enumerate(methods) if m in pts]
        ax.bar([x + k * width for x in xs], [pts[methods[x]] for x in xs], width, label=impl)
    ax.axhline(100, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=20, fontsize=8)
    ax.set_ylabel("% of the plain matmul rate")
    ax.set_title(f"Matmul FLOP rate of each method as % of the machine's plain matmul rate ({big}, {dtype})")
    ax.legend(fontsize=7)
    return {"time_vs_shape": fig, "pct_matmul": fig2}


def shape_arg(text: str) -> tuple[int, ...]:
    """argparse type: ROWSxCOLS or BATCHxROWSxCOLS, every dimension ≥ 1."""
    try:
        shape = tuple(int(d) for d in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give shapes as ROWSxCOLS or BATCHxROWSxCOLS")
    return shape


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.orthogonalize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shapes 128x128, 128x512, 4x128x512; 3 repeats")
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                   help="compute dtypes (default float32 on CPU, bfloat16 and float32 on CUDA)")
    p.add_argument("--methods", nargs="+", default=list(TR.ORTHOGONALIZERS), choices=list(TR.ORTHOGONALIZERS))
    p.add_argument("--shapes", nargs="+", type=shape_arg, default=None,
                   help="e.g. 768x3072 6x768x3072 (default: by --quick)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed rounds (default 5; 3 with --quick)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of each method (cold compile "
                   "in the warm-up, ~20 s per method and shape)")
    p.add_argument("--torch-optim-ns", choices=("auto", "on", "off"), default="auto",
                   help="time torch.optim.Muon's bf16 NS; auto: with --quick or where bf16 GEMM is native")
    p.add_argument("--jax", choices=("auto", "on", "off"), default="auto",
                   help="time jax.jit and optax too (auto: where JAX's backend is the torch device's kind)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip the §7 metrics")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the torch implementations run (JAX runs on its default backend)")
    p.add_argument("--out", type=Path, default=Path("reports/orthogonalize"), help="results folder")
    return p


def measure(args) -> Suite:
    args.device = resolve_device(args.device)
    args.repeats = args.repeats or (3 if args.quick else 5)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.dtypes = dtypes = args.dtypes or (["bfloat16", "float32"] if args.device == "cuda" else ["float32"])
    args.torch_optim_ns = args.torch_optim_ns == "on" or (
        args.torch_optim_ns == "auto" and (args.quick or outside.bf16_gemm_native(args.device)))
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPU
    args.jax, jax_note = jax_on(args.jax, args.device)
    nanochat, why = outside.load_nanochat()
    print(f"nanochat: {why}", flush=True)
    speed, quality = [], []
    for dtype in dtypes:
        if nanochat is not None:
            outside.nanochat_mode(nanochat, "eager", DTYPES[dtype][0])
        for shape in shapes:
            s, q = run_shape(shape, dtype, args.methods, args, nanochat)
            speed += s
            quality += q
    notes = (f"torch on {args.device}, {jax_note}. Median of {args.repeats} interleaved timed "
             "rounds after one untimed warm-up call each (jit compile excluded). Steps: registry.default_steps. "
             "Inputs fp32; dtype = compute dtype (optax computes in its input dtype, so it gets a bf16 input "
             "for bf16). torch.optim.Muon's NS always computes in bf16 whatever the dtype column says. "
             "nanochat: " + (f"{why}; its fused step run eagerly (the function torch.compile wraps), timed "
                             "with its momentum, MuonEq, Muon+, NorMuon and update, its FLOPs counted as "
                             "Polar Express's only; its quality is of Muon+(PE(MuonEq(G))) (NorMuon held "
                             "neutral), not of PE alone." if nanochat is not None else f"skipped ({why}).") +
             " GFLOP/s from flops() (matmul FLOPs only); % matmul = that rate over the faster plain small-Gram "
             "rate (torch or jax.jit) at the same shape and dtype (NS's other GEMMs, A·A and B·X, can run faster "
             "than it). Quality on non-tall unstacked shapes only (f(Xᵀ) = f(X)ᵀ).")
    tables = [pivot(speed),
              Table("speed", "Per call, every implementation (median, min, max)", SPEED_COLUMNS, speed,
                    key=("shape", "dtype", "method", "implementation"), metric="ms", spread=("min_ms", "max_ms"))]
    if quality:
        tables.append(Table("quality", "Quality (.specs/orthogonalizers.md §7, fp64)", QUALITY_COLUMNS, quality,
                            key=("input", "shape", "dtype", "method", "implementation"), metric="polar_error"))
    config = dict(device=args.device, jax=args.jax, repeats=args.repeats, compile=args.compile,
                  torch_optim_ns=args.torch_optim_ns, nanochat=nanochat is not None)
    return Suite("orthogonalize", tables, notes, figures(speed), config=config)


def main(argv=None) -> int:
    return cli_main(parser(), measure, argv, title="Orthogonalizers: time per call and quality")


if __name__ == "__main__":
    sys.exit(main())
