"""Singular-value spectra of one weight matrix's update: AdamW, raw momentum, and every orthogonalizer.

A small GPT (nanochat architecture) trains for a few steps on the embedded corpus (the Python
standard library's source, byte tokens) with the nanochat hybrid (Muon + AdamW). A shadow copy
of one block matrix (block 0's MLP c_fc by default) is stepped by AdamW (betas 0.8, 0.95, as
the hybrid's AdamW groups) on the same gradients. After the last step:

- the raw gradient G of that matrix and Muon's Nesterov momentum U = lerp(G, M, μ), the matrix
  every orthogonalizer receives;
- the AdamW update direction (the shadow's parameter change divided by its lr);
- O = f(U) for every registered orthogonalizer at its default step count, in fp32.

Their singular values are written to spectra.json and drawn in spectra.png: σ_i against i
(each normalised by its largest σ, log scale), so the before/after shapes compare directly. An
exact polar factor is flat at 1; NS5 leaves a band around it; AdamW's update is not orthogonal.

    python -m benchmarks.spectra            # depth 4, 40 steps (a few minutes on 2 CPU cores)
    python -m benchmarks.spectra --quick    # depth 2, 8 steps (about 20 s)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import positive_int
from benchmarks.results import Suite, Table, cli_main, pyplot
from torch_impl.data.corpus import load_corpus
from torch_impl.data.tokenizer import ByteTokenizer
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.optim import AdamW, hybrid
from torch_impl.orthogonalizers.registry import NS_EPS, ORTHOGONALIZERS, default_steps


def token_batches(seq_len: int, batch: int, max_bytes: int, seed: int):
    """Endless (inputs, targets) batches of byte tokens cut at random offsets of the corpus."""
    tokens = np.concatenate([ByteTokenizer().encode_np(d) for d in load_corpus(max_bytes=max_bytes)])
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
        chunk = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        yield chunk[:, :-1], chunk[:, 1:]


def collect(depth: int, steps: int, param: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train `steps` steps; return the fp32 matrices whose spectra are compared."""
    torch.manual_seed(seed)
    width = 64 * depth
    model = GPT(GPTConfig(sequence_len=128, vocab_size=257, n_layer=depth, n_head=depth, n_kv_head=depth,
                          n_embd=width))  # head_dim 64
    model.init_weights()
    opt = hybrid(model.named_parameters(), model_dim=width, ns_dtype=torch.float32)
    target = dict(model.named_parameters())[param]
    shadow = torch.nn.Parameter(target.detach().clone())
    shadow_opt = AdamW([shadow], lr=1.0, betas=(0.8, 0.95), eps=1e-10)
    batches = token_batches(128, 8, 2_000_000, seed)
    for step in range(steps + 1):
        x, y = next(batches)
        loss = model(x, y)
        loss.backward()
        if step == steps:  # the last gradient: look, do not step
            break
        shadow.grad = target.grad.detach().clone()
        before = shadow.detach().clone()
        shadow_opt.step()
        adamw_update = before - shadow.detach()  # lr = 1: the update direction itself
        opt.step()
        opt.zero_grad()
    muon = opt.optimizers["muon"]
    G = target.grad.detach().float()
    M = muon.state[target]["momentum_buffer"]
    mu = muon.param_groups[0]["momentum"]
    U = G.lerp(M.lerp(G, 1 - mu), mu)  # muon_direction: the buffer takes G first, then Nesterov
    out = {"gradient": G, "momentum (Nesterov U)": U, "AdamW update": adamw_update}
    for name, fn in ORTHOGONALIZERS.items():
        out[name] = fn(U, steps=default_steps(name), eps=NS_EPS, compute_dtype=torch.float32)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.spectra", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth 2, 8 steps")
    p.add_argument("--depth", type=positive_int, default=None, help="GPT depth (width 64·depth; default 4, quick 2)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps first (default 40, quick 8)")
    p.add_argument("--param", default="transformer.h.0.mlp.c_fc.weight", help="the block matrix to look at")
    p.add_argument("--out", type=Path, default=Path("reports/spectra"), help="results folder")
    return p


def measure(args) -> Suite:
    depth = args.depth or (2 if args.quick else 4)
    steps = args.steps or (8 if args.quick else 40)
    try:
        mats = collect(depth, steps, args.param)
    except KeyError:
        raise ValueError(f"--param {args.param!r}: no such parameter in a depth-{depth} GPT") from None
    spectra = {k: torch.linalg.svdvals(v.double()).numpy() for k, v in mats.items()}
    rows = [dict(update=k, sigma_max=float(s[0]), sigma_min=float(s[-1]), ratio=float(s[-1] / s[0]))
            for k, s in spectra.items()]

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, (k, s) in enumerate(spectra.items()):
        ax.plot(np.arange(1, len(s) + 1), s / s[0], label=k, lw=2.2 if i < 3 else 1.2, ls="-" if i < 3 else "--")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ_i / σ_max")
    shape = tuple(mats["gradient"].shape)
    ax.set_title(f"{args.param} {shape}, depth {depth}, after {steps} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    notes = (f"GPT depth {depth} (width {64 * depth}), {steps} hybrid steps on the stdlib corpus, byte tokens, "
             f"batch 8×128; matrix {args.param} {shape}; orthogonalizers in fp32 at their default step counts "
             "on the Nesterov momentum U.")
    for row in rows:
        print(f"{row['update']:<24} σ {row['sigma_min']:.3g}–{row['sigma_max']:.3g}   σ_min/σ_max {row['ratio']:.3g}")
    table = Table("spectra", "Update spectra of one weight matrix", [
        ("update", "update"), ("sigma_min", "σ min"), ("sigma_max", "σ max"), ("ratio", "σ_min/σ_max")],
        rows, key=("update",))  # no compared metric: the gradient's and AdamW's ratios have no better direction
    return Suite("spectra", [table], notes, {"spectra": fig}, config=dict(depth=depth, steps=steps, param=args.param))


def main(argv=None) -> int:
    return cli_main(parser(), measure, argv, title="Update spectra of one weight matrix")


if __name__ == "__main__":
    raise SystemExit(main())
