"""Muon vs AdamW: one GPT trained on the same tokens by AdamW alone and by Muon + AdamW with each orthogonalizer.

Every run is the real training command, `torch_impl.training.main.main(argv)`, called in this process as a
single rank (no torchrun, no process group): the nanochat GPT with byte tokens on the default
corpus (the Python standard library's source), the same steps, batch, schedules and evaluation
set. Only the optimizer of the block matrices changes between configurations:

- adamw: `--optimizer adamw`, AdamW for every parameter (the baseline);
- one configuration per orthogonalizer of torch_impl.orthogonalizers.registry.ORTHOGONALIZERS: the nanochat hybrid
  (Muon for the block matrices, AdamW for the embedding, lm_head and scalars) with
  `--orthogonalizer NAME` at its published step count (default_steps), computed in the trainer's
  --ns-dtype auto (float32 on CPU, bfloat16 on CUDA).

Each configuration runs once per seed (the trainer's --seed). The validation bits per byte of
every evaluation, and the training time up to it, are read back from each run's metrics.jsonl.

    python -m benchmarks.study --quick                 # depth 2, 80 steps, 2 seeds, 8 configs: ~2.5 min on CPU
    python -m benchmarks.study --device cuda           # depth 6, 600 steps, 3 seeds: meant for a GPU
    python -m benchmarks.study --quick --methods newton_schulz polar_express --seeds 3 --keep-runs runs/study

The folder --out gets results.json, report.md and study_bpb_vs_step.png / study_bpb_vs_time.png
(benchmarks/results.py). The other half of the study, the singular values of one matrix's update
under each orthogonalizer, is benchmarks/spectra.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shlex
import statistics
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from benchmarks.harness import positive_int, resolve_device
from benchmarks.results import Suite, Table, cli_main, pyplot
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.orthogonalizers.registry import ORTHOGONALIZERS, default_steps
from torch_impl.tools.plot import load_metrics, with_time
from torch_impl.training.lr_schedule import muon_momentum
from torch_impl.training.main import main as train_main

ADAMW = "adamw"  # the config name of the AdamW-only baseline; the others are orthogonalizer names


@dataclass(frozen=True)
class Settings:
    """The sizes of the runs: --quick or full defaults, with the flags given on top."""
    depth: int
    seq_len: int
    batch_size: int
    steps: int
    eval_every: int
    eval_tokens: int
    seeds: int
    max_corpus_bytes: int | None


# Quick: sized for ~2.5 min of all 16 runs on one CPU thread each (~60 ms a step). The corpus is capped
# at 2 MB: each run plans itself (reads and tokenizes the corpus), and 80 steps of 1024 tokens read
# only its start.
QUICK = Settings(depth=2, seq_len=128, batch_size=8, steps=80, eval_every=10, eval_tokens=16384, seeds=2,
                 max_corpus_bytes=2_000_000)
# Full: for a GPU. 600 steps of 16384 tokens (9.8 M) stay within one pass over the training split
# (~10.7 M byte tokens), so no run sees a batch twice.
FULL = Settings(depth=6, seq_len=512, batch_size=32, steps=600, eval_every=50, eval_tokens=262144, seeds=3,
                max_corpus_bytes=None)


def mean_or_none(values) -> float | None:
    """The mean of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fresh_dir(text: str) -> Path:
    # the trainer refuses a run directory that holds a previous run: say so before any run starts
    path = Path(text)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise argparse.ArgumentTypeError(f"{path} must be a new or empty directory")
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[3:]))
    p.add_argument("--quick", action="store_true",
                   help=f"CPU-sized: depth {QUICK.depth}, {QUICK.steps} steps of {QUICK.batch_size}x{QUICK.seq_len} "
                        f"tokens, {QUICK.seeds} seeds (full: depth {FULL.depth}, {FULL.steps} steps of "
                        f"{FULL.batch_size}x{FULL.seq_len}, {FULL.seeds} seeds)")
    p.add_argument("--out", type=Path, default=Path("reports/study"), help="results folder (default: reports/study)")
    p.add_argument("--methods", nargs="+", choices=tuple(ORTHOGONALIZERS), default=list(ORTHOGONALIZERS),
                   metavar="NAME", help="orthogonalizers to run with Muon (default: all: "
                                        + ", ".join(ORTHOGONALIZERS) + ")")
    p.add_argument("--no-adamw", action="store_true", help="leave out the AdamW-only baseline")
    p.add_argument("--seeds", type=positive_int, help="runs per configuration, seeds 0..N-1")
    p.add_argument("--steps", type=positive_int, help="optimizer steps per run")
    p.add_argument("--depth", type=positive_int, help="GPT depth (width 64 * depth, head_dim 64)")
    p.add_argument("--seq-len", type=positive_int, help="context length in tokens")
    p.add_argument("--batch-size", type=positive_int, help="sequences per step (the trainer's --device-batch-size)")
    p.add_argument("--eval-every", type=positive_int, help="evaluate every N steps (and at the start and the end)")
    p.add_argument("--eval-tokens", type=positive_int, help="validation tokens per evaluation")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="the trainer's --device")
    p.add_argument("--threads", type=positive_int,
                   help="torch intra-op threads during the runs (default on CPU: 1; on CUDA: left as it is)")
    p.add_argument("--keep-runs", type=_fresh_dir, metavar="DIR",
                   help="keep every run's directory (metrics.jsonl, config.json) as DIR/CONFIG-seedN; "
                        "default: temporary, deleted")
    return p


