"""How the ranks share a GPT's training state: memory, bytes and step time at N = 1, 2, 4.

One full training step (forward, backward, optimizer) of a nanochat GPT in N spawned gloo ranks,
different data on every rank, for each scheme:

- zero2_step:     whole model on every rank; DistMuon / DistAdamW reduce_scatter the gradients
                  in the step (full gradients held until then, as nanochat does);
- zero2_backward: the same optimizers with `reduce_in_backward` (torch_impl/sharding/backward_reduce.py):
                  each bucket reduce_scattered during backward, its full gradients dropped;
- fsdp:           FSDP2 (torch_impl/sharding/parallelize.py): parameters, gradients and state by rows;
                  Muon moves rows to owners and back with two all_to_alls per stack;
- fsdp_torch_muon: the same FSDP2 model with torch.optim.Muon on the block matrices (DTensor's
                  implicit redistribution; ours for the AdamW parameters): the comparison point.

Per rank, measured as the bytes of the tensors held (not an allocator counter, so CPU and CUDA
alike): parameters, gradients right after backward (for zero2_backward the received shards and
the send buffers still in flight), optimizer state after the step; each against its theory
(P = parameter bytes, M = Muon-matrix bytes, A = AdamW bytes; fp32 throughout):

    zero2_step      params P     grads P                          state (M + 2A)/N
    zero2_backward  params P     grads ≈ P/N (+ ≤ 2 buckets)      state (M + 2A)/N
    fsdp            params P/N   grads P/N                        state (M + 2A)/N
    fsdp_torch_muon params P/N   grads P/N                        state (M + 2A)/N

Bytes per step and rank: the optimizers' own ring-model counters (for torch.optim.Muon,
benchmarks/traffic.py DTensorTraffic), with their theory (ZeRO-2: reduce_scatter + all_gather =
2·(N−1)/N of the padded bytes; FSDP2 Muon: the two all_to_alls move each rank's rows of the
matrices it does not own, 2·(N−1)/N² of M per rank on average), and the kernel's loopback
transmit bytes over all ranks / N, which include FSDP's own gathers and reduce_scatters.

    python -m benchmarks.sharding            # depth 4, width 256 (a few minutes on 2 cores)
    python -m benchmarks.sharding --quick    # depth 2, width 128, N = 1, 2 (seconds)

CPU and gloo only here (the machines of this project have no GPU for it); N = 4 on 2 cores
time-shares the cores, so step time measures total work more than speed-up.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.distributed import join_group, run_world, scaling_figure, timed, world_sizes
from benchmarks.harness import positive_int
from benchmarks.results import Suite, Table, cli_main, pyplot
from torch_impl.sharding.comm import all_gather_object, barrier

SCHEMES = ("zero2_step", "zero2_backward", "fsdp", "fsdp_torch_muon")


def nbytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def state_bytes(optimizers) -> int:
    return nbytes(v for opt in optimizers for s in opt.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.ndim > 0)


def grad_bytes(model, parts) -> int:
    held = nbytes(p.grad for p in model.parameters())
    for part in parts:  # zero2_backward: reductions launched in backward
        for r in part.reducer.early.values():
            held += nbytes([r.recv]) + (nbytes([r.send]) if r.send is not None else 0)
    return held


def padded_bytes(part, n: int) -> int:
    """fp32 bytes of one step's ZeRO-2 reduce_scatter inputs: Muon stacks padded to chunk·N
    matrices (StackLayout), AdamW rows to chunk·N (placement Rows); 0 on FSDP2 / one rank."""
    total = 0
    if n == 1:
        return 0
    for b, bucket in enumerate(part.reducer.buckets):
        if part.kind == "muon":
            layout = part.layouts[b]
            total += layout.chunk * n * bucket.params[0].numel() * 4
        else:
            (p,) = bucket.params
            total += part.placement(p).chunk * n * (p.numel() // p.shape[0]) * 4
    return total


def measure_scheme(scheme: str, base, mesh, n: int, rank: int, cfg: dict) -> tuple[dict, list]:
    """One scheme on this rank: its median step time, bytes and held memory."""
    from benchmarks.traffic import DTensorTraffic
    from torch_impl.optim import hybrid
    from torch_impl.optim.hybrid import label_param
    from torch_impl.sharding.parallelize import apply_fsdp

    model = copy.deepcopy(base)
    if scheme.startswith("fsdp") and mesh is not None:
        apply_fsdp(model, mesh)
    named = list(model.named_parameters())
    kw = dict(model_dim=cfg["d"], distributed=True, ns_dtype=torch.float32, track_stats=True)
    torch_muon = traffic = None
    if scheme == "fsdp_torch_muon":
        torch_muon = torch.optim.Muon([p for name, p in named if label_param(name, p.shape) == "muon"],
                                      lr=0.02, weight_decay=0.0)
        opt = hybrid([(name, p) for name, p in named if label_param(name, p.shape) != "muon"], **kw)
        traffic = DTensorTraffic(n)
    else:
        opt = hybrid(named, **kw)
    parts = list(opt.optimizers.values())
    hooks = scheme == "zero2_backward" and n > 1
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    x = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)
    y = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)

    def step(measure_grads=False):
        loss = model(x, y)
        if hooks:
            with opt.reduce_in_backward(loss):
                loss.backward()
        else:
            loss.backward()
        held = grad_bytes(model, parts) if measure_grads else None
        if torch_muon is not None:
            with traffic:
                torch_muon.step()
            torch_muon.zero_grad()
        opt.step()
        opt.zero_grad()
        return held

    grads = step(measure_grads=True)  # also the warm-up: lazy state, allocator
    for part in parts:
        part.stats.reset()
    if traffic is not None:
        traffic.stats.reset()
    (sec, lo, hi), wire = timed(step, cfg["steps"], warmup=False)
    sent = sum(part.stats.total_bytes_sent for part in parts)
    if traffic is not None:
        sent += traffic.stats.total_bytes_sent
    # the bytes the ZeRO-2 collectives move: stacks padded to chunk·N matrices, rows to chunk·N
    padded = sum(padded_bytes(part, n) for part in parts)
    return dict(sec=sec, lo=lo, hi=hi, wire=wire, padded=padded,
                sent=sent / cfg["steps"], params=nbytes(model.parameters()), grads=grads,
                state=state_bytes(parts + ([torch_muon] if torch_muon else [])),
                balance=opt.optimizers["muon"].owner_balance() if "muon" in opt.optimizers else None), named


def _worker(rank, n, port, cfg, results):
    join_group(rank, n, port)
    from torch.distributed.device_mesh import init_device_mesh

    from torch_impl.models.gpt import GPT, GPTConfig
    from torch_impl.optim.hybrid import label_param

    torch.manual_seed(0)
    base = GPT(GPTConfig(sequence_len=cfg["seq"], vocab_size=cfg["vocab"], n_layer=cfg["depth"],
                         n_head=cfg["d"] // 64, n_kv_head=cfg["d"] // 64, n_embd=cfg["d"]))
    mesh = init_device_mesh("cpu", (n,)) if n > 1 else None
    rows = []
    for scheme in SCHEMES:
        mine, named = measure_scheme(scheme, base, mesh, n, rank, cfg)
        every = all_gather_object(mine)
        if rank == 0:
            muon_bytes = sum(p.numel() * 4 for name, p in named if label_param(name, p.shape) == "muon")
            total = sum(p.numel() * 4 for _, p in named)
            wires = [e["wire"] for e in every if e["wire"] is not None]
            # ZeRO-2: reduce_scatter + all_gather of the padded buckets (+ the small all_reduce);
            # FSDP2: the all_to_all pair of the Muon matrices (AdamW moves nothing of its own)
            padded = every[0]["padded"]
            theory_sent = {"zero2_step": 2 * (n - 1) / n * padded, "zero2_backward": 2 * (n - 1) / n * padded,
                           "fsdp": 2 * (n - 1) / n**2 * muon_bytes}.get(scheme)
            rows.append(dict(
                scheme=scheme, world_size=n, step_s=max(e["sec"] for e in every),  # the slowest rank's
                step_min_s=max(e["lo"] for e in every), step_max_s=max(e["hi"] for e in every),
                params_MB=max(e["params"] for e in every) / 1e6,
                theory_params_MB=total / (n if scheme.startswith("fsdp") else 1) / 1e6,
                grads_MB=max(e["grads"] for e in every) / 1e6,
                theory_grads_MB=total / (1 if scheme == "zero2_step" else n) / 1e6,
                state_MB=max(e["state"] for e in every) / 1e6,
                theory_state_MB=(muon_bytes + 2 * (total - muon_bytes)) / n / 1e6,
                sent_MB_per_rank=statistics.mean(e["sent"] for e in every) / 1e6,
                theory_sent_MB=None if theory_sent is None else theory_sent / 1e6,
                wire_MB_per_rank=statistics.mean(wires) / n / 1e6 if wires else None,
                owner_balance=every[0]["balance"]))
    if rank == 0:
        results.put(rows)
    barrier()
    dist.destroy_process_group()


def memory_figure(rows: list[dict]):
    """Per-rank bytes held (parameters, gradients after backward, optimizer state), measured (bars)
    against the theory (black ticks), for each scheme and rank count."""
    plt = pyplot()

    parts = (("params_MB", "theory_params_MB", "parameters"), ("grads_MB", "theory_grads_MB", "gradients"),
             ("state_MB", "theory_state_MB", "optimizer state"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True, sharey=True)
    labels = [f"{r['scheme']}\nN={r['world_size']}" for r in rows]
    for ax, (got, theory, what) in zip(axes, parts):
        xs = range(len(rows))
        ax.bar(xs, [r[got] for r in rows], color=[f"C{SCHEMES.index(r['scheme'])}" for r in rows])
        ax.scatter(xs, [r[theory] for r in rows], marker="_", s=300, color="k", zorder=3, label="theory")
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=7)
        ax.set_title(f"{what} per rank")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("MB (largest rank)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Memory per rank: measured (bars) vs theory (ticks)")
    return fig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth 2, width 128, N = 1, 2")
    p.add_argument("--world-sizes", type=world_sizes, default=None, help="default 1,2,4 (1,2 with --quick)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per scheme")
    p.add_argument("--out", type=Path, default=Path("reports/sharding"), help="results folder")
    return p


def measure(args) -> Suite:
    cfg = (dict(depth=2, d=128, vocab=2048, seq=64, batch=4, steps=args.steps or 3) if args.quick
           else dict(depth=4, d=256, vocab=8192, seq=128, batch=4, steps=args.steps or 3))
    rows = []
    for n in args.world_sizes or ([1, 2] if args.quick else [1, 2, 4]):
        t = time.perf_counter()
        rows += run_world(n, cfg, _worker)
        print(f"world size {n}: {time.perf_counter() - t:.1f} s", flush=True)
    columns = [("scheme", "scheme"), ("world_size", "N"), ("step_s", "step s"), ("step_min_s", "min s"),
               ("step_max_s", "max s"),
               ("params_MB", "params MB/rank"), ("theory_params_MB", "theory"),
               ("grads_MB", "grads MB/rank after backward"), ("theory_grads_MB", "theory"),
               ("state_MB", "state MB/rank"), ("theory_state_MB", "theory"),
               ("sent_MB_per_rank", "optimizer sent MB/rank"), ("theory_sent_MB", "theory"),
               ("wire_MB_per_rank", "loopback MB/rank (all)"),
               ("owner_balance", "NS balance")]
    size = (f"depth {cfg['depth']}, width {cfg['d']}, vocab {cfg['vocab']}, "
            f"{cfg['batch']}×{cfg['seq']} tokens per rank")
    notes = (f"GPT {size}; fp32, ns_dtype=float32; {cfg['steps']} timed steps (median, slowest rank) after "
             f"one warm-up; gloo on one {os.cpu_count()}-core machine, 1 thread per rank. MB/rank: the largest "
             "rank's. 'theory' of the gradients for zero2_backward is P/N: the measured value adds the send "
             "buffers of the buckets still in flight (≤ 2) and the small replicated gradients. "
             "'optimizer sent': the optimizers' ring-model counters (and DTensorTraffic for torch.optim.Muon), "
             "mean over ranks; 'loopback': the kernel's lo transmit bytes over all ranks / N, everything "
             "included (FSDP's own all_gathers and reduce_scatters, TCP framing).")
    table = Table("schemes", "ZeRO-2 vs FSDP2 vs torch.optim.Muon on DTensors (CPU, gloo)", columns, rows,
                  key=("scheme", "world_size"), metric="step_s", spread=("step_min_s", "step_max_s"))
    figures = {"memory": memory_figure(rows),
               "scaling": scaling_figure(rows, lambda r: r["scheme"], f"Training step time vs ranks ({size})")}
    return Suite("sharding", [table], notes, figures, config=cfg)


def main(argv=None) -> int:
    return cli_main(parser(), measure, argv, title="ZeRO-2 vs FSDP2 vs torch.optim.Muon on DTensors (CPU, gloo)")


if __name__ == "__main__":
    sys.exit(main())
