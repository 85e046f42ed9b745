"""
Pretrain a nanochat-style GPT with Muon + AdamW, on one process or many.

    python -m torch_impl.train --depth 4 --steps 200                       # one process, no process group
    torchrun --standalone --nproc_per_node=2 -m torch_impl.train --depth 4  # data parallel, 2 ranks

On CPU the ranks talk over gloo, on CUDA over NCCL with one GPU per rank and bf16 autocast. The
parallelism is nanochat's: every rank holds the whole model and reads its own slice of each batch;
there is no DDP wrapper, because DistMuon / DistAdamW (ZeRO-2) average the gradients themselves with a
reduce-scatter, update the shard each rank owns, and all-gather the new weights.

One optimizer step = grad_accum micro-batches per rank, so the tokens per step (--total-batch-size) do
not depend on the number of ranks. The run is deterministic: the data walk is fixed and the schedules
are pure functions of the step, so a run resumed from a checkpoint reproduces the losses of an
uninterrupted one bit for bit.

Everything (arguments, corpus, tokenizer, batch arithmetic, a checkpoint to resume) is validated before
the output directory is touched: a bad invocation exits with a message and code 2, and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from torch_impl import schedule
from torch_impl.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_training_state,
                                   model_config, read_meta, resolve_checkpoint, save_checkpoint)
from torch_impl.corpus import CorpusError, load_corpus
from torch_impl.dataloader import (DistributedTokenLoader, bits_per_byte, bpb_sums, split_documents,
                                   token_bytes, tokenize_documents)
from torch_impl.distributed import DEFAULT_TIMEOUT
from torch_impl.finite import NonFiniteGradientError
from torch_impl.gpt import GPT, GPTConfig
from torch_impl.muon import ORTHOGONALIZERS
from torch_impl.optim import HybridOptimizer, label_param
from torch_impl.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched against
# torch.cuda.get_device_name() in this order (more specific names first). MFU is only reported where the
# peak is known: on CPU it depends on the core count, SIMD width and clock, so pass --peak-flops.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


class UsageError(ValueError):
    """An invocation that cannot run; reported as `error: ...` with exit code 2."""


class RunComplete(Exception):
    """--resume of a run that already reached its last step: nothing to do, exit code 0 (so a job script
    that always passes --resume can be restarted after the run finished)."""


# -----------------------------------------------------------------------------
# command line

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show a flag's default unless it is None/False or the help text already explains it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torch_impl.train",
        description="Pretrain a nanochat-style GPT with Muon + AdamW. Runs as a single process "
                    "(python -m torch_impl.train) or data-parallel under torchrun.",
        epilog="examples:\n"
               "  torchrun --standalone --nproc_per_node=2 -m torch_impl.train --depth 2 --seq-len 128 --steps 400\n"
               "  torchrun --standalone --nproc_per_node=2 -m torch_impl.train --depth 2 --seq-len 128 --steps 400 "
               "--resume\n"
               "  python -m torch_impl.sample --checkpoint runs/d2 --prompt 'def '\n"
               "  python -m torch_impl.export --checkpoint runs/d2 --out runs/d2/model.safetensors",
        formatter_class=_HelpFormatter)

    g = p.add_argument_group("model (nanochat sizing: width = 64 * depth, head_dim 64)")
    g.add_argument("--depth", type=int, default=4, help="number of transformer blocks (n_layer)")
    g.add_argument("--n-embd", type=int, default=None, help="model width; default 64 * depth")
    g.add_argument("--n-head", type=int, default=None, help="query heads; default n_embd // 64 (head_dim 64)")
    g.add_argument("--n-kv-head", type=int, default=None, help="key/value heads (GQA); default n_head")
    g.add_argument("--seq-len", type=int, default=256, help="context length in tokens (nanochat: 2048)")

    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files, directories (walked recursively) or parquet files with a 'text' column; "
                        "default: the Python standard library's source, found on this machine")
    g.add_argument("--max-corpus-bytes", type=int, default=None,
                   help="read at most this many bytes of the corpus (default: all of it)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the documents held out")
    g.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte",
                   help="byte: UTF-8 bytes, vocab 257; bpe: byte-level BPE trained on the training split")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (--tokenizer bpe only)")

    g = p.add_argument_group("batch and length (tokens per step do not depend on the number of ranks)")
    g.add_argument("--device-batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    g.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per optimizer step; must be a multiple of device_batch_size * seq_len * "
                        "world_size, the quotient being the gradient accumulation steps "
                        "(default: one micro-batch per rank, no accumulation; nanochat: 524288)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="number of optimizer steps")
    length.add_argument("--token-budget", type=int, default=None,
                        help="train on this many tokens (steps = budget // total_batch_size)")
    g.add_argument("--param-data-ratio", type=float, default=20.0,
                   help="without --steps/--token-budget: tokens = ratio * parameters (Chinchilla, nanochat)")

    g = p.add_argument_group("optimizer (nanochat defaults; AdamW lrs are scaled by (n_embd/768)^-0.5)")
    g.add_argument("--optimizer", choices=("hybrid", "adamw"), default="hybrid",
                   help="hybrid: Muon for block matrices + AdamW for the rest; adamw: AdamW for everything "
                        "(a baseline)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head")
    g.add_argument("--adamw-matrix-lr", type=float, default=0.003,
                   help="AdamW lr of the block matrices (--optimizer adamw only)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled weight decay of the block matrices (the embedding and lm_head are not decayed)")
    g.add_argument("--cautious-wd", action="store_true",
                   help="Muon: decay only where the update and the weight agree in sign")
    g.add_argument("--normuon-beta2", type=float, default=None,
                   help="Muon: enable NorMuon's per-neuron second moment with this beta2 (e.g. 0.95)")
    g.add_argument("--orthogonalizer", choices=tuple(ORTHOGONALIZERS), default="newton_schulz",
                   help="how Muon orthogonalizes its update")
    g.add_argument("--ns-steps", type=int, default=5, help="orthogonalizer iterations")
    g.add_argument("--ns-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="orthogonalizer compute dtype; auto: bfloat16 on CUDA, float32 on CPU (CPUs without "
                        "AVX512-BF16 emulate bf16 matmuls, 10-40x slower)")
    g.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip the global norm of the rank-averaged gradient to this value; 0 = off. Costs "
                        "one extra all-reduce of all gradients per step")

    g = p.add_argument_group("schedules (nanochat: flat lr then linear warmdown; Muon momentum warmup)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear lr warmup")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear lr warmdown")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="lr multiplier reached at the end")
    g.add_argument("--momentum-warmup-steps", type=int, default=300,
                   help="Muon momentum goes 0.85 -> 0.95 linearly over this many steps")

    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument("--eval-every", type=int, default=250,
                   help="validation loss / bits-per-byte every N steps (and at the start and end); 0 = end only")
    g.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per evaluation")
    g.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps; 0 = at the end only")
    g.add_argument("--no-checkpoint", action="store_true",
                   help="write no checkpoint, not even at the end (benchmarks, throwaway runs)")
    g.add_argument("--out-dir", default=None, help="run directory (metrics.jsonl, config.json, checkpoints/); "
                                                   "default runs/d<depth>")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue a run: from the latest checkpoint in --out-dir, or from CKPT (a checkpoint "
                        "directory or a run directory); model, optimizer, step and data position are restored. "
                        "The flags must describe the same model, data and optimizer (checked); the schedule "
                        "follows this run's --steps")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out-dir that holds a previous run (deletes its checkpoints and metrics)")
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this step with a checkpoint, as if preempted (the schedule still spans "
                        "--steps); --resume continues")
    g.add_argument("--sample-tokens", type=int, default=200, help="tokens of sample text at the end; 0 = none")
    g.add_argument("--sample-prompt", default="", help="prompt of the final sample")

    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="seed of the weight init and of sampling")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s of one device, for MFU (default: a table of GPUs; none on CPU)")
    return p


# -----------------------------------------------------------------------------
# processes and devices

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> Dist:
    """A process group if launched by torchrun (RANK in the environment), none otherwise. The finite timeout
    turns a rank that died into an error on the others instead of a hang."""
    if device_arg == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    elif device_arg in ("cpu", "cuda"):
        device_type = device_arg
    else:
        raise UsageError(f"--device must be auto, cpu or cuda, got {device_arg!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device(device_type))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=DEFAULT_TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=DEFAULT_TIMEOUT)
    return Dist(rank, local_rank, world, device)


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def autocast(device: torch.device):
    # bf16 autocast on CUDA, as nanochat; on CPU fp32 (bf16 matmuls are emulated on CPUs without AVX512-BF16)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# gradient clipping on the synchronised gradient

@torch.no_grad()
def clip_grad_norm_synchronized_(params, max_norm: float, group=None) -> torch.Tensor:
    """Average the gradients over the ranks of `group` in place, then scale them so that the global norm of
    that average is at most max_norm. Returns the norm before clipping (fp32 scalar).

    Why average first: DistMuon / DistAdamW average gradients inside their step, so clipping must act on
    the mean gradient g = (1/N) sum_r g_r. Its norm is not recoverable from per-rank norms (sum_r |g_r|^2
    is the mean of squares, not |g|^2), and clipping each g_r by its own norm gives a different direction.
    After the all_reduce every rank holds g exactly, so the optimizer's own reduce-scatter averages N
    identical copies: its result is g again (exactly for N = 2; for larger N the sum of N copies may round,
    leaving g within an ulp or so), at the price of one extra all-reduce of the gradients, which is why
    clipping is off by default.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        # one flat buffer per dtype: a single collective instead of one per parameter
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
            offset = 0
            for g in same:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
    # sqrt of a sum of squares in fp32: torch's CPU vector_norm loses accuracy on large tensors
    total = torch.stack([g.float().square().sum() for g in grads]).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total