def settings(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    return Settings(**{**vars(base), **given})


def train_argv(config: str, seed: int, s: Settings, device: str, out_dir: Path) -> list[str]:
    """The command line of one run (after `python -m torch_impl.train`)."""
    argv = ["--depth", str(s.depth), "--seq-len", str(s.seq_len), "--device-batch-size", str(s.batch_size),
            "--steps", str(s.steps), "--eval-every", str(s.eval_every), "--eval-tokens", str(s.eval_tokens),
            "--seed", str(seed), "--device", device, "--out-dir", str(out_dir),
            "--no-checkpoint", "--sample-tokens", "0"]  # the study reads metrics only
    if s.max_corpus_bytes is not None:
        argv += ["--max-corpus-bytes", str(s.max_corpus_bytes)]
    return argv + (["--optimizer", "adamw"] if config == ADAMW else ["--orthogonalizer", config])


def run_training(argv: list[str], out_dir: Path) -> dict:
    """One training run in this process; its val records (with "_time", the training time up to that
    step), its summary record, its config.json and its wall time. RuntimeError with the trainer's
    last words if it fails."""
    printed, errors = io.StringIO(), io.StringIO()  # the trainer's per-step log would drown the study's
    t = time.perf_counter()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        try:
            rc = train_main(argv)
        except SystemExit as e:  # the trainer's argparse rejecting a flag
            rc = e.code
    wall = time.perf_counter() - t
    if rc != 0:
        said = (errors.getvalue().strip() or printed.getvalue().strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"python -m torch_impl.train {shlex.join(argv)} exited with {rc}: {said}")
    records = load_metrics(out_dir)
    with_time({"run": records})  # the same training-time axis as `python -m torch_impl.plot --x time`
    return dict(val=records["val"], summary=records["summary"][-1], wall=wall,
                config=json.loads((out_dir / "config.json").read_text()))


def measure(args: argparse.Namespace) -> Suite:
    if "RANK" in os.environ:
        # train.main would join torchrun's process group: every rank would run the whole study
        raise RuntimeError("run the study as one process, not under torchrun (each run is one rank)")
    device = resolve_device(args.device)  # --device cuda without a GPU: the suite is skipped, not failed
    s = settings(args)
    configs = ([] if args.no_adamw else [ADAMW]) + list(dict.fromkeys(args.methods))
    runs: dict[tuple[str, int], dict] = {}
    total = len(configs) * s.seeds
    # One thread on CPU: on cores shared with other jobs, torch's default (one per core) spins OpenMP
    # threads against them and a run gets 10-30x slower at random (measured: the same 60 steps in 1.9 s
    # and in 55 s); one thread is ~1.6x slower on an idle machine and steady on a busy one.
    threads = args.threads or (1 if device == "cpu" else None)
    before = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if threads is not None:
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, before)
        root = args.keep_runs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="study-")))
        # seed-major: every configuration of a seed runs back to back, so a slow spell of the machine
        # (other jobs) falls on all configurations rather than on one
        for seed in range(s.seeds):
            for config in configs:
                out_dir = root / f"{config}-seed{seed}"
                run = runs[config, seed] = run_training(train_argv(config, seed, s, device, out_dir), out_dir)
                gc.collect()  # free the finished run's model and optimizer before the next one
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                print(f"study: {len(runs)}/{total} {config} seed {seed}: val bpb {run['val'][-1]['val_bpb']:.4f}, "
                      f"training {run['summary']['total_time']:.1f} s, run {run['wall']:.1f} s", flush=True)
    final, curves = tables(configs, s, runs)
    threads = torch.get_num_threads() if threads is None else threads
    return Suite(name="study", tables=[final, curves], notes=notes(configs, s, runs, threads),
                 figures={"bpb_vs_step": figure(configs, s, runs, "step"),
                          "bpb_vs_time": figure(configs, s, runs, "time")},
                 config=dict(vars(s), device=args.device, threads=threads))


