"""Sharded optimizers vs the naive data-parallel step: time and bytes at N = 1, 2, 4.

Spawns N gloo ranks on this machine (one BLAS thread each) for a d12-sized parameter set
(12 layers × {c_q, c_k, c_v, c_proj: 768×768; c_fc: 3072×768; mlp c_proj: 768×3072},
85M fp32 parameters in Muon; plus an embedding-sized AdamW matrix) and measures per step:

- dist: DistMuon / DistAdamW (reduce_scatter → owner update → all_gather);
- naive: all_reduce(AVG) of one flat gradient buffer, then every rank runs the full
  Muon / AdamW (what DDP + a local optimizer does).

Reported against the theory: both schemes send 2·(N−1)/N of the gradient bytes per rank
(a reduce_scatter + all_gather is an all_reduce split in two), but DistMuon
orthogonalizes only ceil(K/N) of each stack's K matrices per rank. Bytes come from the
optimizers' ring-model counters (torch_impl/sharding/comm.py) and from the kernel's loopback
counters (/proc/net/dev "lo" transmit bytes, all ranks together, TCP framing included).
ns_dtype is float32: this CPU's bf16 GEMM is emulated and ~10-40× slower.

    python -m benchmarks.distributed            # d12 (several minutes on 2 cores)
    python -m benchmarks.distributed --quick    # 2 layers of width 128, N = 1, 2 (seconds)

With more ranks than cores (N = 4 on 2 cores) ranks time-share the cores, so wall time
measures total CPU work more than parallel speed-up.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import queue
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.harness import positive_int
from benchmarks.results import Suite, Table, cli_main, pyplot


def muon_shapes(n_layer: int, d: int) -> list[tuple[int, int]]:
    per_layer = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    return per_layer * n_layer


def lo_tx_bytes() -> int | None:
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    except OSError:
        pass
    return None


def _naive_step(params, opt, comm_bytes):
    """all_reduce(AVG) one flat fp32 gradient buffer, then the local optimizer on every rank."""
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    if dist.get_world_size() > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.AVG)
        n = dist.get_world_size()
        comm_bytes["all_reduce"] = comm_bytes.get("all_reduce", 0) + 2 * (n - 1) / n * flat.numel() * 4
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
    opt.step()


def timed(fn, steps: int, warmup: bool = True) -> tuple[tuple[float, float, float], float | None]:
    """(median, min, max) seconds per call (between barriers) and mean loopback bytes per call,
    after one warm-up call (lazy state, allocator) unless `warmup` is False."""
    times, wire = [], []
    if warmup:
        fn()
    for _ in range(steps):
        dist.barrier()
        b0, t0 = lo_tx_bytes(), time.perf_counter()
        fn()
        dist.barrier()
        t1, b1 = time.perf_counter(), lo_tx_bytes()
        times.append(t1 - t0)
        if b0 is not None:
            wire.append(b1 - b0)
    return (statistics.median(times), min(times), max(times)), (statistics.mean(wire) if wire else None)


def join_group(rank: int, n: int, port: int) -> None:
    """A spawned benchmark rank: one BLAS thread, a gloo group of `n` on localhost:`port`."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            timeout=timedelta(seconds=600))


def _worker(rank, n, port, cfg, results):
    join_group(rank, n, port)
    rows = _raw_collective_rows(rank, n, cfg) if n > 1 else []
    suites = [("muon", muon_shapes(cfg["n_layer"], cfg["d"]))]
    if cfg["vocab"]:
        suites.append(("adamw", [(cfg["vocab"], cfg["d"])]))
    for kind, shapes in suites:
        for scheme in ("dist", "naive"):
            row = _optimizer_row(kind, scheme, shapes, rank, n, cfg)
            if rank == 0:
                rows.append(row)
    if rank == 0:
        results.put(rows)
    dist.barrier()


def _raw_collective_rows(rank, n, cfg) -> list[dict]:
    """The raw gloo collectives on a buffer the size of the Muon parameters (rows on rank 0)."""
    rows = []
    numel = sum(math.prod(s) for s in muon_shapes(cfg["n_layer"], cfg["d"])) // n * n
    x, part, full = torch.randn(numel), torch.empty(numel // n), torch.empty(numel)
    for name, fn, ring in (
            ("reduce_scatter", lambda: dist.reduce_scatter_tensor(part, x, op=dist.ReduceOp.AVG), 1),
            ("all_gather", lambda: dist.all_gather_into_tensor(full, part), 1),
            ("all_reduce", lambda: dist.all_reduce(x, op=dist.ReduceOp.AVG), 2)):
        (sec, lo, hi), wire = timed(fn, cfg["steps"])
        theory = ring * (n - 1) / n * numel * 4
        if rank == 0:
            rows.append(dict(optimizer="gloo", scheme=name, world_size=n, step_s=sec, step_min_s=lo, step_max_s=hi,
                             param_MB=numel * 4 / 1e6, sent_MB_per_rank=theory / 1e6,
                             theory_MB_per_rank=theory / 1e6,
                             wire_MB_per_rank=None if wire is None else wire / n / 1e6))
    return rows


def _make_params(shapes, seed, rank):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    gg = torch.Generator().manual_seed(seed + 1 + rank)  # different data on every rank
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gg)
    return ps


