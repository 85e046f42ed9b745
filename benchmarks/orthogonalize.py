"""Orthogonalizer benchmark: every registered method (.specs/orthogonalizers.md §1), speed and quality.

Speed — wall time per call on a Gaussian input of each GPT matrix shape (d12: 768×768, 3072×768,
768×3072; d20: 1280×1280, 5120×1280, 1280×5120; stacks 4×768×768 and 6×768×3072), of
  - torch_impl eager: muon.ORTHOGONALIZERS[name](X, steps=default_steps(name), eps=1e-7,
    compute_dtype=dtype), fp32 input (and torch.compile of it with --compile);
  - jax.jit of jax_reference.muon.ORTHOGONALIZERS[name], the same arguments;
  - optax's Newton-Schulz (NS5, the Polar Express table, AOL) under jax.jit; torch.optim.Muon's NS
    (bf16 inside); nanochat's fused Muon step run eagerly (its Polar Express *plus* momentum, MuonEq,
    Muon+, NorMuon and the update), when NANOCHAT_OPTIM is set (benchmarks/outside.py);
  - the plain matmul X·Xᵀ on the wide orientation (XᵀX for a tall X: the small s × s Gram product,
    NS's commonest GEMM) in torch and jax.jit: the machine's matmul rate at that shape.
All implementations of one shape and dtype are timed interleaved (report.interleaved_times: one
untimed warm-up call each, which includes jit/compile, then `repeats` rounds of one call each);
median, min and max are reported. GFLOP/s counts each method's matmul FLOPs (flops(); elementwise
work is not counted), and "% matmul" divides by the faster plain-matmul rate at that shape.

Quality — the §7 metrics (jax_reference.quality, fp64) of every output, on a Gaussian input and on
an ill-conditioned U·diag(logspace(0, −6))·Vᵀ, for the non-tall unstacked shapes (f(Xᵀ) = f(X)ᵀ).

    python -m benchmarks.orthogonalize --quick              # small shapes, ~1 min on 2 cores
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

import jax_reference.muon as JM
import torch_impl.muon as TM
from benchmarks import outside
from benchmarks.report import interleaved_times, write_report
from jax_reference.quality import METRICS, quality_metrics
from torch_impl.gram_newton_schulz import RESTART_AFTER

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
FULL_SHAPES = ((768, 768), (3072, 768), (768, 3072), (1280, 1280), (5120, 1280), (1280, 5120),
               (4, 768, 768), (6, 768, 3072))
QUICK_SHAPES = ((128, 128), (512, 128), (128, 512), (4, 128, 512))
EPS = 1e-7
MATMUL = "plain matmul (small Gram)"


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
    impls = {(MATMUL, "torch"): (1, lambda G: gram(G, lambda x: x.mT), "torch", True),
             (MATMUL, "jax.jit"): (1, jax.jit(lambda G: gram(G, lambda x: jnp.swapaxes(x, -1, -2))), "jax", True)}
    for name in methods:
        steps = TM.default_steps(name)
        t_fn = functools.partial(TM.ORTHOGONALIZERS[name], steps=steps, eps=EPS, compute_dtype=tdt)
        impls[(name, "torch eager")] = (steps, t_fn, "torch", False)
        if args.compile:
            impls[(name, "torch.compile")] = (steps, torch.compile(t_fn, fullgraph=True, dynamic=False), "torch", False)
        impls[(name, "jax.jit")] = (steps, jax.jit(functools.partial(
            JM.ORTHOGONALIZERS[name], steps=steps, eps=EPS, compute_dtype=jdt)), "jax", False)
    for name, (label, steps, fn) in outside.optax_orthogonalizers().items():
        if name in methods:
            impls[(name, label)] = (steps, fn, "jax", True)  # optax computes in its input's dtype
    if args.torch_optim_ns and "newton_schulz" in methods:
        impls[("newton_schulz", "torch.optim.Muon NS (bf16 inside)")] = (5, outside.torch_optim_ns, "torch", False)
    if nanochat is not None and "polar_express" in methods:
        impls[("polar_express", "nanochat fused step (eager)")] = (5, None, "torch", False)
    return impls


def as_numpy(x) -> np.ndarray:
    return (x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)).astype(np.float64)


def run_shape(shape, dtype: str, methods, args, nanochat) -> tuple[list[dict], list[dict]]:
    impls = implementations(methods, dtype, args, nanochat)
    tdt, jdt = DTYPES[dtype]
    data = inputs(shape)

    def arg(X: np.ndarray, framework: str, cast: bool):
        if framework == "torch":
            return torch.from_numpy(X).to(tdt) if cast else torch.from_numpy(X)
        return jnp.asarray(X, jdt if cast else jnp.float32)

    def call(fn, X: np.ndarray, framework: str, cast: bool):
        if fn is None:  # nanochat: a fused-step closure over its own copy of the input
            return outside.nanochat_fused_step(nanochat, torch.from_numpy(X))
        x = arg(X, framework, cast)
        return lambda: jax.block_until_ready(fn(x))

    fns = {key: call(fn, data["gaussian"], fw, cast) for key, (_, fn, fw, cast) in impls.items()}
    stats = interleaved_times(fns, args.repeats)
    peak = max(flops(MATMUL, shape, 1) / stats[(MATMUL, impl)]["median_s"] for impl in ("torch", "jax.jit"))
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
                O = (outside.nanochat_orthogonalize(nanochat, torch.from_numpy(X)) if fn is None
                     else fn(arg(X, fw, cast)))
                q = quality_metrics(as_numpy(O), X.astype(np.float64))
                quality.append(dict(input=kind, shape="x".join(map(str, shape)), dtype=dtype, method=method,
                                    implementation=impl, **{k: float(q[k]) for k in METRICS}))
                print(f"{quality[-1]['shape']:>11} {dtype:>8} {kind:>8} {method:>18} {impl:>34} polar error "
                      f"{quality[-1]['polar_error']:.2e}  σ [{quality[-1]['sigma_min']:.3f}, "
                      f"{quality[-1]['sigma_max']:.3f}]", flush=True)
    return speed, quality


def summary(speed: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """One row per (method, implementation, dtype), one column of median ms per shape."""
    shapes = list(dict.fromkeys(r["shape"] for r in speed))
    rows: dict[tuple, dict] = {}
    for r in speed:
        row = rows.setdefault((r["dtype"], r["method"], r["implementation"]),
                              dict(dtype=r["dtype"], method=r["method"], implementation=r["implementation"],
                                   steps=r["steps"]))
        row[r["shape"]] = r["ms"] if r["method"] != MATMUL else f"{r['gflops']:.0f} GFLOP/s"
    columns = [("dtype", "dtype"), ("method", "method"), ("implementation", "implementation"), ("steps", "steps")]
    return list(rows.values()), columns + [(s, f"{s} ms") for s in shapes]


SPEED_COLUMNS = [("shape", "shape"), ("dtype", "dtype"), ("method", "method"), ("implementation", "implementation"),
                 ("steps", "steps"), ("ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
                 ("gflops", "GFLOP/s"), ("pct_matmul", "% matmul"), ("vs_torch_ns5", "time / torch NS5")]
QUALITY_COLUMNS = [("input", "input"), ("shape", "shape"), ("dtype", "dtype"), ("method", "method"),
                   ("implementation", "implementation")] + [(m, m) for m in METRICS]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (128/512), 3 repeats")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES), help="compute dtypes")
    p.add_argument("--methods", nargs="+", default=list(TM.ORTHOGONALIZERS), choices=list(TM.ORTHOGONALIZERS))
    p.add_argument("--shapes", nargs="+", default=None, help="e.g. 768x3072 6x768x3072 (default: by --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 3 with --quick)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of each method (cold compile "
                   "in the warm-up, ~20 s per method and shape)")
    p.add_argument("--torch-optim-ns", choices=("auto", "on", "off"), default="auto",
                   help="time torch.optim.Muon's bf16 NS; auto: with --quick or where bf16 GEMM is native")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip the §7 metrics")
    p.add_argument("--out", type=Path, default=Path("reports"), help="output directory")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.repeats < 1:
        p.error("--repeats must be ≥ 1")
    try:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes] if args.shapes else (
            QUICK_SHAPES if args.quick else FULL_SHAPES)
    except ValueError:
        p.error("--shapes: give shapes as ROWSxCOLS or BATCHxROWSxCOLS")
    if any(len(s) not in (2, 3) or min(s) < 1 for s in shapes):
        p.error("--shapes: give shapes as ROWSxCOLS or BATCHxROWSxCOLS")
    args.torch_optim_ns = args.torch_optim_ns == "on" or (
        args.torch_optim_ns == "auto" and (args.quick or outside.bf16_gemm_native()))
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPU
    nanochat, why = outside.load_nanochat()
    print(f"nanochat: {why}", flush=True)
    speed, quality = [], []
    for dtype in args.dtypes:
        if nanochat is not None:
            outside.nanochat_mode(nanochat, "eager", DTYPES[dtype][0])
        for shape in shapes:
            s, q = run_shape(shape, dtype, args.methods, args, nanochat)
            speed += s
            quality += q
    rows, columns = summary(speed)
    notes = (f"Median of {args.repeats} interleaved timed rounds after one untimed warm-up call each "
             f"(jit compile excluded); torch threads {torch.get_num_threads()}. Steps: muon.default_steps. "
             "Inputs fp32; dtype = compute dtype (optax computes in its input dtype, so it gets a bf16 input "
             "for bf16). torch.optim.Muon's NS always computes in bf16 whatever the dtype column says. "
             "nanochat: " + (f"{why}; its fused step run eagerly (the function torch.compile wraps), timed "
                             "with its momentum, MuonEq, Muon+, NorMuon and update, its FLOPs counted as "
                             "Polar Express's only; its quality is of Muon+(PE(MuonEq(G))) (NorMuon held "
                             "neutral), not of PE alone." if nanochat is not None else f"skipped ({why}).") +
             " GFLOP/s from flops() (matmul FLOPs only); % matmul = that rate over the faster plain small-Gram "
             "rate (torch or jax.jit) at the same shape and dtype (NS's other GEMMs, A·A and B·X, can run faster "
             "than it). Quality on non-tall unstacked shapes only (f(Xᵀ) = f(X)ᵀ).")
    tables = [("Per call, every implementation (median, min, max)", speed, SPEED_COLUMNS)]
    if quality:
        tables.append(("Quality (.specs/orthogonalizers.md §7, fp64)", quality, QUALITY_COLUMNS))
    paths = write_report(args.out, "orthogonalize", "Orthogonalizers: time per call (median ms) and quality",
                         rows, columns, notes, tables=tables)
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