def tables(configs: list[str], s: Settings, runs: dict) -> tuple[Table, Table]:
    tokens_per_step = next(iter(runs.values()))["config"]["total_batch_size"]
    final_rows, curve_rows = [], []
    for config in configs:
        mine = [runs[config, seed] for seed in range(s.seeds)]
        last = [r["val"][-1]["val_bpb"] for r in mine]
        final_rows.append(dict(
            config=config, optimizer="AdamW" if config == ADAMW else "Muon + AdamW",
            orthogonalizer=None if config == ADAMW else config,
            iterations=None if config == ADAMW else default_steps(config),
            steps=s.steps, tokens=s.steps * tokens_per_step,
            bpb_mean=statistics.fmean(last), bpb_min=min(last), bpb_max=max(last),
            best_bpb_mean=statistics.fmean(min(v["val_bpb"] for v in r["val"]) for r in mine),
            train_s=statistics.fmean(r["summary"]["total_time"] for r in mine),
            run_s=statistics.fmean(r["wall"] for r in mine),
            # None after a 1-step run (the trainer times steps after the first only)
            tokens_per_s=mean_or_none(r["summary"]["tokens_per_s"] for r in mine)))
        for seed, r in enumerate(mine):
            curve_rows += [dict(config=config, seed=seed, step=v["step"], tokens=v["step"] * tokens_per_step,
                                val_bpb=v["val_bpb"], val_loss=v["val_loss"], train_s=v["_time"]) for v in r["val"]]
    if ADAMW in configs:
        baseline = next(r["bpb_mean"] for r in final_rows if r["config"] == ADAMW)
        for row in final_rows:
            row["vs_adamw"] = row["bpb_mean"] - baseline
    final = Table(
        "final", "Final validation bits per byte, by configuration (over seeds)",
        [("config", "config"), ("optimizer", "block matrices"), ("iterations", "orth. iterations"),
         ("steps", "steps"), ("tokens", "tokens"), ("bpb_mean", "final val bpb, mean"), ("bpb_min", "min"),
         ("bpb_max", "max"), *([("vs_adamw", "mean − AdamW's")] if ADAMW in configs else []),
         ("best_bpb_mean", "best val bpb, mean"), ("train_s", "training s, mean"), ("run_s", "run s, mean"),
         ("tokens_per_s", "tokens/s, mean")],
        final_rows, key=("config",), metric="bpb_mean", lower_is_better=True, spread=("bpb_min", "bpb_max"))
    curves = Table(
        "curves", "Validation bits per byte at every evaluation, every run",
        [("config", "config"), ("seed", "seed"), ("step", "step"), ("tokens", "tokens"), ("val_bpb", "val bpb"),
         ("val_loss", "val loss"), ("train_s", "training s")],
        curve_rows, key=("config", "seed", "step"), metric=None)
    return final, curves


