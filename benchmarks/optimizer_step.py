"""Optimizer step time for the matrix parameters of a nanochat GPT (default d12: 768 wide,
12 layers): our Muon (stacked, batched NS) vs torch.optim.Muon (per-parameter loop) vs
optax.contrib.muon and jax_reference.muon under jax.jit; our AdamW vs torch.optim.AdamW
(foreach, fused) on the embedding-sized AdamW parameters. Reports medians and ratios.

torch.optim.Muon always runs NS in bf16, so the Muon comparison uses bf16 NS for ours too;
on CPUs without AVX512-BF16 that is slow for everyone (use --ns-dtype float32 to see ours).

    python -m benchmarks.optimizer_step --quick      # depth 2, width 256
    python -m benchmarks.optimizer_step              # d12
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jax_reference.muon as JM
from benchmarks.report import median_time, write_report
from torch_impl.optim import AdamW, Muon


def matrix_shapes(depth: int, width: int) -> list[tuple[int, int]]:
    per_layer = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return per_layer * depth


def torch_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


def time_torch(opt_factory, shapes, repeats):
    params = torch_params(shapes)
    opt = opt_factory(params)
    return median_time(opt.step, repeats)


def time_optax(tx, shapes, repeats):
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02) for s in shapes]
    grads = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))
    return median_time(lambda: jax.block_until_ready(step(grads, state, params)), repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth 2, width 256")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--ns-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    depth, width = (2, 256) if args.quick else (args.depth, args.width)
    if depth < 1 or width < 8 or args.repeats < 1:
        p.error("need depth ≥ 1, width ≥ 8, repeats ≥ 1")
    tdt = getattr(torch, args.ns_dtype)
    jdt = getattr(jnp, args.ns_dtype)
    shapes = matrix_shapes(depth, width)
    from optax.contrib import MuonDimensionNumbers
    rows = []
    ours = time_torch(lambda ps: Muon(ps, lr=0.02, ns_dtype=tdt), shapes, args.repeats)
    cases = [
        ("Muon", "torch_impl Muon (stacked)", ours),
        ("Muon", "torch.optim.Muon", time_torch(lambda ps: torch.optim.Muon(ps, lr=0.02), shapes, args.repeats)),
        ("Muon", "jax_reference.muon (jit)",
         time_optax(JM.muon(0.02, ns_dtype=jdt, nonfinite="skip"), shapes, args.repeats)),
        ("Muon", "optax.contrib.muon (jit)", time_optax(optax.contrib.muon(
            0.02, muon_weight_dimension_numbers=MuonDimensionNumbers(1, 0)), shapes, args.repeats)),
    ]
    vocab = 8 * width  # embedding + lm_head sized AdamW parameters
    adam_shapes = [(vocab, width), (vocab, width)] + [(width,)] * (2 * depth)
    ours_adam = time_torch(lambda ps: AdamW(ps, lr=1e-3), adam_shapes, args.repeats)
    cases += [
        ("AdamW", "torch_impl AdamW", ours_adam),
        ("AdamW", "torch.optim.AdamW foreach",
         time_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), adam_shapes, args.repeats)),
        ("AdamW", "torch.optim.AdamW fused",
         time_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), adam_shapes, args.repeats)),
    ]
    for family, name, t in cases:
        base = ours if family == "Muon" else ours_adam
        rows.append(dict(family=family, implementation=name, ms=t * 1e3, vs_ours=t / base))
        print(f"{family:6} {name:32} {t * 1e3:10.1f} ms  ×{t / base:.2f} of ours", flush=True)
    notes = (f"Parameter set: depth {depth}, width {width}: {len(shapes)} Muon matrices, "
             f"{len(adam_shapes)} AdamW tensors; NS dtype {args.ns_dtype}. "
             "`vs ours` > 1 means slower than ours.")
    paths = write_report(args.out, "optimizer_step", "Optimizer step time", rows,
                         [("family", "family"), ("implementation", "implementation"),
                          ("ms", "ms / step"), ("vs_ours", "time vs ours")], notes)
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
