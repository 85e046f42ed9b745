"""
Plan a training run: everything torch_impl.train needs, derived and validated, with nothing written.

`plan_run` reads the corpus, builds (or, on --resume, loads) the tokenizer, sizes the model, does the
batch arithmetic (micro-batches per rank, gradient accumulation, steps) and checks that a checkpoint to
resume can continue this run. Any problem is a UsageError raised before the output directory is touched,
so a bad invocation writes nothing. Every rank plans the same run from the same inputs; the only
communication is the broadcast of a freshly trained BPE tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from torch_impl.data.corpus import CorpusError, load_corpus
from torch_impl.data.loader import split_documents, tokenize_documents
from torch_impl.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.sharding.comm import broadcast_object
from torch_impl.training import lr_schedule
from torch_impl.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    model_config,
    resolve_checkpoint,
    verify_checkpoint,
)
from torch_impl.training.config import TrainConfig, UsageError
from torch_impl.training.runtime import Dist

# the run directory's files (besides checkpoints/)
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


class RunComplete(Exception):
    """--resume of a run that already reached its last step: nothing to do, exit code 0 (so a job script
    that always passes --resume can be restarted after the run finished)."""


@dataclass
class Plan:
    cfg: TrainConfig
    model_config: GPTConfig
    tokenizer: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    num_docs: tuple[int, int]  # (train, validation)
    grad_accum: int  # micro-batches per rank per optimizer step
    total_batch_size: int  # tokens per optimizer step, all ranks together
    num_steps: int  # the schedule's length (a --stop-at run stops earlier)
    eval_steps: int  # micro-batches per rank per evaluation
    out_dir: Path
    ns_dtype: torch.dtype
    resume_from: Path | None
    replace_previous: bool  # --overwrite, or --resume auto without a checkpoint: clear the old run first


def plan_run(cfg: TrainConfig, d: Dist) -> Plan:
    """The plan of `cfg` on `d`'s ranks and device; UsageError if it cannot run."""
    cfg.validate()
    out_dir = Path(cfg.out_dir if cfg.out_dir is not None else f"runs/d{cfg.depth}")
    check_out_dir(out_dir)  # before the corpus is read: a typo should not cost minutes of loading
    resume_from, resume_meta, fresh_start = choose_resume(cfg, out_dir, d)
    tokenizer, train_docs, val_docs = read_data(cfg, resume_from, d)
    train_tokens = tokenize_documents(train_docs, tokenizer)
    val_tokens = tokenize_documents(val_docs, tokenizer)
    config = gpt_config(cfg, tokenizer.vocab_size)
    grad_accum, total_batch_size, num_steps, eval_steps = batch_arithmetic(cfg, config, d, train_tokens, val_tokens)
    if resume_meta is not None:
        check_resume(resume_from, resume_meta, config, cfg, train_tokens, val_tokens, num_steps)
    return Plan(cfg, config, tokenizer, train_tokens, val_tokens, (len(train_docs), len(val_docs)), grad_accum,
                total_batch_size, num_steps, eval_steps, out_dir, cfg.muon_ns_dtype(d.device.type), resume_from,
                cfg.overwrite or fresh_start)


def choose_resume(cfg: TrainConfig, out_dir: Path, d: Dist) -> tuple[Path | None, dict | None, bool]:
    """(the checkpoint to resume from, its meta, whether --resume auto found none and starts afresh)."""
    resume_from, resume_meta = None, None
    # --resume auto: continue if there is a checkpoint, else start afresh (replacing what a run that
    # died before its first checkpoint left behind)
    fresh_start = cfg.resume == "auto" and latest_checkpoint(out_dir) is None
    if cfg.resume is not None and not fresh_start:
        try:
            if cfg.resume in ("latest", "auto"):
                resume_from, resume_meta = newest_sound_checkpoint(out_dir, d)
            else:
                resume_from = resolve_checkpoint(cfg.resume)
                resume_meta = verify_checkpoint(resume_from)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
    elif (out_dir.exists() and not cfg.overwrite and not fresh_start
          and (list_checkpoints(out_dir) or (out_dir / METRICS_FILE).exists())):
        raise UsageError(f"{out_dir} holds a previous run; pass --resume to continue it, --overwrite to replace "
                         f"it, or choose another --out-dir")
    return resume_from, resume_meta, fresh_start


