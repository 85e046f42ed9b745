"""Orthogonalizer report: torch eager vs jax.jit vs the fp64 oracle, accuracy and speed.

For each shape, dtype and schedule: relative Frobenius error of each framework against the
fp64 polynomial oracle (computed on the dtype-rounded input), torch vs JAX, the range of
the output's singular values, and the median time per call — next to the plain matmul
rate of the same machine, so a slow NS can be told apart from a slow BLAS.

    python -m benchmarks.orthogonalize                 # GPT-sized shapes (slow in bf16 on AVX2 CPUs)
    python -m benchmarks.orthogonalize --quick         # small shapes, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

import jax_reference.orthogonalize as J
import torch_impl.orthogonalize as T
from benchmarks.report import median_time, write_report

SCHEDULES = {"newton_schulz": (T.NS5_COEFFS, 1.0),
             "polar_express": (T.POLAR_EXPRESS_COEFFS, T.POLAR_EXPRESS_NORM_SCALE)}
DTYPES = {"float32": (torch.float32, jnp.float32, np.float32),
          "bfloat16": (torch.bfloat16, jnp.bfloat16, ml_dtypes.bfloat16)}
FULL_SHAPES = ((768, 768), (768, 3072), (3072, 768))
QUICK_SHAPES = ((128, 128), (128, 512), (512, 128))


def ns_flops(m: int, n: int, steps: int) -> float:
    """Matmul FLOPs of `steps` NS iterations on the wide orientation (k = min, l = max):
    X Xᵀ (2k²l), A·A (2k³), B·X (2k²l) per step."""
    k, l = min(m, n), max(m, n)
    return steps * (4 * k * k * l + 2 * k**3)


def matmul_rate(n: int, tdt: torch.dtype, jdt, repeats: int) -> tuple[float, float]:
    """GFLOP/s of an n×n×n matmul for torch and jax on this machine."""
    a = torch.randn(n, n).to(tdt)
    ja = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jdt)
    f = jax.jit(lambda x: x @ x)
    t_torch = median_time(lambda: a @ a, repeats)
    t_jax = median_time(lambda: f(ja).block_until_ready(), repeats)
    return 2 * n**3 / t_torch / 1e9, 2 * n**3 / t_jax / 1e9


def measure(shape, dtype_name: str, schedule: str, repeats: int, seed: int = 0) -> dict:
    tdt, jdt, npdt = DTYPES[dtype_name]
    coeffs, norm_scale = SCHEDULES[schedule]
    m, n = shape
    G = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    G = G.astype(npdt).astype(np.float32)  # oracle sees exactly what both frameworks see
    ref = T.polynomial_oracle(torch.from_numpy(G.copy()), coeffs, 5, norm_scale=norm_scale).numpy()
    tG = torch.from_numpy(G.copy()).to(tdt)
    jG = jnp.asarray(G).astype(jdt)
    t_fn = lambda: T.newton_schulz(tG, 5, coeffs, compute_dtype=tdt, norm_scale=norm_scale)
    j_fn = jax.jit(lambda x: J.newton_schulz(x, 5, coeffs, compute_dtype=jdt, norm_scale=norm_scale))
    t_out = t_fn().float().numpy().astype(np.float64)
    j_out = np.asarray(j_fn(jG).astype(jnp.float32)).astype(np.float64)
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    sv = np.linalg.svd(t_out, compute_uv=False)
    t_time = median_time(t_fn, repeats)
    j_time = median_time(lambda: j_fn(jG).block_until_ready(), repeats)
    flops = ns_flops(m, n, 5)
    return dict(shape=f"{m}x{n}", dtype=dtype_name, schedule=schedule,
                torch_vs_oracle=rel(t_out, ref), jax_vs_oracle=rel(j_out, ref),
                torch_vs_jax=rel(t_out, j_out), sigma_min=float(sv.min()), sigma_max=float(sv.max()),
                torch_ms=t_time * 1e3, jax_ms=j_time * 1e3,
                torch_gflops=flops / t_time / 1e9, jax_gflops=flops / j_time / 1e9)


COLUMNS = [("shape", "shape"), ("dtype", "dtype"), ("schedule", "schedule"),
           ("torch_vs_oracle", "torch vs oracle"), ("jax_vs_oracle", "jax vs oracle"),
           ("torch_vs_jax", "torch vs jax"), ("sigma_min", "σ min"), ("sigma_max", "σ max"),
           ("torch_ms", "torch ms"), ("jax_ms", "jax.jit ms"),
           ("torch_gflops", "torch GFLOP/s"), ("jax_gflops", "jax GFLOP/s")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (128/512) instead of GPT-sized")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="output directory")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be ≥ 1")
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPU
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rows = []
    for dtype in args.dtypes:
        for shape in shapes:
            for schedule in args.schedules:
                row = measure(shape, dtype, schedule, args.repeats)
                rows.append(row)
                print(f"{row['shape']:>9} {dtype:>8} {schedule:>13}  err torch {row['torch_vs_oracle']:.2e} "
                      f"jax {row['jax_vs_oracle']:.2e}  t-j {row['torch_vs_jax']:.2e}  "
                      f"σ [{row['sigma_min']:.3f}, {row['sigma_max']:.3f}]  "
                      f"torch {row['torch_ms']:.1f} ms  jax {row['jax_ms']:.1f} ms", flush=True)
    n = max(max(s) for s in shapes)
    rates = {d: matmul_rate(n if d == "float32" else n // 2, *DTYPES[d][:2], args.repeats) for d in args.dtypes}
    notes = "Plain matmul rate on this machine (torch / jax GFLOP/s): " + ", ".join(
        f"{d}: {r[0]:.0f} / {r[1]:.0f}" for d, r in rates.items())
    paths = write_report(args.out, "orthogonalize", "Orthogonalizers: accuracy and speed",
                         rows, COLUMNS, notes)
    print(notes)
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