def figure(configs: list[str], s: Settings, runs: dict, x: str):
    """Val bpb per configuration against the step or the training time: the mean over seeds as a
    line, the min–max over seeds as a band; the right panel zooms on the second half of the run,
    where the configurations differ by hundredths of a bit."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    # the zoom's box: every configuration's evaluations from the middle step on
    box = dict(x0=float("inf"), x1=float("-inf"), y0=float("inf"), y1=float("-inf"))
    for i, config in enumerate(configs):
        mine = [runs[config, seed]["val"] for seed in range(s.seeds)]  # same evaluation steps in every run
        bpb = list(zip(*[[v["val_bpb"] for v in val] for val in mine]))
        xs = [statistics.fmean(v["step"] if x == "step" else v["_time"] for v in at) for at in zip(*mine)]
        mean, lo, hi = [statistics.fmean(b) for b in bpb], [min(b) for b in bpb], [max(b) for b in bpb]
        baseline = config == ADAMW  # drawn in black, thicker and dashed: the reference the others are read against
        style = dict(color="black", lw=2.4, ls="--") if baseline else dict(color=f"C{i}", lw=1.5)
        label = "AdamW only" if baseline else f"Muon + {config} ({default_steps(config)} it.)"
        for ax in axes:
            ax.plot(xs, mean, marker="o", ms=2.5, label=label, **style)
            ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.12 if baseline else 0.18, lw=0)
        half = [j for j, v in enumerate(mine[0]) if v["step"] >= s.steps / 2]
        box.update(x0=min(box["x0"], *(xs[j] for j in half)), x1=max(box["x1"], *(xs[j] for j in half)),
                   y0=min(box["y0"], *(lo[j] for j in half)), y1=max(box["y1"], *(hi[j] for j in half)))
    pad = 0.05 * (box["y1"] - box["y0"]) or 0.01
    axes[1].set_ylim(box["y0"] - pad, box["y1"] + pad)
    axes[1].set_xlim(box["x0"], box["x1"] + 0.02 * (box["x1"] - box["x0"]))
    xlabel = "step" if x == "step" else "training time, s (mean over seeds; evaluation excluded)"
    for ax, title in zip(axes, ("whole run", "second half (zoom)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per byte")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    band = f"band: min–max over {s.seeds} seeds" if s.seeds > 1 else "1 seed"
    fig.suptitle(f"GPT depth {s.depth}, {s.steps} steps of {s.batch_size}×{s.seq_len} byte tokens: "
                 f"mean val bpb over seeds ({band})")
    return fig


def notes(configs: list[str], s: Settings, runs: dict, threads: int) -> str:
    run = next(iter(runs.values()))["config"]  # config.json: what the trainer resolved (sizes, lrs, dtype)
    a, model, per_step = run["args"], run["model_config"], run["total_batch_size"]
    warmup = a["momentum_warmup_steps"]
    with torch.device("meta"):  # the parameter count without allocating the model
        params = GPT(GPTConfig(**model)).num_params()
    micro = s.batch_size * s.seq_len
    eval_tokens = max(1, s.eval_tokens // micro) * micro  # the trainer evaluates whole micro-batches
    corpus = "the Python standard library's source" + (
        f" (its first {s.max_corpus_bytes:,} bytes)" if s.max_corpus_bytes else "")
    return "\n\n".join([
        f"Configurations: {', '.join(configs)}. Model: nanochat GPT, depth {model['n_layer']}, width "
        f"{model['n_embd']}, {model['n_head']} heads, vocab {model['vocab_size']} (byte tokens), {params:,} "
        f"parameters. Data: {corpus}, {a['val_fraction']:.0%} of the documents held out for validation. "
        f"{s.steps} steps of {per_step:,} tokens ({s.batch_size} sequences × {s.seq_len}, one process on "
        f"{run['device']}) = {s.steps * per_step:,} tokens per run.",

        f"Optimizers: the trainer's (nanochat's) defaults, not tuned per configuration, so each method is "
        f"compared at one learning rate, not at its best. Muon lr {a['matrix_lr']} for the block matrices, "
        f"momentum {muon_momentum(0, warmup):.2f} at the first step and {muon_momentum(s.steps - 1, warmup):.3f} "
        f"at the last (the trainer ramps it to 0.95 over {warmup} steps); AdamW-only uses lr "
        f"{a['adamw_matrix_lr']} for them. Both use AdamW for the embedding (lr {a['embedding_lr']}), lm_head "
        f"({a['unembedding_lr']}) and scalars, scaled by (width/768)^-0.5. Schedule: warmup ratio "
        f"{a['warmup_ratio']}, linear warmdown over the last {a['warmdown_ratio']:.0%} of the steps. "
        f"Orthogonalizers at their published iteration counts, computed in {run['ns_dtype']}.",

        f"Evaluation: val bpb (nats / (ln 2 · bytes)) on the same {eval_tokens:,} tokens (the start of the "
        f"validation split) at step 0, every {s.eval_every} steps and at the end. 'best' is the lowest of a "
        "run's evaluations. The curves need not fall steadily: the trainer reads the corpus in order (sorted "
        "files, no shuffling), so the fit to the validation text rises and falls with the files just trained "
        "on, alike for every configuration.",

        f"Seeds 0..{s.seeds - 1}: the trainer's --seed sets the weight initialization only. The data order is "
        "the same in every run (the trainer walks the token stream in a fixed order and has no data seed), so "
        "for a given seed every configuration starts from the same weights and sees the same batches, and the "
        "spread over seeds is that of the initialization alone. Plots: the line is the mean over seeds, the "
        f"band the min–max over the {s.seeds} seeds at each evaluation (a range, not a confidence interval).",

        "Times: 'training s' is the sum of the trainer's logged step times (forward, backward, optimizer "
        "step; evaluation, corpus loading and model building excluded), the x axis of bpb_vs_time (there "
        "averaged over seeds at each evaluation); 'run s' is the wall time of the whole trainer call, "
        "evaluation and planning included; tokens/s is the trainer's steady-state rate (the steps after the "
        f"first). The runs go one after another in this process, {threads} torch thread(s) each, the "
        "configurations of a seed back to back. On shared CPU cores times still vary from run to run by more "
        "than the orthogonalizers' cost at these sizes; the bpb numbers do not depend on timing.",
    ])


def main(argv: list[str] | None = None) -> int:
    return cli_main(parser(), measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