def read_data(cfg: TrainConfig, resume_from: Path | None, d: Dist) -> tuple[object, list[str], list[str]]:
    """corpus -> split -> tokenizer (the checkpoint's on resume): (tokenizer, train docs, val docs)."""
    try:
        docs = load_corpus(cfg.data, cfg.max_corpus_bytes)
        train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    except (CorpusError, ImportError) as e:  # ImportError: parquet without pyarrow
        raise UsageError(f"corpus: {e}") from None
    except ValueError as e:
        raise UsageError(f"corpus: {e} (a single text file is one document: pass several files or a "
                         f"directory)") from None
    if resume_from is None:
        return build_tokenizer(cfg, train_docs, d), train_docs, val_docs
    try:
        tokenizer = load_tokenizer(resume_from)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"--resume: cannot load the checkpoint's tokenizer: {e}") from None
    if tokenizer.kind != cfg.tokenizer:
        raise UsageError(f"--resume: checkpoint {resume_from} was trained with the {tokenizer.kind} tokenizer, "
                         f"this run asks for --tokenizer {cfg.tokenizer}")
    return tokenizer, train_docs, val_docs


def batch_arithmetic(cfg: TrainConfig, config: GPTConfig, d: Dist, train_tokens: np.ndarray,
                     val_tokens: np.ndarray) -> tuple[int, int, int, int]:
    """(grad_accum, total_batch_size, num_steps, eval_steps), each checked."""
    micro_tokens = cfg.device_batch_size * cfg.seq_len * d.world_size
    total_batch_size = cfg.total_batch_size if cfg.total_batch_size is not None else micro_tokens
    if total_batch_size % micro_tokens:
        raise UsageError(
            f"--total-batch-size {total_batch_size} is not a multiple of device_batch_size * seq_len * world_size "
            f"= {cfg.device_batch_size} * {cfg.seq_len} * {d.world_size} = {micro_tokens}; try "
            f"{max(1, round(total_batch_size / micro_tokens)) * micro_tokens}")
    grad_accum = total_batch_size // micro_tokens
    if cfg.steps is not None:
        num_steps = cfg.steps
    else:
        budget = cfg.token_budget
        if budget is None:
            with torch.device("meta"):
                budget = int(cfg.param_data_ratio * GPT(config).num_params())
        num_steps = budget // total_batch_size
        if num_steps < 1:
            raise UsageError(f"a token budget of {budget} is less than one step of {total_batch_size} tokens")
    try:
        lr_schedule.validate(num_steps, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
    except ValueError as e:
        raise UsageError(f"schedule: {e}") from None
    if cfg.stop_at is not None and cfg.stop_at > num_steps:
        raise UsageError(f"--stop-at {cfg.stop_at} is past the end of the run ({num_steps} steps)")
    for name, stream in (("training", train_tokens), ("validation", val_tokens)):
        if len(stream) < micro_tokens + 1:
            raise UsageError(f"the {name} split has {len(stream)} tokens, fewer than one micro-batch of all ranks "
                             f"(device_batch_size * seq_len * world_size + 1 = {micro_tokens + 1}); use more data, "
                             f"a smaller --device-batch-size or a shorter --seq-len")
    # evaluate on whole micro-batches, never wrapping around the validation stream (that would count
    # tokens twice)
    eval_steps = max(1, min(cfg.eval_tokens // micro_tokens, (len(val_tokens) - 1) // micro_tokens))
    return grad_accum, total_batch_size, num_steps, eval_steps


def check_out_dir(out_dir: Path) -> None:
    """UsageError unless `out_dir` is (or can be created as) a writable directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} exists and is not a directory")
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir {out_dir}: {existing} is not a writable directory")


def gpt_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The model the flags describe, nanochat's sizing filling in what they leave out."""
    n_embd = cfg.n_embd if cfg.n_embd is not None else 64 * cfg.depth
    n_head = cfg.n_head if cfg.n_head is not None else max(1, n_embd // 64)
    n_kv_head = cfg.n_kv_head if cfg.n_kv_head is not None else n_head
    try:
        return GPTConfig(sequence_len=cfg.seq_len, vocab_size=vocab_size, n_layer=cfg.depth, n_head=n_head,
                         n_kv_head=n_kv_head, n_embd=n_embd)
    except ValueError as e:
        raise UsageError(f"impossible model: {e} (--n-embd defaults to 64 * depth, --n-head to n_embd // 64, "
                         f"--n-kv-head to n_head)") from None


def build_tokenizer(cfg: TrainConfig, train_docs: list[str], d: Dist):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    # BPE training is not guaranteed to break ties identically everywhere: train once, broadcast the result
    # (as the tokenizer's JSON file, through the system temp dir: nothing lands in out_dir before validation)
    payload = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        if d.master:
            tok = BPETokenizer.train(train_docs, cfg.vocab_size)
            tok.save(path)
            payload = path.read_text()
        payload = broadcast_object(payload, src=0)
        if not d.master:
            path.write_text(payload)
            tok = BPETokenizer.load(path)
    return tok


def newest_sound_checkpoint(out_dir: Path, d: Dist) -> tuple[Path, dict]:
    """The newest checkpoint of the run whose files match their manifest, and its meta; a damaged
    one is reported by name (rank 0) and the previous one tried. CheckpointError if none is sound."""
    found = list_checkpoints(out_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {out_dir}/checkpoints to resume from")
    problems = []
    for _, ckpt in reversed(found):
        try:
            meta = verify_checkpoint(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems and d.master:
            print(f"warning: {'; '.join(problems)}; resuming from {ckpt} instead", flush=True)
        return ckpt, meta
    raise CheckpointError(f"--resume: every checkpoint in {out_dir}/checkpoints is damaged: {'; '.join(problems)}")


def data_fingerprint(train_tokens: np.ndarray, val_tokens: np.ndarray) -> dict:
    """What identifies the data a run trains and validates on: the length and a content hash of
    each token stream (the tokens already depend on the files, their order, --max-corpus-bytes,
    --val-fraction and the tokenizer). Stored in every checkpoint, compared on resume."""
    def digest(a: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]
    return dict(train_tokens=len(train_tokens), train_sha256=digest(train_tokens),
                val_tokens=len(val_tokens), val_sha256=digest(val_tokens))


def check_resume(ckpt: Path, meta: dict, config: GPTConfig, cfg: TrainConfig, train_tokens, val_tokens,
                 num_steps: int) -> None:
    """A checkpoint of a different model, tokenizer, data or optimizer cannot continue this run."""
    saved = model_config(meta)
    if saved != config:
        diff = ", ".join(f"{k}: checkpoint {v} vs now {getattr(config, k)}"
                         for k, v in asdict(saved).items() if getattr(config, k) != v)
        raise UsageError(f"--resume: {ckpt} is a different model ({diff})")
    saved_args = meta.get("args", {})
    if saved_args.get("optimizer") != cfg.optimizer:
        raise UsageError(f"--resume: {ckpt} was trained with --optimizer {saved_args.get('optimizer')}, "
                         f"this run uses --optimizer {cfg.optimizer}")
    if meta["loader"]["num_tokens"] != len(train_tokens):
        raise UsageError(f"--resume: {ckpt} was trained on a token stream of {meta['loader']['num_tokens']} tokens, "
                         f"this run's has {len(train_tokens)}; were --data, --max-corpus-bytes, --val-fraction "
                         f"or the tokenizer changed?")
    saved_data, data = meta.get("data"), data_fingerprint(train_tokens, val_tokens)
    if saved_data is not None and saved_data != data:
        diff = ", ".join(k for k in data if saved_data.get(k) != data[k])
        raise UsageError(f"--resume: {ckpt} was trained on other data ({diff} differ: same length, other "
                         f"content); were --data, --max-corpus-bytes or --val-fraction changed?")
    if meta["step"] == num_steps:
        raise RunComplete(f"{ckpt} is the last step ({num_steps}) of this run: nothing to do")
    if meta["step"] > num_steps:
        raise UsageError(f"--resume: {ckpt} is at step {meta['step']}, past the end of this {num_steps}-step run")
    if cfg.stop_at is not None and cfg.stop_at <= meta["step"]:
        raise UsageError(f"--stop-at {cfg.stop_at} is not after the checkpoint's step {meta['step']}")
