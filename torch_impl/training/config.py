"""
The training run's configuration: one typed field per command-line flag of `python -m torch_impl.train`.

Each field carries its default, its help text and its `--help` group (the field's metadata), so the
dataclass is the single description of the flags: `TrainConfig.from_argv` builds the argparse parser from
it, and `validate` holds the checks that need no data, no device and no process group. Checks that need
the corpus, the tokenizer or a checkpoint (batch arithmetic, resume compatibility) are in torch_impl.training.plan.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields

import torch

from torch_impl.orthogonalizers.registry import ORTHOGONALIZERS, check_orthogonalizer, default_steps


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse with its error on one line: the 40-line usage block buried the message (and under
    torchrun it came once per rank)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(ValueError):
    """An invocation that cannot run; reported as `error: ...` with exit code 2."""


# --help groups, in the order they are shown
MODEL = "model (nanochat sizing: width = 64 * depth, head_dim 64)"
DATA = "data"
BATCH = "batch and length (tokens per step do not depend on the number of ranks)"
OPTIMIZER = "optimizer (nanochat defaults; AdamW lrs are scaled by (n_embd/768)^-0.5)"
SCHEDULES = "schedules (nanochat: flat lr then linear warmdown; Muon momentum warmup)"
OUTPUT = "evaluation, checkpoints, output"
SYSTEM = "system"


def flag(default, group: str, help: str, **argparse_kwargs):
    """A field that is also a command-line flag (--field-name). argparse_kwargs go to add_argument as they
    are (choices, nargs, const, metavar), except `exclusive`: fields naming the same `exclusive` key form a
    mutually exclusive group."""
    return field(default=default, metadata=dict(group=group, help=help, **argparse_kwargs))


@dataclass(frozen=True)
class TrainConfig:
    # model
    depth: int = flag(4, MODEL, "number of transformer blocks (n_layer)")
    n_embd: int | None = flag(None, MODEL, "model width; default 64 * depth")
    n_head: int | None = flag(None, MODEL, "query heads; default n_embd // 64 (head_dim 64)")
    n_kv_head: int | None = flag(None, MODEL, "key/value heads (GQA); default n_head")
    seq_len: int = flag(256, MODEL, "context length in tokens (nanochat: 2048)")

    # data
    data: list[str] | None = flag(
        None, DATA, "text files, directories (walked recursively) or parquet files with a 'text' column; "
                    "default: the Python standard library's source, found on this machine",
        nargs="+", metavar="PATH")
    max_corpus_bytes: int | None = flag(None, DATA, "read at most this many bytes of the corpus (default: all of it)")
    val_fraction: float = flag(0.1, DATA, "fraction of the documents held out")
    tokenizer: str = flag("byte", DATA, "byte: UTF-8 bytes, vocab 257; bpe: byte-level BPE trained on the "
                                        "training split", choices=("byte", "bpe"))
    vocab_size: int = flag(4096, DATA, "BPE vocabulary size (--tokenizer bpe only)")

    # batch and length
    device_batch_size: int = flag(8, BATCH, "sequences per micro-batch per rank")
    total_batch_size: int | None = flag(
        None, BATCH, "tokens per optimizer step; must be a multiple of device_batch_size * seq_len * world_size, "
                     "the quotient being the gradient accumulation steps (default: one micro-batch per rank, no "
                     "accumulation; nanochat: 524288)")
    steps: int | None = flag(None, BATCH, "number of optimizer steps", exclusive="length")
    token_budget: int | None = flag(None, BATCH, "train on this many tokens (steps = budget // total_batch_size)",
                                    exclusive="length")
    param_data_ratio: float = flag(20.0, BATCH, "without --steps/--token-budget: tokens = ratio * parameters "
                                                "(Chinchilla, nanochat)")

    # optimizer
    optimizer: str = flag("hybrid", OPTIMIZER, "hybrid: Muon for block matrices + AdamW for the rest; adamw: AdamW "
                                               "for everything (a baseline)", choices=("hybrid", "adamw"))
    matrix_lr: float = flag(0.02, OPTIMIZER, "Muon lr of the block matrices")
    embedding_lr: float = flag(0.2, OPTIMIZER, "AdamW lr of the token embedding")
    unembedding_lr: float = flag(0.004, OPTIMIZER, "AdamW lr of lm_head")
    adamw_matrix_lr: float = flag(0.003, OPTIMIZER, "AdamW lr of the block matrices (--optimizer adamw only)")
    weight_decay: float = flag(0.0, OPTIMIZER, "decoupled weight decay of the block matrices (the embedding and "
                                               "lm_head are not decayed)")
    cautious_wd: bool = flag(False, OPTIMIZER, "Muon: decay only where the update and the weight agree in sign")
    normuon_beta2: float | None = flag(None, OPTIMIZER, "Muon: enable NorMuon's per-neuron second moment with this "
                                                        "beta2 (e.g. 0.95)")
    orthogonalizer: str = flag("newton_schulz", OPTIMIZER, "how Muon orthogonalizes its update",
                               choices=tuple(ORTHOGONALIZERS))
    ns_steps: int | None = flag(None, OPTIMIZER, "orthogonalizer iterations; default: the orthogonalizer's published "
                                                "count (aol 4, deepseek_v4 10, the others 5)")
    row_equilibration: bool = flag(False, OPTIMIZER, "Muon: MuonEq, rescale every row of the update to the mean "
                                                     "row norm before orthogonalizing")
    frobenius_renormalization: bool = flag(False, OPTIMIZER, "Muon: Muon+, rescale the orthogonalized update to "
                                                             "Frobenius norm sqrt(min(rows, cols))")
    compile_optimizer: bool = flag(False, OPTIMIZER, "torch.compile Muon's orthogonalizer (one graph per matrix "
                                                     "shape; worth it on CUDA, a ~20 s compile on CPU)")
    ns_dtype: str = flag("auto", OPTIMIZER, "orthogonalizer compute dtype; auto: bfloat16 on CUDA, float32 on CPU "
                                            "(CPUs without AVX512-BF16 emulate bf16 matmuls, 10-40x slower)",
                         choices=("auto", "float32", "bfloat16"))
    nonfinite: str = flag("raise", OPTIMIZER, "a NaN/inf gradient on any rank: raise (stop with an error naming the "
                                              "step and the parameters, nothing updated) or skip (skip that step on "
                                              "every rank, logged)", choices=("raise", "skip"))
    grad_clip: float = flag(0.0, OPTIMIZER, "clip the global norm of the rank-averaged gradient to this value; "
                                            "0 = off. Costs one extra all-reduce of all gradients per step, and "
                                            "under --sharding zero2 the reduce_scatters then wait for the step "
                                            "instead of starting during backward")

    # schedules
    warmup_ratio: float = flag(0.0, SCHEDULES, "fraction of steps of linear lr warmup")
    warmdown_ratio: float = flag(0.2, SCHEDULES, "fraction of steps of linear lr warmdown")
    final_lr_frac: float = flag(0.0, SCHEDULES, "lr multiplier reached at the end")
    momentum_warmup_steps: int = flag(300, SCHEDULES, "Muon momentum goes 0.85 -> 0.95 linearly over this many "
                                                      "steps")

    # evaluation, checkpoints, output
    eval_every: int = flag(250, OUTPUT, "validation loss / bits-per-byte every N steps (and at the start and end); "
                                        "0 = end only")
    eval_tokens: int = flag(65536, OUTPUT, "validation tokens per evaluation")
    checkpoint_every: int = flag(0, OUTPUT, "checkpoint every N steps; 0 = at the end only")
    checkpoint_minutes: float = flag(30.0, OUTPUT, "also checkpoint when this many minutes have passed since the "
                                                   "last checkpoint (or the start); 0 = off")
    keep_checkpoints: int = flag(0, OUTPUT, "keep only the newest K checkpoints of the run (older ones are deleted "
                                            "after each new one is complete); 0 = keep all")
    no_checkpoint: bool = flag(False, OUTPUT, "write no checkpoint, not even at the end (benchmarks, throwaway "
                                              "runs)")
    out_dir: str | None = flag(None, OUTPUT, "run directory (metrics.jsonl, config.json, checkpoints/); default "
                                             "runs/d<depth>")
    resume: str | None = flag(
        None, OUTPUT, "continue a run: from the latest checkpoint in --out-dir, or from CKPT (a checkpoint directory "
                      "or a run directory); model, optimizer, step and data position are restored. The flags must "
                      "describe the same model, data and optimizer (checked); the schedule follows this run's "
                      "--steps. `--resume auto`: continue from the latest checkpoint if --out-dir has one, else "
                      "start afresh there (one command line for the first launch and every restart, e.g. under "
                      "torchrun --max-restarts)", nargs="?", const="latest", metavar="CKPT")
    overwrite: bool = flag(False, OUTPUT, "start afresh in an --out-dir that holds a previous run (deletes its "
                                          "checkpoints and metrics)")
    stop_at: int | None = flag(None, OUTPUT, "stop after this step with a checkpoint, as if preempted (the schedule "
                                             "still spans --steps); --resume continues", metavar="STEP")
    sample_tokens: int = flag(200, OUTPUT, "tokens of sample text at the end; 0 = none")
    sample_prompt: str = flag("", OUTPUT, "prompt of the final sample")

    # system
    seed: int = flag(0, SYSTEM, "seed of the weight init and of sampling")
    device: str = flag("auto", SYSTEM, "auto (cuda if available), cpu or cuda")
    compile: bool = flag(False, SYSTEM, "torch.compile the model for training")
    collective_timeout: float = flag(120.0, SYSTEM, "seconds a collective of the training loop may wait for the other "
                                                    "ranks before the run fails with an error naming the step (a rank "
                                                    "died or hangs); checkpoint I/O gets 5x this")
    sharding: str = flag("zero2", SYSTEM, "how the ranks split the training state. zero2: every rank holds the whole "
                                          "model; optimizer state and work split over ranks (DistMuon / DistAdamW). "
                                          "fsdp: FSDP2 (fully_shard per block): parameters, gradients and optimizer "
                                          "state split by rows, each block gathered for its compute; bf16 compute over "
                                          "fp32 master weights on CUDA. No difference at one process",
                         choices=("zero2", "fsdp"))
    grad_reduce_dtype: str = flag("float32", SYSTEM, "dtype of the gradients on the wire in the reduce_scatters "
                                                     "(zero2: the optimizer's; fsdp: FSDP's); bfloat16 halves the "
                                                     "bytes and rounds each gradient to 8 bits",
                                  choices=("float32", "bfloat16"))
    activation_checkpointing: bool = flag(False, SYSTEM, "recompute each transformer block's forward during backward "
                                                         "instead of keeping its activations (less memory, ~1/3 more "
                                                         "compute)")
    peak_flops: float | None = flag(None, SYSTEM, "peak FLOP/s of one device, for MFU (default: a table of GPUs; "
                                                  "none on CPU)")

    # -------------------------------------------------------------------------

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """The argparse parser of these fields: one --flag per field, grouped and explained as declared."""
        p = _OneLineErrorParser(
            prog="python -m torch_impl.train",
            description="Pretrain a nanochat-style GPT with Muon + AdamW. Runs as a single process "
                        "(python -m torch_impl.train) or data-parallel under torchrun.",
            epilog="examples:\n"
                   "  torchrun --standalone --nproc_per_node=2 -m torch_impl.train --depth 2 --seq-len 128 "
                   "--steps 400\n"
                   "  torchrun --standalone --nproc_per_node=2 -m torch_impl.train --depth 2 --seq-len 128 "
                   "--steps 400 --resume\n"
                   "  python -m torch_impl.launch --standalone --nproc_per_node=2 -m torch_impl.train --depth 2 "
                   "(torchrun, with one-line failures)\n"
                   "  python -m torch_impl.sample --checkpoint runs/d2 --prompt 'def '\n"
                   "  python -m torch_impl.export --checkpoint runs/d2 --out runs/d2/model.safetensors",
            formatter_class=_HelpFormatter)
        hints = typing.get_type_hints(cls)
        groups, exclusive = {}, {}
        for f in fields(cls):
            kwargs = dict(f.metadata)
            title = kwargs.pop("group")
            if title not in groups:
                groups[title] = p.add_argument_group(title)
            group = groups[title]
            if "exclusive" in kwargs:
                key = kwargs.pop("exclusive")
                if key not in exclusive:
                    exclusive[key] = group.add_mutually_exclusive_group()
                group = exclusive[key]
            value_type = _value_type(hints[f.name])
            if value_type is bool:
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = value_type
            group.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kwargs)
        return p

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> TrainConfig:
        """Parse the command line (sys.argv[1:] when argv is None); argparse's own errors exit with code 2.
        A value flag given twice keeps the last (scripts append overrides), but a choice flag given twice
        with different values is an error: `--sharding zero2 ... --sharding fsdp` asks for two modes at
        once. Not validated: call validate()."""
        parser = cls.parser()
        argv = sys.argv[1:] if argv is None else argv
        chosen: dict[str, str] = {}
        for i, arg in enumerate(argv):
            if arg == "--":
                break
            name, eq, value = arg.partition("=")
            action = parser._option_string_actions.get(name)
            if action is None or not action.choices:
                continue
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if chosen.get(action.dest, value) != value:
                parser.error(f"{name} given twice ({chosen[action.dest]}, {value}): choose one")
            chosen[action.dest] = value
        return cls(**vars(parser.parse_args(argv)))

    def to_dict(self) -> dict:
        """The flags as a JSON-able dict, in declaration order (config.json and checkpoints store it)."""
        return asdict(self)

    def muon_ns_steps(self) -> int:
        """--ns-steps, or the orthogonalizer's published step count when not given."""
        return default_steps(self.orthogonalizer) if self.ns_steps is None else self.ns_steps

    def muon_ns_dtype(self, device_type: str) -> torch.dtype:
        """--ns-dtype as a dtype; auto: bfloat16 on CUDA, float32 on CPU."""
        if self.ns_dtype == "auto":
            return torch.bfloat16 if device_type == "cuda" else torch.float32
        return getattr(torch, self.ns_dtype)

    def device_type(self) -> str:
        """"cpu" or "cuda": what --device asks for on this machine; UsageError if unknown or unavailable.
        The one check needed before the process group (whose backend depends on it) is created."""
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda, but no CUDA device is available")
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def validate(self) -> None:
        """Raise UsageError for a configuration that cannot run, whatever the data: bad --device, values out
        of range, contradicting flags. Deterministic and local, so every rank reaches the same verdict."""
        self.device_type()
        for name in ("depth", "seq_len", "device_batch_size", "eval_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("total_batch_size", "steps", "token_budget", "max_corpus_bytes", "stop_at"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        for name in ("eval_every", "checkpoint_every", "sample_tokens", "momentum_warmup_steps", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "adamw_matrix_lr", "weight_decay", "grad_clip",
                     "param_data_ratio"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
            if v > torch.finfo(torch.float32).max:  # the optimizers compute in fp32: it would become inf
                raise UsageError(f"--{name.replace('_', '-')} {v} overflows float32 (max "
                                 f"{torch.finfo(torch.float32).max:.3g})")
        try:  # the step counts the orthogonalizer's schedule supports, and its dtype limits (Muon runs only)
            if self.optimizer == "hybrid":
                check_orthogonalizer(self.orthogonalizer, self.muon_ns_steps(), self.muon_ns_dtype(self.device_type()))
        except ValueError as e:
            raise UsageError(f"--orthogonalizer/--ns-steps: {e}") from None
        if self.normuon_beta2 is not None and not 0 <= self.normuon_beta2 < 1:
            raise UsageError(f"--normuon-beta2 must be in [0, 1), got {self.normuon_beta2}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise UsageError(f"--vocab-size must be >= 257 (256 bytes + <|bos|>), got {self.vocab_size}")
        if self.tokenizer == "bpe" and importlib.util.find_spec("tokenizers") is None:
            raise UsageError("--tokenizer bpe needs the HuggingFace `tokenizers` package (pip install tokenizers)")
        if self.resume is not None and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other")
        if not math.isfinite(self.checkpoint_minutes) or self.checkpoint_minutes < 0:
            raise UsageError(f"--checkpoint-minutes must be a finite number >= 0, got {self.checkpoint_minutes}")
        if not math.isfinite(self.collective_timeout) or self.collective_timeout <= 0:
            raise UsageError(f"--collective-timeout must be a finite number of seconds > 0, "
                             f"got {self.collective_timeout}")
        if self.no_checkpoint and (self.stop_at is not None or self.checkpoint_every > 0):
            raise UsageError("--no-checkpoint contradicts --stop-at and --checkpoint-every")


def _value_type(hint) -> type:
    """What argparse converts each value with: int for `int`, `int | None` and `list[int] | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return hint


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show a flag's default unless it is None/False or the help text already explains it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