def _optimizer_row(kind: str, scheme: str, shapes, rank: int, n: int, cfg) -> dict | None:
    """One optimizer ("muon" / "adamw") under one scheme ("dist": ours sharded; "naive": all_reduce
    + the whole step on every rank), timed on every rank; the row on rank 0 (None elsewhere)."""
    from torch_impl.optim import AdamW, DistAdamW, DistMuon, Muon
    from torch_impl.sharding.placement import ns_cost

    param_bytes = sum(math.prod(s) for s in shapes) * 4
    params = _make_params(shapes, 0, rank)
    comm = {}
    if kind == "muon":
        opt = (DistMuon(params, ns_dtype=torch.float32, track_stats=True) if scheme == "dist"
               else Muon(params, ns_dtype=torch.float32))
    else:
        opt = (DistAdamW(params, track_stats=True) if scheme == "dist" else AdamW(params))
    step = opt.step if scheme == "dist" else functools.partial(_naive_step, params, opt, comm)
    if scheme == "dist":
        opt.stats.reset()
    (sec, lo, hi), wire = timed(step, cfg["steps"])
    if scheme == "dist":
        s = opt.stats
        sent = s.total_bytes_sent / s.steps
        work = (s.matrices if kind == "muon" else s.elements) / s.steps
    else:
        sent = sum(comm.values()) / (cfg["steps"] + 1)
        work = len(params) if kind == "muon" else sum(p.numel() for p in params)
    gathered = [None] * n
    dist.all_gather_object(gathered, dict(sec=sec, lo=lo, hi=hi, sent=sent, work=work))
    if rank != 0:
        return None
    by_shape = {}
    for sh in shapes:
        by_shape[sh] = by_shape.get(sh, 0) + 1
    theory_work = (sum(math.ceil(k / n) for k in by_shape.values()) if kind == "muon"
                   else math.ceil(shapes[0][0] / n) * shapes[0][1])
    if scheme == "naive":
        theory_work = len(shapes) if kind == "muon" else sum(math.prod(s) for s in shapes)
    # the sharded schemes pad each stack (Muon) / dim 0 (AdamW) to a multiple of N
    padded = (sum(math.ceil(k / n) * n * math.prod(sh) for sh, k in by_shape.items())
              if kind == "muon" else math.ceil(shapes[0][0] / n) * n * shapes[0][1]) * 4
    moved = padded if scheme == "dist" else param_bytes
    balance = count_balance = None
    if kind == "muon" and scheme == "dist":
        # Newton-Schulz cost of the busiest rank ÷ the mean: the optimizer's owners
        # (by cost) next to the count split i // ceil(K/N) they replaced
        balance = opt.owner_balance()
        mean = sum(k * ns_cost(sh) for sh, k in by_shape.items()) / n
        count_balance = sum(math.ceil(k / n) * ns_cost(sh) for sh, k in by_shape.items()) / mean
    return dict(
        optimizer=kind, scheme=scheme, world_size=n,
        step_s=max(g["sec"] for g in gathered),  # the slowest rank's median, min and max
        step_min_s=max(g["lo"] for g in gathered), step_max_s=max(g["hi"] for g in gathered),
        param_MB=param_bytes / 1e6,
        padded_MB=moved / 1e6,
        sent_MB_per_rank=max(g["sent"] for g in gathered) / 1e6,
        theory_MB_per_rank=2 * (n - 1) / n * moved / 1e6,
        wire_MB_per_rank=None if wire is None else wire / n / 1e6,
        work_per_rank=max(g["work"] for g in gathered),
        theory_work_per_rank=theory_work,
        owner_balance=balance,
        count_split_balance=count_balance,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(n: int, cfg: dict, worker=None) -> list[dict]:
    """Spawn `n` ranks of `worker(rank, n, port, cfg, results)` (this module's by default) and
    return the rows rank 0 puts on `results`."""
    # forkserver with torch preloaded: the server imports torch once per benchmark process and every
    # rank is a fork of it (~0.1 s) instead of a fresh interpreter importing torch (~3-4 s of CPU each)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "benchmarks.distributed", "benchmarks.sharding"])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker or _worker, args=(r, n, port, cfg, results)) for r in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 3600
    while True:  # a rank that died (an exception) ends the wait at once instead of after the hour
        try:
            rows = results.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a rank failed or timed out at world size {n}") from None
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank failed at world size {n}")
    return rows


def world_sizes(text: str) -> list[int]:
    """argparse type: comma-separated rank counts, each ≥ 1."""
    try:
        sizes = [int(n) for n in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give rank counts ≥ 1 separated by commas, e.g. 1,2,4")
    return sizes


def scaling_figure(rows: list[dict], label: str, what: str):
    """Step time against the number of ranks, one line per `label` value (bars: none; medians)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for name in dict.fromkeys(label(r) for r in rows):
        pts = sorted((r["world_size"], r["step_s"]) for r in rows if label(r) == name)
        ax.plot([n for n, _ in pts], [t for _, t in pts], marker="o", label=name)
    ax.set_xlabel("ranks (gloo, one thread each)")
    ax.set_ylabel("median step s (slowest rank)")
    ax.set_xticks(sorted({r["world_size"] for r in rows}))
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(what)
    return fig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers of width 128, vocab 2048, N = 1, 2")
    p.add_argument("--world-sizes", type=world_sizes, default=None, help="default 1,2,4 (1,2 with --quick)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per measurement")
    p.add_argument("--no-adamw", action="store_true", help="skip the embedding-sized AdamW rows")
    p.add_argument("--out", type=Path, default=Path("reports/distributed"), help="results folder")
    return p


def measure(args) -> Suite:
    cfg = (dict(n_layer=2, d=128, vocab=2048, steps=args.steps or 3) if args.quick
           else dict(n_layer=12, d=768, vocab=32768, steps=args.steps or 2))
    if args.no_adamw:
        cfg["vocab"] = 0
    rows = []
    for n in args.world_sizes or ([1, 2] if args.quick else [1, 2, 4]):
        t = time.perf_counter()
        rows += run_world(n, cfg)
        print(f"world size {n}: {time.perf_counter() - t:.1f} s", flush=True)
    base = {(r["optimizer"], r["scheme"]): r["step_s"] for r in rows if r["world_size"] == 1}
    for r in rows:
        if (r["optimizer"], r["scheme"]) in base:
            r["speedup_vs_N1"] = base[(r["optimizer"], r["scheme"])] / r["step_s"]
    columns = [("optimizer", "optimizer"), ("scheme", "scheme"), ("world_size", "N"),
               ("step_s", "step s"), ("step_min_s", "min s"), ("step_max_s", "max s"),
               ("speedup_vs_N1", "vs N=1"), ("param_MB", "param MB"),
               ("padded_MB", "padded MB"), ("sent_MB_per_rank", "sent MB/rank (counters)"),
               ("theory_MB_per_rank", "theory 2(N-1)/N·padded MB"),
               ("wire_MB_per_rank", "loopback MB/rank"),
               ("work_per_rank", "work/rank"), ("theory_work_per_rank", "theory work/rank"),
               ("owner_balance", "NS balance (max/mean)"), ("count_split_balance", "count split balance")]
    size = f"{cfg['n_layer']} layers, d={cfg['d']}, vocab {cfg['vocab']}"
    notes = (f"Model: {size}; fp32 parameters and gradients, ns_dtype=float32, "
             f"{cfg['steps']} timed steps (median; slowest rank) after one warm-up, gloo on one "
             f"{os.cpu_count()}-core machine, 1 thread per rank. work = matrices orthogonalized "
             "(Muon) or parameter elements updated (AdamW) per rank per step. padded: "
             "DistMuon pads each stack of K same-shape matrices to a multiple of N (DistAdamW "
             "pads dim 0), and the zeros travel too, so a stack with K < N costs N/K times its "
             "bytes. 'sent' is the "
             "ring-model count of the optimizers; 'loopback' is the kernel's lo transmit bytes "
             "over all ranks / N (includes TCP framing and the small flag all_reduces). "
             "'gloo' rows: the bare collectives on a buffer of the Muon parameters' size "
             "(step s = time per collective) — gloo's reduce_scatter_tensor puts ~2x the "
             "ring-model bytes on the wire (as much as an all_reduce), so on gloo the sharded "
             "step moves ~1.5x the naive step's bytes; NCCL's ring reduce_scatter does not.")
    table = Table("steps", "Sharded optimizers vs naive data parallel (CPU, gloo)", columns, rows,
                  key=("optimizer", "scheme", "world_size"), metric="step_s", spread=("step_min_s", "step_max_s"))
    fig = scaling_figure([r for r in rows if r["optimizer"] != "gloo"], lambda r: f"{r['optimizer']} {r['scheme']}",
                         f"Step time vs ranks ({size})")
    return Suite("distributed", [table], notes, {"scaling": fig}, config=cfg)


def main(argv=None) -> int:
    return cli_main(parser(), measure, argv, title="Sharded optimizers vs naive data parallel (CPU, gloo)")


if __name__ == "__main__":
    sys.exit(main())
