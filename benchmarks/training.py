"""Training step throughput: tokens/s and MFU of the GPT, torch vs a jitted JAX step of the reference,
and the share of the torch step spent orthogonalizing.

For each depth (nanochat sizing: width 64·depth, head_dim 64, byte vocab 257 as torch_impl.train),
one process, fixed random tokens, the nanochat hybrid optimizer (Muon + AdamW, NS5) on both sides.
Timed interleaved (report.interleaved_times), each call blocking until done:

- torch fwd+bwd:       loss = model(x, y); loss.backward()     (bf16 autocast on CUDA, as the CLI)
- torch optimizer:     hybrid.step() on those gradients
- torch orthogonalize: Muon's orthogonalizer alone on stacks of the block-matrix gradients, one
                       stack per shape as Muon batches them (its momentum and update not included)
- jax train step:      jax.jit(value_and_grad(jax_reference.models.gpt.loss) + jax_reference.optim.hybrid.hybrid
                       update + apply)

torch step = fwd+bwd + optimizer; tokens/s = batch·seq_len / step; MFU = FLOPs per token
(GPT.estimate_flops: 6·non-embedding params + attention) × tokens/s / peak. The peak on CUDA is the
dense bf16 datasheet figure (torch_impl.training.device: 989 TFLOP/s for H100/H200 SXM); on CPU it is the
faster of torch's and XLA's measured fp32 1024³ matmul rate on all threads (best of 20), the same
denominator for both frameworks. "orth share" = torch orthogonalize / torch step.

    python -m benchmarks.training --quick    # depth 2, seq 128 (seconds)
    python -m benchmarks.training            # depths 4, 8 on CPU; 12, 20 on CUDA (seq 1024)
    python -m benchmarks.training --depths 12 --compile --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import block, interleaved_times, jax_on, positive_int, resolve_device
from benchmarks.results import Suite, Table, cli_main, pyplot
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.optim import hybrid
from torch_impl.optim.hybrid import label_param
from torch_impl.orthogonalizers.registry import NS_EPS, ORTHOGONALIZERS, default_steps
from torch_impl.training.device import autocast, peak_flops

VOCAB = 257  # torch_impl.train's byte tokenizer
ORTHOGONALIZER = "newton_schulz"


def config(depth: int, seq_len: int) -> dict:
    return dict(sequence_len=seq_len, vocab_size=VOCAB, n_layer=depth, n_head=depth, n_kv_head=depth,
                n_embd=64 * depth)


def cpu_matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 n³ matmul FLOP/s of torch and of XLA on all threads here: the CPU 'peak' for MFU. The
    fastest call, not the median: on shared cores the median measures the other jobs too."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = []
    fns = [lambda: a @ b]
    try:
        import jax
        import jax.numpy as jnp
        ja, jb = jnp.asarray(a.numpy()), jnp.asarray(b.numpy())
        mm = jax.jit(jnp.matmul)
        fns.append(lambda: mm(ja, jb).block_until_ready())
    except ImportError:
        pass
    for fn in fns:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        rates.append(2 * n**3 / best)
    return max(rates)


def torch_fns(depth: int, seq_len: int, batch: int, device: str, compile_model: bool, ns_dtype) -> tuple[dict, GPT]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config(depth, seq_len))).to(device)
    model.init_weights()
    opt = hybrid(model.named_parameters(), model_dim=model.config.n_embd, ns_dtype=ns_dtype,
                 orthogonalizer=ORTHOGONALIZER)
    fwd = torch.compile(model) if compile_model else model
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (batch, seq_len), generator=g).to(device)
    y = torch.randint(0, VOCAB, (batch, seq_len), generator=g).to(device)
    dev = torch.device(device)

    def fwd_bwd():
        with autocast(dev):
            loss = fwd(x, y)
        loss.backward()
        block(None)
    fwd_bwd()  # gradients exist before the optimizer and the orthogonalizer are timed
    stacks = {}
    for name, p in model.named_parameters():
        if label_param(name, p.shape) == "muon":
            stacks.setdefault(tuple(p.shape), []).append(p.grad)
    stacks = [torch.stack(gs) for gs in stacks.values()]
    orth, steps = ORTHOGONALIZERS[ORTHOGONALIZER], default_steps(ORTHOGONALIZER)

    def orthogonalize():
        for s in stacks:
            orth(s, steps=steps, eps=NS_EPS, compute_dtype=ns_dtype)
        block(None)

    def opt_step():
        opt.step()
        block(None)
    return {"torch fwd+bwd": fwd_bwd, "torch optimizer": opt_step, "torch orthogonalize": orthogonalize}, model


def jax_fn(depth: int, seq_len: int, batch: int, ns_dtype: str):
    """A zero-argument jitted JAX training step (loss, gradients, hybrid update, apply) on fixed data."""
    import jax
    import jax.numpy as jnp
    import optax

    import jax_reference.models.gpt as JG
    import jax_reference.optim.hybrid as JO

    cfg = JG.GPTConfig(**config(depth, seq_len))
    params = JG.init_params(cfg, jax.random.PRNGKey(0))
    tx = JO.hybrid(params, model_dim=cfg.n_embd, ns_dtype=getattr(jnp, ns_dtype), nonfinite="skip")
    state = tx.init(params)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, VOCAB, (batch, seq_len)), jnp.int32)
    y = jnp.asarray(rng.integers(0, VOCAB, (batch, seq_len)), jnp.int32)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(JG.loss)(params, x, y, cfg)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss
    return lambda: block(step(params, state, x, y))


def figure(rows: list[dict]):
    """Per depth: the torch step split into fwd+bwd, orthogonalization and the rest of the optimizer,
    next to the jitted JAX step."""
    plt = pyplot()

    torch_rows = [r for r in rows if r["framework"] == "torch"]
    jax_rows = {r["depth"]: r for r in rows if r["framework"] == "jax (jit)"}
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(torch_rows)), 4), constrained_layout=True)
    for i, r in enumerate(torch_rows):
        parts = [("fwd+bwd", r["fwd_bwd_ms"], "C0"), ("orthogonalize", r["orth_ms"], "C3"),
                 ("rest of optimizer", max(r["opt_ms"] - r["orth_ms"], 0.0), "C1")]
        bottom = 0.0
        for label, ms, color in parts:
            ax.bar(i - 0.2, ms, 0.38, bottom=bottom, color=color, label=label if i == 0 else None)
            bottom += ms
        if r["depth"] in jax_rows:
            ax.bar(i + 0.2, jax_rows[r["depth"]]["step_ms"], 0.38, color="C2", label="jax train step (jit)" if i == 0
                   else None)
    ax.set_xticks(range(len(torch_rows)), [f"d{r['depth']}\n{r['params'] / 1e6:.1f}M" for r in torch_rows])
    ax.set_ylabel("ms per training step (medians)")
    ax.set_title("Where the training step goes: torch (left, stacked) vs JAX (right)")
    ax.legend(fontsize=7)
    return fig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth 2, seq 128, batch 4, 3 repeats")
    p.add_argument("--depths", type=positive_int, nargs="+", default=None,
                   help="default 4 8 on CPU, 12 20 on CUDA (2 with --quick)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="default 256 on CPU, 1024 on CUDA")
    p.add_argument("--batch", type=positive_int, default=None, help="sequences per step (default 4 CPU, 16 CUDA)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed rounds (default 5; 3 with --quick)")
    p.add_argument("--compile", action="store_true", help="torch.compile the torch model (cold compile in warm-up)")
    p.add_argument("--jax", choices=("auto", "on", "off"), default="auto",
                   help="time the jitted JAX step too (auto: where JAX's backend is the torch device's kind)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where torch runs")
    p.add_argument("--out", type=Path, default=Path("reports/training"), help="results folder")
    return p


def measure(args) -> Suite:
    device = resolve_device(args.device)
    cuda = device == "cuda"
    depths = args.depths or ([2] if args.quick else [12, 20] if cuda else [4, 8])
    seq_len = args.seq_len or (128 if args.quick else 1024 if cuda else 256)
    batch = args.batch or (16 if cuda and not args.quick else 4)
    repeats = args.repeats or (3 if args.quick else 5)
    ns_dtype = "bfloat16" if cuda else "float32"
    peak = peak_flops(torch.device(device)) if cuda else cpu_matmul_peak()
    args.jax, jax_note = jax_on(args.jax, device)
    if args.jax:
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
    rows = []
    for depth in depths:
        fns, model = torch_fns(depth, seq_len, batch, device, args.compile, getattr(torch, ns_dtype))
        if args.jax:
            fns["jax train step (jit)"] = jax_fn(depth, seq_len, batch, ns_dtype)
        st = interleaved_times(fns, repeats)
        ms = {k: v["median_s"] * 1e3 for k, v in st.items()}
        params, flops_per_token = model.num_params(), model.estimate_flops()
        del model, fns
        tokens = batch * seq_len
        step = ms["torch fwd+bwd"] + ms["torch optimizer"]
        lo = st["torch fwd+bwd"]["min_s"] * 1e3 + st["torch optimizer"]["min_s"] * 1e3
        hi = st["torch fwd+bwd"]["max_s"] * 1e3 + st["torch optimizer"]["max_s"] * 1e3
        frames = [("torch" + (" (compile)" if args.compile else ""), step, lo, hi)]
        if args.jax:
            j = st["jax train step (jit)"]
            frames.append(("jax (jit)", j["median_s"] * 1e3, j["min_s"] * 1e3, j["max_s"] * 1e3))
        for framework, step_ms, lo, hi in frames:
            tok_s = tokens / (step_ms / 1e3)
            row = dict(depth=depth, params=params, framework=framework.replace(" (compile)", ""),
                       compiled=args.compile if framework.startswith("torch") else True, tokens_per_step=tokens,
                       step_ms=step_ms, min_ms=lo, max_ms=hi, tokens_per_s=tok_s,
                       mfu=flops_per_token * tok_s / peak if peak else None)
            if framework.startswith("torch"):
                row.update(fwd_bwd_ms=ms["torch fwd+bwd"], opt_ms=ms["torch optimizer"],
                           orth_ms=ms["torch orthogonalize"], orth_share=ms["torch orthogonalize"] / step_ms)
            rows.append(row)
            print(f"d{depth:<3} {framework:16} {step_ms:9.1f} ms/step {tok_s:9.0f} tok/s"
                  + (f"  MFU {row['mfu']:.1%}" if row["mfu"] else ""), flush=True)
    side = {}
    for r in rows:
        side.setdefault(r["depth"], dict(depth=r["depth"], params=r["params"]))[r["framework"]] = r["tokens_per_s"]
    frameworks = list(dict.fromkeys(r["framework"] for r in rows))
    tables = [Table("tokens", "Tokens/s, frameworks side by side (fastest in bold)",
                    [("depth", "depth"), ("params", "params")] + [(f, f"{f} tok/s") for f in frameworks],
                    list(side.values()), key=("depth",), lower_is_better=False, best=tuple(frameworks)),
              Table("steps", "Training step: time, MFU and the orthogonalizer's share",
                    [("depth", "depth"), ("params", "params"), ("framework", "framework"),
                     ("tokens_per_step", "tokens/step"), ("step_ms", "median ms"), ("min_ms", "min ms"),
                     ("max_ms", "max ms"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
                     ("fwd_bwd_ms", "fwd+bwd ms"), ("opt_ms", "optimizer ms"), ("orth_ms", "orthogonalize ms"),
                     ("orth_share", "orth share")],
                    rows, key=("depth", "framework"), metric="step_ms", spread=("min_ms", "max_ms"))]
    peak_text = (f"the dense bf16 peak of {torch.cuda.get_device_name()}, {peak / 1e12:.0f} TFLOP/s" if cuda and peak
                 else "unknown for this GPU (no MFU)" if cuda
                 else f"the best measured fp32 1024³ matmul rate here, {peak / 1e9:.0f} GFLOP/s")
    notes = (f"torch on {device} ({'bf16 autocast' if cuda else 'fp32'}{', torch.compile' if args.compile else ''}, "
             f"{torch.get_num_threads()} threads); {jax_note}. seq_len {seq_len}, batch "
             f"{batch}, byte vocab {VOCAB}; Muon NS5 in {ns_dtype}. Median of {repeats} interleaved rounds after one "
             f"untimed warm-up call each (compilation excluded); the torch step's min/max are the sums of its parts'. "
             f"MFU against {peak_text}; it counts model FLOPs only, so the orthogonalizer's time is overhead. "
             "The JAX step computes in fp32 throughout (jax_reference.models.gpt has no autocast; matmul precision "
             "'highest'), so on CUDA it is not a like-for-like rival of the bf16-autocast torch step.")
    config = dict(device=device, seq_len=seq_len, batch=batch, compile=args.compile, ns_dtype=ns_dtype,
                  repeats=repeats, jax=args.jax)
    return Suite("training", tables, notes, {"step_breakdown": figure(rows)}, config=config)


def main(argv=None) -> int:
    return cli_main(parser(), measure, argv, title="Training step: torch vs JAX, MFU and the orthogonalizer's share")


if __name__ == "__main__":
    sys.exit(main())
