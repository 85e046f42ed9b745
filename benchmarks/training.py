"""Training throughput: tokens/s and MFU of short torch_impl.train runs, Muon hybrid vs AdamW only.

For each depth (nanochat sizing: width 64·depth), rank count and optimizer, the real CLI runs under
`torchrun --standalone --nproc_per_node=N` for a few steps; the step time is the median over the steps
after the first (which pays for allocation and warm-up). Every rank gets one thread
(OMP_NUM_THREADS=1), so 1 rank = 1 core and 2 ranks = 2 cores; the per-rank batch is fixed (weak
scaling), so tokens per step grow with the ranks.

MFU counts model FLOPs only (6·params + attention per token, GPT.estimate_flops), so the time Muon
spends orthogonalizing shows up as lost MFU: the AdamW-only rows put everything in AdamW and isolate
that cost. On CPU the peak is the measured single-thread fp32 matmul rate of this machine (there is no
datasheet number for a shared vCPU); on CUDA the GPU table of torch_impl.device applies.

    python -m benchmarks.training            # d4, d8, d12 (d12 + Muon on one CPU core: minutes per step)
    python -m benchmarks.training --quick    # d4 only, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import write_report
from torch_impl.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("hybrid", "adamw")
# steps per run by depth: enough after the warm-up step for a median where steps are cheap, the
# minimum (2 timed) where one Muon step on a CPU core takes tens of seconds
DEFAULT_STEPS = {4: 6, 8: 3, 12: 3}


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """fp32 FLOP/s of an n³ matmul on one thread: the per-rank 'peak' for CPU MFU. The fastest of many
    calls, not the median: on shared cores the median measures the other jobs too, and a low 'peak'
    would inflate every MFU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(threads)


def model_size(depth: int, seq_len: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of the byte-level model train.py builds at this depth."""
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=257, n_layer=depth, n_head=depth,
                              n_kv_head=depth, n_embd=64 * depth))
    return model.num_params(), model.estimate_flops()


def run(depth: int, ranks: int, optimizer: str, steps: int, seq_len: int, batch: int, device: str) -> dict:
    """One training run; MFU is filled in by the caller once the peak is known."""
    load = os.getloadavg()[0]  # other jobs on the same cores make every number here slower
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "torch_impl.train", "--depth", str(depth), "--seq-len", str(seq_len),
               "--device-batch-size", str(batch), "--steps", str(steps), "--optimizer", optimizer,
               "--eval-every", "0", "--eval-tokens", "1", "--no-checkpoint", "--sample-tokens", "0",
               "--max-corpus-bytes", "2000000", "--device", device, "--out-dir", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    dts = [r["dt"] for r in train[1:]] or [train[0]["dt"]]
    dt = statistics.median(dts)
    tokens = batch * seq_len * ranks
    params, flops_per_token = model_size(depth, seq_len)
    tok_s = tokens / dt
    return dict(depth=depth, params=params, ranks=ranks, steps=steps, optimizer=optimizer, tokens_per_step=tokens,
                step_ms=dt * 1e3, tokens_per_s=tok_s, mfu=train[-1]["mfu"], flops_per_token=flops_per_token,
                first_loss=train[0]["loss"], last_loss=train[-1]["loss"], load_before=load)


COLUMNS = [("depth", "depth"), ("params", "params"), ("ranks", "ranks"), ("optimizer", "optimizer"),
           ("tokens_per_step", "tokens/step"), ("step_ms", "step ms"), ("tokens_per_s", "tokens/s"),
           ("mfu", "MFU"), ("vs_adamw", "step time vs AdamW"), ("load_before", "load avg")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d4 only")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="override the depths")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 6 for d4, 3 deeper)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="per-rank peak for MFU instead of measuring it (on busy shared cores the measurement "
                        "comes out low and the MFUs high)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="output directory")
    args = p.parse_args(argv)
    depths = args.depths or ([4] if args.quick else [4, 8, 12])
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up and not timed)")
    # CPU peak: the best single-thread matmul rate measured before any of the runs, so the MFUs of all rows
    # share one denominator (re-measured before every run because other jobs come and go)
    peak = args.peak_gflops * 1e9 if args.peak_gflops else None
    rows = []
    for depth in depths:
        for ranks in args.ranks:
            pair = {}
            steps = args.steps or DEFAULT_STEPS.get(depth, 3)
            for optimizer in OPTIMIZERS:
                if args.device == "cpu" and not args.peak_gflops:
                    peak = max(peak or 0.0, matmul_peak())
                row = run(depth, ranks, optimizer, steps, args.seq_len, args.device_batch_size, args.device)
                pair[optimizer] = row
                rows.append(row)
                print(f"d{depth:<3} {ranks} rank(s) {optimizer:>6}: {row['step_ms']:8.0f} ms/step "
                      f"{row['tokens_per_s']:8.0f} tok/s", flush=True)
            for row in pair.values():
                row["vs_adamw"] = row["step_ms"] / pair["adamw"]["step_ms"]
    if peak is not None:
        for row in rows:
            row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / (peak * row["ranks"])
    notes = (f"Median step time over the steps after the first; seq_len {args.seq_len}, "
             f"{args.device_batch_size} sequences per rank per step, one thread per rank. 'load avg' is the "
             f"1-minute load average when the run started: above the core count, other jobs shared the cores. ")
    if peak is not None:
        source = "given" if args.peak_gflops else "the best measured single-thread fp32 1024³ matmul rate,"
        notes += (f"MFU is relative to {source} {peak / 1e9:.1f} GFLOP/s per rank; it counts model FLOPs only, "
                  f"so Muon's orthogonalization is overhead.")
    paths = write_report(args.out, "training", "Training throughput: Muon hybrid vs AdamW", rows, COLUMNS, notes)
    print(notes)
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
