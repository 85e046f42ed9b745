"""Optimizer step time on a nanochat GPT's parameters: ours vs torch.optim and optax, per family.

Parameter sets (nanochat sizing, width 64·depth, vocab 32768, untied embedding and lm_head):
d12 (768 wide, 12 layers) and d20 (1280 wide, 20 layers); --quick uses depth 2, width 128,
vocab 4096. The parameter shapes and their split come from the model itself (torch_impl.models.gpt on
the meta device, optim.label_param). Families, each timed interleaved (report.interleaved_times):

- Muon (the block matrices): ours (torch_impl.optim.Muon, stacked, batched NS) vs "torch.optim" =
  torch.optim.Muon (a per-parameter loop) vs optax.contrib.muon and jax_reference.optim.muon (jit);
- AdamW (embedding, lm_head, scalars): ours vs "torch.optim" = torch.optim.AdamW(foreach=True) and
  "torch.optim, AdamW fused" = torch.optim.AdamW(fused=True) vs optax.adamw and jax_reference.optim.adamw (jit);
- hybrid (all of them, nanochat's split and lrs): ours (optim.hybrid) vs torch.optim.Muon +
  torch.optim.AdamW (foreach; fused) vs jax_reference.optim.hybrid.hybrid (jit).

Gradients are fixed Gaussians; lrs as nanochat's; no weight decay. Muon's NS runs in bf16 where
bf16 GEMM is native (CUDA, AVX512-BF16/AMX CPUs) — torch.optim.Muon always does — else in fp32
for ours, optax and the JAX reference (torch.optim.Muon is then skipped: emulated bf16 GEMM is
10–40× slower and says nothing about the step). Every step blocks until done.

    python -m benchmarks.optimizer_step --quick      # depth 2, width 128 (seconds)
    python -m benchmarks.optimizer_step              # d12 on CPU, d12 and d20 on CUDA
    python -m benchmarks.optimizer_step --sets d12 d20
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

import jax_reference.optim.adamw as JA
import jax_reference.optim.hybrid as JO
import jax_reference.optim.muon as JM
from benchmarks import outside
from benchmarks.harness import block, interleaved_times, jax_on, positive_int, resolve_device
from benchmarks.results import Suite, Table, cli_main, pyplot
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.optim import AdamW, Muon, hybrid
from torch_impl.optim.hybrid import label_param

SETS = {"d12": (12, 768, 32768), "d20": (20, 1280, 32768), "quick": (2, 128, 4096)}  # depth, width, vocab
FAMILIES = ("Muon", "AdamW", "hybrid")
IMPLS = ("ours (torch_impl)", "torch.optim", "torch.optim, AdamW fused", "optax (jit)", "jax_reference (jit)")
MATRIX_LR, ADAM_LR = 0.02, 0.004


def matrix_shapes(depth: int, width: int) -> list[tuple[int, int]]:
    """The 6 block matrices of each layer (q, k, v, proj: width²; c_fc 4w×w; c_proj w×4w), torch layout."""
    per_layer = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return per_layer * depth


def torch_params(shapes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return ps


def gpt_shapes(depth: int, width: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the nanochat GPT at this size (meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=2048, vocab_size=vocab, n_layer=depth, n_head=max(1, width // 128),
                              n_kv_head=max(1, width // 128), n_embd=width))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def torch_step(opt_factory, named_shapes, device):
    """A zero-argument step of the optimizer opt_factory(named params) builds, fixed gradients."""
    params = torch_params(list(named_shapes.values()), device=device)
    opts = opt_factory(list(zip(named_shapes, params)))
    opts = opts if isinstance(opts, tuple) else (opts,)

    def step():
        for opt in opts:
            opt.step()
        block(None)
    return step


def jax_step(tx, named_shapes):
    """A zero-argument jitted optax step on fixed params, gradients and state (the step's cost only).
    tx: the transformation, or a function of the params that builds it."""
    rng = np.random.default_rng(0)
    params = {n: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02) for n, s in named_shapes.items()}
    grads = {n: jnp.asarray(rng.standard_normal(s).astype(np.float32)) for n, s in named_shapes.items()}
    tx = tx if isinstance(tx, optax.GradientTransformation) else tx(params)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))
    return lambda: block(step(grads, state, params))


def implementations(family: str, shapes: dict, width: int, ns_dtype: str, torch_optim: bool, device: str,
                    with_jax: bool) -> dict:
    """{implementation label: zero-argument step} of one family on its parameters `shapes`."""
    tdt, jdt = getattr(torch, ns_dtype), getattr(jnp, ns_dtype)
    muon_names = [n for n, s in shapes.items() if label_param(n, s) == "muon"]
    adam_names = [n for n in shapes if n not in muon_names]
    split = lambda named: ([p for n, p in named if n in muon_names], [p for n, p in named if n in adam_names])
    from optax.contrib import MuonDimensionNumbers
    out = {}
    if family == "Muon":
        out[IMPLS[0]] = torch_step(lambda named: Muon([p for _, p in named], lr=MATRIX_LR, ns_dtype=tdt),
                                   shapes, device)
        if torch_optim:
            out[IMPLS[1]] = torch_step(lambda named: torch.optim.Muon([p for _, p in named], lr=MATRIX_LR,
                                                                      weight_decay=0.0), shapes, device)
        if with_jax:
            out[IMPLS[3]] = jax_step(optax.contrib.muon(
                MATRIX_LR, muon_weight_dimension_numbers=MuonDimensionNumbers(1, 0)), shapes)
            out[IMPLS[4]] = jax_step(JM.muon(MATRIX_LR, ns_dtype=jdt, nonfinite="skip"), shapes)
    elif family == "AdamW":
        kw = dict(lr=ADAM_LR, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
        out[IMPLS[0]] = torch_step(lambda named: AdamW([p for _, p in named], **kw), shapes, device)
        out[IMPLS[1]] = torch_step(lambda named: torch.optim.AdamW([p for _, p in named], foreach=True, **kw),
                                   shapes, device)
        out[IMPLS[2]] = torch_step(lambda named: torch.optim.AdamW([p for _, p in named], fused=True, **kw),
                                   shapes, device)
        if with_jax:
            out[IMPLS[3]] = jax_step(optax.adamw(ADAM_LR, 0.8, 0.95, 1e-10, weight_decay=0.0), shapes)
            out[IMPLS[4]] = jax_step(JA.adamw(ADAM_LR, 0.8, 0.95, 1e-10, nonfinite="skip"), shapes)
    else:
        kw = dict(lr=ADAM_LR, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
        out[IMPLS[0]] = torch_step(lambda named: hybrid(named, model_dim=width, ns_dtype=tdt), shapes, device)
        for label, fuse in ((IMPLS[1], "foreach"), (IMPLS[2], "fused")):
            if torch_optim:
                out[label] = torch_step(lambda named, f=fuse: (
                    torch.optim.Muon(split(named)[0], lr=MATRIX_LR, weight_decay=0.0),
                    torch.optim.AdamW(split(named)[1], **{f: True}, **kw)), shapes, device)
        if with_jax:
            out[IMPLS[4]] = jax_step(lambda params: JO.hybrid(params, model_dim=width, ns_dtype=jdt,
                                                              nonfinite="skip"), shapes)
    return out


def figure(rows: list[dict]):
    """Grouped bars: median ms per step of each implementation, per parameter set and family."""
    plt = pyplot()

    groups = list(dict.fromkeys((r["set"], r["family"]) for r in rows))
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(groups)), 4), constrained_layout=True)
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        pts = {(r["set"], r["family"]): r for r in rows if r["implementation"] == impl}
        xs = [i for i, g in enumerate(groups) if g in pts]
        ax.bar([x + k * width for x in xs], [pts[groups[x]]["ms"] for x in xs], width, label=impl,
               yerr=[[pts[groups[x]]["ms"] - pts[groups[x]]["min_ms"] for x in xs],
                     [pts[groups[x]]["max_ms"] - pts[groups[x]]["ms"] for x in xs]], capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{s}\n{f}" for s, f in groups])
    ax.set_yscale("log")
    ax.set_ylabel("median ms per step (bars: min–max)")
    ax.set_title("Optimizer step time by family and parameter set")
    ax.legend(fontsize=7)
    return fig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.optimizer_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth 2, width 128, vocab 4096; 3 repeats")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=None,
                   help="parameter sets (default d12 on CPU, d12 d20 on CUDA; quick with --quick)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--ns-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="Muon's NS compute dtype for ours / optax-side references (auto: bf16 where native)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed rounds (default 5; 3 with --quick)")
    p.add_argument("--jax", choices=("auto", "on", "off"), default="auto",
                   help="time optax and jax_reference too (auto: where JAX's backend is the torch device's kind)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the torch steps run")
    p.add_argument("--out", type=Path, default=Path("reports/optimizer_step"), help="results folder")
    return p


def measure(args) -> Suite:
    device = resolve_device(args.device)
    sets = args.sets or (["quick"] if args.quick else ["d12", "d20"] if device == "cuda" else ["d12"])
    repeats = args.repeats or (3 if args.quick else 5)
    native = outside.bf16_gemm_native(device)
    ns_dtype = args.ns_dtype if args.ns_dtype != "auto" else "bfloat16" if native else "float32"
    jax.config.update("jax_default_matmul_precision", "highest")
    with_jax, jax_note = jax_on(args.jax, device)
    rows = []
    for name in sets:
        depth, width, vocab = SETS[name]
        named = gpt_shapes(depth, width, vocab)
        for family in args.families:
            shapes = {n: s for n, s in named.items()
                      if family == "hybrid" or (label_param(n, s) == "muon") == (family == "Muon")}
            stats = interleaved_times(implementations(family, shapes, width, ns_dtype, native, device, with_jax),
                                   repeats)
            ours = stats[IMPLS[0]]["median_s"]
            for impl, st in stats.items():
                rows.append(dict(set=name, family=family, implementation=impl, params=sum(np.prod(s) for s in
                                 shapes.values()).item(), ms=st["median_s"] * 1e3, min_ms=st["min_s"] * 1e3,
                                 max_ms=st["max_s"] * 1e3, vs_ours=st["median_s"] / ours))
                print(f"{name:5} {family:6} {impl:22} {rows[-1]['ms']:10.1f} ms  ×{rows[-1]['vs_ours']:.2f} of ours",
                      flush=True)
    side = {}
    for r in rows:
        side.setdefault((r["set"], r["family"]), dict(set=r["set"], family=r["family"], params=r["params"]))[
            r["implementation"]] = r["ms"]
    impls = [i for i in IMPLS if any(i in row for row in side.values())]
    tables = [Table("time", "Median ms per step, implementations side by side (fastest in bold)",
                    [("set", "set"), ("family", "family"), ("params", "params")] + [(i, f"{i} ms") for i in impls],
                    list(side.values()), key=("set", "family"), best=tuple(impls)),
              Table("steps", "Every implementation (median, min, max)",
                    [("set", "set"), ("family", "family"), ("implementation", "implementation"),
                     ("ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"), ("vs_ours", "time ÷ ours")],
                    rows, key=("set", "family", "implementation"), metric="ms", spread=("min_ms", "max_ms"))]
    torch_optim = ("included" if native else "skipped: bf16 GEMM is emulated on this CPU, and torch.optim.Muon "
                   "always orthogonalizes in bf16")
    notes = (f"torch on {device}, {jax_note}; Muon NS dtype {ns_dtype} (ours, jax_reference; "
             f"optax.contrib.muon computes in its fp32 input dtype). torch.optim.Muon: {torch_optim}. Median of "
             f"{repeats} interleaved rounds after one untimed warm-up step each (jit compile excluded); torch threads "
             f"{torch.get_num_threads()}. Sets (depth, width, vocab): "
             + ", ".join(f"{s} {SETS[s]}" for s in sets) + ".")
    config = dict(device=device, ns_dtype=ns_dtype, repeats=repeats, jax=with_jax, torch_optim=native)
    return Suite("optimizer", tables, notes, {"time": figure(rows)}, config=config)


def main(argv=None) -> int:
    return cli_main(parser(), measure, argv, title="Optimizer step time: ours vs torch.optim and optax")


if __name__ == "__main__":
    sys.exit(main())