# -----------------------------------------------------------------------------
# the plan: everything validated, nothing written

@dataclass
class Plan:
    args: argparse.Namespace
    config: GPTConfig
    tokenizer: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    num_docs: tuple[int, int]
    grad_accum: int
    total_batch_size: int
    num_steps: int
    eval_steps: int
    out_dir: Path
    ns_dtype: torch.dtype
    resume_from: Path | None
    resume_meta: dict | None


def model_config_from_args(args, vocab_size: int) -> GPTConfig:
    n_embd = args.n_embd if args.n_embd is not None else 64 * args.depth
    n_head = args.n_head if args.n_head is not None else max(1, n_embd // 64)
    n_kv_head = args.n_kv_head if args.n_kv_head is not None else n_head
    try:
        return GPTConfig(sequence_len=args.seq_len, vocab_size=vocab_size, n_layer=args.depth, n_head=n_head,
                         n_kv_head=n_kv_head, n_embd=n_embd)
    except ValueError as e:
        raise UsageError(f"impossible model: {e} (--n-embd defaults to 64 * depth, --n-head to n_embd // 64, "
                         f"--n-kv-head to n_head)") from None


def check_arguments(args) -> None:
    """Checks that need no data."""
    positive = ("depth", "seq_len", "device_batch_size", "ns_steps", "eval_tokens")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("total_batch_size", "steps", "token_budget", "max_corpus_bytes", "stop_at"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("eval_every", "checkpoint_every", "sample_tokens", "momentum_warmup_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "adamw_matrix_lr", "weight_decay", "grad_clip",
                 "param_data_ratio"):
        v = getattr(args, name)
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.normuon_beta2 is not None and not 0 <= args.normuon_beta2 < 1:
        raise UsageError(f"--normuon-beta2 must be in [0, 1), got {args.normuon_beta2}")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.tokenizer == "bpe" and args.vocab_size < 257:
        raise UsageError(f"--vocab-size must be >= 257 (256 bytes + <|bos|>), got {args.vocab_size}")
    if args.tokenizer == "bpe" and importlib.util.find_spec("tokenizers") is None:
        raise UsageError("--tokenizer bpe needs the HuggingFace `tokenizers` package (pip install tokenizers)")
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    if args.no_checkpoint and (args.stop_at is not None or args.checkpoint_every > 0):
        raise UsageError("--no-checkpoint contradicts --stop-at and --checkpoint-every")


def build_tokenizer(args, train_docs: list[str], d: Dist):
    if args.tokenizer == "byte":
        return ByteTokenizer()
    # BPE training is not guaranteed to break ties identically everywhere: train once, broadcast the result
    # (as the tokenizer's JSON file, through the system temp dir: nothing lands in out_dir before validation)
    payload = [None]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        if d.master:
            tok = BPETokenizer.train(train_docs, args.vocab_size)
            tok.save(path)
            payload = [path.read_text()]
        if d.active:
            dist.broadcast_object_list(payload, src=0)
        if not d.master:
            path.write_text(payload[0])
            tok = BPETokenizer.load(path)
    return tok


def plan_run(args, d: Dist) -> Plan:
    check_arguments(args)
    out_dir = Path(args.out_dir if args.out_dir is not None else f"runs/d{args.depth}")

    # which checkpoint to resume from, and what it says
    resume_from, resume_meta = None, None
    if args.resume is not None:
        try:
            if args.resume == "latest":
                resume_from = latest_checkpoint(out_dir)
                if resume_from is None:
                    raise CheckpointError(f"--resume: no checkpoint in {out_dir}/checkpoints to resume from")
            else:
                resume_from = resolve_checkpoint(args.resume)
            resume_meta = read_meta(resume_from)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
    elif out_dir.exists() and not args.overwrite and (list_checkpoints(out_dir) or (out_dir / METRICS_FILE).exists()):
        raise UsageError(f"{out_dir} holds a previous run; pass --resume to continue it, --overwrite to replace "
                         f"it, or choose another --out-dir")

    # corpus -> split -> tokenizer -> token streams
    try:
        docs = load_corpus(args.data, args.max_corpus_bytes)
        train_docs, val_docs = split_documents(docs, args.val_fraction)
    except (CorpusError, ImportError) as e:  # ImportError: parquet without pyarrow
        raise UsageError(f"corpus: {e}") from None
    except ValueError as e:
        raise UsageError(f"corpus: {e} (a single text file is one document: pass several files or a "
                         f"directory)") from None
    if resume_from is not None:
        try:
            tokenizer = load_tokenizer(resume_from)
        except (OSError, ValueError, ImportError) as e:
            raise UsageError(f"--resume: cannot load the checkpoint's tokenizer: {e}") from None
        if tokenizer.kind != args.tokenizer:
            raise UsageError(f"--resume: checkpoint {resume_from} was trained with the {tokenizer.kind} tokenizer, "
                             f"this run asks for --tokenizer {args.tokenizer}")
    else:
        tokenizer = build_tokenizer(args, train_docs, d)
    train_tokens = tokenize_documents(train_docs, tokenizer)
    val_tokens = tokenize_documents(val_docs, tokenizer)

    # model and batch arithmetic
    config = model_config_from_args(args, tokenizer.vocab_size)
    micro_tokens = args.device_batch_size * args.seq_len * d.world_size
    total_batch_size = args.total_batch_size if args.total_batch_size is not None else micro_tokens
    if total_batch_size % micro_tokens:
        raise UsageError(
            f"--total-batch-size {total_batch_size} is not a multiple of device_batch_size * seq_len * world_size "
            f"= {args.device_batch_size} * {args.seq_len} * {d.world_size} = {micro_tokens}; try "
            f"{max(1, round(total_batch_size / micro_tokens)) * micro_tokens}")
    grad_accum = total_batch_size // micro_tokens
    if args.steps is not None:
        num_steps = args.steps
    else:
        budget = args.token_budget
        if budget is None:
            with torch.device("meta"):
                budget = int(args.param_data_ratio * GPT(config).num_params())
        num_steps = budget // total_batch_size
        if num_steps < 1:
            raise UsageError(f"a token budget of {budget} is less than one step of {total_batch_size} tokens")
    try:
        schedule.validate(num_steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    except ValueError as e:
        raise UsageError(f"schedule: {e}") from None
    if args.stop_at is not None and args.stop_at > num_steps:
        raise UsageError(f"--stop-at {args.stop_at} is past the end of the run ({num_steps} steps)")
    for name, stream in (("training", train_tokens), ("validation", val_tokens)):
        if len(stream) < micro_tokens + 1:
            raise UsageError(f"the {name} split has {len(stream)} tokens, fewer than one micro-batch of all ranks "
                             f"(device_batch_size * seq_len * world_size + 1 = {micro_tokens + 1}); use more data, "
                             f"a smaller --device-batch-size or a shorter --seq-len")
    # evaluate on whole micro-batches, never wrapping around the validation stream (that would count
    # tokens twice)
    eval_steps = max(1, min(args.eval_tokens // micro_tokens, (len(val_tokens) - 1) // micro_tokens))

    ns_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "auto": torch.bfloat16 if d.device.type == "cuda" else torch.float32}[args.ns_dtype]

    if resume_meta is not None:
        check_resume(resume_from, resume_meta, config, args, train_tokens, num_steps)
    return Plan(args, config, tokenizer, train_tokens, val_tokens, (len(train_docs), len(val_docs)), grad_accum,
                total_batch_size, num_steps, eval_steps, out_dir, ns_dtype, resume_from, resume_meta)


def check_resume(ckpt: Path, meta: dict, config: GPTConfig, args, train_tokens, num_steps: int) -> None:
    """A checkpoint of a different model, tokenizer, corpus or optimizer cannot continue this run."""
    saved = model_config(meta)
    if saved != config:
        diff = ", ".join(f"{k}: checkpoint {v} vs now {getattr(config, k)}"
                         for k, v in asdict(saved).items() if getattr(config, k) != v)
        raise UsageError(f"--resume: {ckpt} is a different model ({diff})")
    saved_args = meta.get("args", {})
    if saved_args.get("optimizer") != args.optimizer:
        raise UsageError(f"--resume: {ckpt} was trained with --optimizer {saved_args.get('optimizer')}, "
                         f"this run uses --optimizer {args.optimizer}")
    if meta["loader"]["num_tokens"] != len(train_tokens):
        raise UsageError(f"--resume: {ckpt} was trained on a token stream of {meta['loader']['num_tokens']} tokens, "
                         f"this run's has {len(train_tokens)}; were --data, --max-corpus-bytes, --val-fraction "
                         f"or the tokenizer changed?")
    if meta["step"] == num_steps:
        raise RunComplete(f"{ckpt} is the last step ({num_steps}) of this run: nothing to do")
    if meta["step"] > num_steps:
        raise UsageError(f"--resume: {ckpt} is at step {meta['step']}, past the end of this {num_steps}-step run")
    if args.stop_at is not None and args.stop_at <= meta["step"]:
        raise UsageError(f"--stop-at {args.stop_at} is not after the checkpoint's step {meta['step']}")


# -----------------------------------------------------------------------------
# model and optimizer

def build_optimizer(model: GPT, args, ns_dtype: torch.dtype, distributed: bool) -> HybridOptimizer:
    if args.optimizer == "hybrid":
        return model.setup_optimizers(
            unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr,
            weight_decay=args.weight_decay, distributed=distributed, orthogonalizer=args.orthogonalizer,
            ns_steps=args.ns_steps, ns_dtype=ns_dtype, normuon_beta2=args.normuon_beta2,
            cautious_weight_decay=args.cautious_wd)
    # AdamW for everything: the block matrices get their own group, the other groups are the hybrid's
    if distributed:
        from torch_impl.dist_adamw import DistAdamW as AdamCls
    else:
        from torch_impl.adamw import AdamW as AdamCls
    width = (model.config.n_embd / 768) ** -0.5
    lrs = {"muon": args.adamw_matrix_lr, "embedding": args.embedding_lr * width,
           "unembedding": args.unembedding_lr * width, "scalar": 0.5 * width}
    groups: dict[str, list] = {k: [] for k in lrs}
    for name, p in model.named_parameters():
        groups[label_param(name, p.shape)].append((name, p))
    param_groups = [dict(params=[p for _, p in ps], param_names=[n for n, _ in ps], lr=lrs[k],
                         weight_decay=args.weight_decay if k == "muon" else 0.0,
                         label="matrix" if k == "muon" else k)
                    for k, ps in groups.items() if ps]
    return HybridOptimizer(None, AdamCls(param_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0))


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model: GPT, tokens: np.ndarray, plan: Plan, d: Dist, tok_bytes: torch.Tensor) -> dict:
    """Mean per-token loss and bits per byte over plan.eval_steps micro-batches of every rank, summed over
    ranks before dividing (so the result is the same whatever the number of ranks)."""
    args = plan.args
    loader = DistributedTokenLoader(tokens, args.device_batch_size, args.seq_len, d.rank, d.world_size, d.device)
    sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # nats(bpb), bytes, loss sum, token count
    model.eval()
    for _ in range(plan.eval_steps):
        x, y = next(loader)
        with autocast(d.device):
            losses = model(x, y, loss_reduction="none")
        nats, nbytes = bpb_sums(losses, y, tok_bytes)
        sums += torch.stack([nats, nbytes.double(), losses.double().sum(), torch.tensor(y.numel(), device=d.device,
                                                                                           dtype=torch.float64)])
    model.train()
    if d.active:
        dist.all_reduce(sums)
    nats, nbytes, loss_sum, count = sums.tolist()
    return {"val_loss": loss_sum / count, "val_bpb": bits_per_byte(nats, nbytes)}


# -----------------------------------------------------------------------------
# logging

class Logger:
    """Rank 0 prints one line per event and appends it as JSON to metrics.jsonl; other ranks stay quiet.
    With a terminal, a tqdm bar shows progress and ETA, and lines are printed above it."""

    def __init__(self, out_dir: Path, d: Dist, total: int, initial: int, resume_step: int | None):
        self.master = d.master
        self.path = out_dir / METRICS_FILE
        self.bar = None
        if not self.master:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            # drop records past the checkpoint: the steps after it are about to be redone
            kept = []
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
                            file=sys.stdout)

    def print(self, text: str) -> None:
        if not self.master:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, text: str, **fields) -> None:
        if not self.master:
            return
        self.print(text)
        with self.path.open("a") as f:
            f.write(json.dumps(fields) + "\n")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -----------------------------------------------------------------------------
# the training loop

def train(plan: Plan, d: Dist) -> dict:
    args, config = plan.args, plan.config
    torch.manual_seed(args.seed)  # same seed on every rank: identical replicas without a broadcast
    if d.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=d.device)
    model.init_weights()
    optimizer = build_optimizer(model, args, plan.ns_dtype, d.active)
    train_model = torch.compile(model, dynamic=False) if args.compile else model
    loader = DistributedTokenLoader(plan.train_tokens, args.device_batch_size, args.seq_len, d.rank,
                                    d.world_size, d.device)
    tok_bytes = token_bytes(plan.tokenizer, d.device)

    start_step = 0
    if plan.resume_from is not None:
        meta = load_training_state(plan.resume_from, model, optimizer, d.rank)
        loader.load_state_dict(meta["loader"])
        start_step = meta["step"]

    # only now is anything written, once every rank has validated its inputs (otherwise a slow rank could
    # find rank 0's fresh metrics.jsonl and take it for a previous run)
    if d.active:
        dist.barrier()
    if d.master:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            shutil.rmtree(plan.out_dir / "checkpoints", ignore_errors=True)
        (plan.out_dir / CONFIG_FILE).write_text(json.dumps(dict(
            args=vars(args), model_config=asdict(config), world_size=d.world_size, grad_accum=plan.grad_accum,
            total_batch_size=plan.total_batch_size, num_steps=plan.num_steps, ns_dtype=str(plan.ns_dtype),
            device=str(d.device)), indent=2) + "\n")
    if d.active:
        dist.barrier()
    stop_at = args.stop_at or plan.num_steps
    log = Logger(plan.out_dir, d, plan.num_steps, start_step, start_step if plan.resume_from else None)

    flops_per_token = model.estimate_flops()
    peak = peak_flops(d.device, args.peak_flops)
    n_train, n_val = plan.num_docs
    log.print(f"model: {config} | {model.num_params():,} params | {flops_per_token:.3g} FLOPs/token")
    log.print(f"data: {n_train} train / {n_val} val docs, {len(plan.train_tokens):,} / {len(plan.val_tokens):,} "
              f"tokens ({plan.tokenizer!r}) | {d.world_size} rank(s) on {d.device.type} | "
              f"{plan.total_batch_size:,} tokens/step = {args.device_batch_size} x {args.seq_len} x "
              f"{d.world_size} ranks x {plan.grad_accum} accum | {plan.num_steps} steps, "
              f"{plan.num_steps * plan.total_batch_size:,} tokens")
    if plan.resume_from is not None:
        log.print(f"resumed from {plan.resume_from} at step {start_step}")

    def run_eval(step: int) -> dict:
        t = time.perf_counter()
        res = evaluate(model, plan.val_tokens, plan, d, tok_bytes)
        log.record(f"step {step:5d} | val loss {res['val_loss']:.4f} | val bpb {res['val_bpb']:.4f} | "
                   f"{time.perf_counter() - t:.1f}s", type="val", step=step, **res)
        return res

    last_val = None
    if start_step == 0 and args.eval_every > 0:
        last_val = run_eval(0)

    step = start_step
    times = []
    while step < stop_at:
        lrm = schedule.lr_multiplier(step, plan.num_steps, args.warmup_ratio, args.warmdown_ratio,
                                     args.final_lr_frac)
        momentum = schedule.muon_momentum(step, args.momentum_warmup_steps)
        optimizer.set_lr_multiplier(lrm)
        optimizer.set_muon_momentum(momentum)

        synchronize(d.device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=d.device)
        for _ in range(plan.grad_accum):
            x, y = next(loader)
            with autocast(d.device):
                loss = train_model(x, y)
            loss_sum += loss.detach()
            # each micro-batch's mean loss, scaled so the accumulated gradient is the mean over them
            (loss / plan.grad_accum).backward()
        grad_norm = None
        if args.grad_clip > 0:
            grad_norm = clip_grad_norm_synchronized_(model.parameters(), args.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = loss_sum / plan.grad_accum
        if d.active:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)  # the loss of the whole batch, for the log
        loss_value = mean_loss.item()  # also waits for the step to finish
        synchronize(d.device)
        dt = time.perf_counter() - t0
        step += 1
        times.append(dt)

        if not math.isfinite(loss_value):
            raise NonFiniteGradientError(f"loss is {loss_value} at step {step}: training diverged")
        tok_per_s = plan.total_batch_size / dt
        mfu = flops_per_token * tok_per_s / (peak * d.world_size) if peak else None
        text = (f"step {step:5d}/{plan.num_steps} | loss {loss_value:.6f} | lrm {lrm:.3f} | mom {momentum:.3f} | "
                f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu " + (f"{mfu:.2%}" if mfu is not None else "n/a"))
        if grad_norm is not None:
            text += f" | gnorm {grad_norm:.3f}"
        log.record(text, type="train", step=step, loss=loss_value, lr_multiplier=lrm, muon_momentum=momentum,
                   dt=dt, tokens_per_s=tok_per_s, mfu=mfu, grad_norm=grad_norm)
        log.advance()

        last = step == plan.num_steps
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            last_val = run_eval(step)
        if not args.no_checkpoint and (last or step == stop_at or
                                       (args.checkpoint_every > 0 and step % args.checkpoint_every == 0)):
            t = time.perf_counter()
            path = save_checkpoint(plan.out_dir, step, model, optimizer, plan.tokenizer, loader.state_dict(),
                                   dict(args=vars(args), optimizer=args.optimizer), d.rank)
            log.print(f"step {step:5d} | checkpoint {path} ({time.perf_counter() - t:.1f}s)")
    log.close()

    # steady-state throughput: the first step pays for warm-up (allocations, compilation)
    steady = times[1:] or times
    summary = dict(type="summary", step=step, steps_run=len(times), total_time=sum(times),
                   tokens_per_s=plan.total_batch_size * len(steady) / sum(steady) if steady else None)
    if summary["tokens_per_s"] is not None and peak:
        summary["mfu"] = flops_per_token * summary["tokens_per_s"] / (peak * d.world_size)
    if last_val is not None:
        summary.update(last_val)
    log.record(f"done: {len(times)} steps in {sum(times):.1f}s"
               + (f", {summary['tokens_per_s']:,.0f} tok/s after the first step" if summary["tokens_per_s"] else "")
               + (f", val bpb {last_val['val_bpb']:.4f}" if last_val else ""), **summary)

    if d.master and args.sample_tokens > 0 and step == plan.num_steps:
        from torch_impl.sample import generate_text
        log.print("sample:")
        print(args.sample_prompt, end="", flush=True)
        generate_text(model, plan.tokenizer, args.sample_prompt, args.sample_tokens, seed=args.seed, stream=sys.stdout)
        print(flush=True)
    return summary


def main(argv=None) -> int:
    # torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor and warns on every call site, on
    # every rank; the old names are what gloo and NCCL both support, so keep the log readable
    warnings.filterwarnings("ignore", message=r".*_tensor` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    d = None
    try:
        d = setup_distributed(args.device)
        plan = plan_run(args, d)
        train(plan, d)
        return 0
    except RunComplete as e:
        if d.master:
            print(e, flush=True)
        return 0
    except UsageError as e:
        if d is None or d.master:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteGradientError as e:
        if d is None or d.master:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
