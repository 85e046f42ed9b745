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

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torch_impl.data.loader import DistributedTokenLoader, bits_per_byte, bpb_sums, token_bytes
from torch_impl.models.gpt import GPT
from torch_impl.optim.base import HybridOptimizer, hybrid
from torch_impl.optim.nonfinite import NonFiniteGradientError
from torch_impl.sharding.comm import (
    CollectiveFailure,
    Dist,
    clip_grad_norm_synchronized_,
    collective_timeout,
    init_from_env,
    is_collective_failure,
    unanswered_ranks,
)
from torch_impl.sharding.parallelize import apply_activation_checkpointing, apply_fsdp
from torch_impl.training import lr_schedule
from torch_impl.training.checkpoint import CheckpointError, load_training_state, save_checkpoint
from torch_impl.training.config import TrainConfig, UsageError
from torch_impl.training.device import autocast, peak_flops, synchronize
from torch_impl.training.plan import CONFIG_FILE, METRICS_FILE, Plan, RunComplete, data_fingerprint, plan_run
from torch_impl.training.preemption import Stopped, StopSignals

# A model whose loss is bit-identical on this many consecutive steps of different batches no longer
# depends on its input: e.g. --matrix-lr 1e30 grows the residual stream to ~1e31, the final RMSNorm's
# mean square overflows fp32 to inf, every logit becomes 0 and the loss is exactly ln(vocab) on every
# batch, with zero gradients. A living model's loss differs between batches in its low bits.
FLAT_LOSS_STEPS = 3


class TrainingDiverged(RuntimeError):
    """The run cannot produce a useful model any more (non-finite or input-independent loss)."""


def parallelize(model: GPT, cfg: TrainConfig, d: Dist) -> None:
    """What is applied to the model from outside (torch_impl/sharding/parallelize.py): activation checkpointing,
    then FSDP2 over all ranks with --sharding fsdp (bf16 compute over fp32 master weights on CUDA). The
    weights are initialized whole on every rank (same seed) before fully_shard splits them, so a run
    starts from the same model whatever the sharding."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.sharding == "fsdp" and d.active:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        apply_fsdp(model, mesh, param_dtype=torch.bfloat16 if d.device.type == "cuda" else None,
                   reduce_dtype=getattr(torch, cfg.grad_reduce_dtype))


def whole_model(model: GPT, d: Dist) -> GPT | None:
    """The model with whole parameters on rank 0 (None on the others), for sampling: `model` itself
    unless FSDP2 shards it; then its full state is gathered (a collective) into a plain GPT."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model if d.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.master:
        return None
    with torch.device("meta"):
        whole = GPT(model.config)
    whole.to_empty(device=d.device)
    whole.init_weights()  # the rotary buffers, which are not in the state dict
    whole.load_state_dict(full)
    return whole.eval()


def build_optimizer(model: GPT, cfg: TrainConfig, ns_dtype: torch.dtype, distributed: bool) -> HybridOptimizer:
    """nanochat's split (optim.hybrid): Muon for the block matrices (or AdamW with --optimizer adamw), AdamW
    (betas (0.8, 0.95), eps 1e-10) for the embedding, lm_head and scalars, their lrs scaled by
    (n_embd/768)^-0.5. --weight-decay is the block matrices' (decoupled); the rest is not decayed."""
    opt = hybrid(model.named_parameters(), matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                 unembedding_lr=cfg.unembedding_lr, model_dim=model.config.n_embd, distributed=distributed,
                 matrix_optimizer="adamw" if cfg.optimizer == "adamw" else "muon",
                 adamw_matrix_lr=cfg.adamw_matrix_lr, weight_decay=cfg.weight_decay,
                 orthogonalizer=cfg.orthogonalizer, ns_steps=cfg.muon_ns_steps(), ns_dtype=ns_dtype,
                 grad_reduce_dtype=getattr(torch, cfg.grad_reduce_dtype), nonfinite=cfg.nonfinite,
                 normuon_beta2=cfg.normuon_beta2, cautious_weight_decay=cfg.cautious_wd,
                 row_equilibration=cfg.row_equilibration, frobenius_renormalization=cfg.frobenius_renormalization,
                 compile=cfg.compile_optimizer)
    # Every block holds 6 matrices (attn c_q, c_k, c_v, c_proj; mlp c_fc, c_proj): a wrapper that
    # renamed or flattened them would otherwise turn the run into AdamW-only without a word.
    if cfg.optimizer == "hybrid":
        routed = sum(len(g["params"]) for g in opt.optimizers["muon"].param_groups) if "muon" in opt.optimizers else 0
        if routed != 6 * model.config.n_layer:
            raise RuntimeError(f"{routed} parameters went to Muon, the model has {6 * model.config.n_layer} block "
                               "matrices: the Muon/AdamW split is misrouting parameters")
    return opt


@torch.no_grad()
def evaluate(model: GPT, tokens: np.ndarray, plan: Plan, d: Dist, tok_bytes: torch.Tensor) -> dict:
    """Mean per-token loss and bits per byte over plan.eval_steps micro-batches of every rank, summed over
    ranks before dividing (so the result is the same whatever the number of ranks)."""
    cfg = plan.cfg
    loader = DistributedTokenLoader(tokens, cfg.device_batch_size, cfg.seq_len, d.rank, d.world_size, d.device)
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
            # drop records past the checkpoint: the steps after it are about to be redone; a line that
            # does not parse is the torn last write of a killed run: dropped (repaired), and said so
            kept, torn = [], 0
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        record = json.loads(line) if line.strip() else None
                    except json.JSONDecodeError:
                        torn += 1
                        continue
                    if record is not None and record.get("step", 0) <= resume_step:
                        kept.append(line)
            self.path.write_text("".join(line + "\n" for line in kept))
            if torn:
                self.print(f"{self.path}: dropped {torn} unreadable line(s) (a write cut short by a crash)")
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


_LOCKS: list = []  # open lock files: held until main() returns (or the process ends, however it ends)


def lock_out_dir(out_dir: Path) -> str | None:
    """Take the run directory's lock (an exclusive flock on <out_dir>/.lock, released when the process
    ends, however it ends); None on success, else who holds it. Needs a file system with working flock
    (local disks; NFS only with lock support)."""
    import fcntl
    f = (out_dir / ".lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return f"locked by {holder}"
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS.append(f)
    return None


def start_out_dir(plan: Plan, d: Dist) -> None:
    """Create the run directory and write config.json. Only now is anything written, once every rank has
    validated its inputs (otherwise a slow rank could find rank 0's fresh metrics.jsonl and take it for a
    previous run)."""
    if d.active:
        dist.barrier()
    held_by = None
    if d.master:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        held_by = lock_out_dir(plan.out_dir)
    busy = torch.tensor([held_by is not None], dtype=torch.int32, device=d.device)
    if d.active:
        dist.all_reduce(busy, op=dist.ReduceOp.MAX)  # every rank stops, not only rank 0
    if busy.item():
        raise UsageError(f"{plan.out_dir} is in use by another run ({held_by or 'see rank 0'}); two runs in one "
                         "--out-dir would overwrite each other's checkpoints")
    if d.master:
        if plan.replace_previous:
            shutil.rmtree(plan.out_dir / "checkpoints", ignore_errors=True)
        (plan.out_dir / CONFIG_FILE).write_text(json.dumps(dict(
            args=plan.cfg.to_dict(), model_config=asdict(plan.model_config), world_size=d.world_size,
            grad_accum=plan.grad_accum, total_batch_size=plan.total_batch_size, num_steps=plan.num_steps,
            ns_dtype=str(plan.ns_dtype), device=str(d.device)), indent=2) + "\n")
    if d.active:
        dist.barrier()


def train(plan: Plan, d: Dist, stop: StopSignals | None = None) -> dict:
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)  # same seed on every rank: identical replicas without a broadcast
    if d.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast

    with torch.device("meta"):
        model = GPT(plan.model_config)
    model.to_empty(device=d.device)
    model.init_weights()
    parallelize(model, cfg, d)
    optimizer = build_optimizer(model, cfg, plan.ns_dtype, d.active)
    # ZeRO-2 reduces in the last micro-batch's backward and drops the full gradients
    # (torch_impl/sharding/backward_reduce.py); clipping needs them whole, so it keeps the reduction in the step
    reduce_in_backward = d.active and cfg.sharding == "zero2" and cfg.grad_clip == 0
    train_model = torch.compile(model, dynamic=False) if cfg.compile else model
    loader = DistributedTokenLoader(plan.train_tokens, cfg.device_batch_size, cfg.seq_len, d.rank,
                                    d.world_size, d.device)
    tok_bytes = token_bytes(plan.tokenizer, d.device)

    start_step = 0
    if plan.resume_from is not None:
        with collective_timeout(5 * cfg.collective_timeout, restore=cfg.collective_timeout):
            meta = load_training_state(plan.resume_from, model, optimizer, d.rank)
        loader.load_state_dict(meta["loader"])
        start_step = meta["step"]

    start_out_dir(plan, d)
    stop_at = cfg.stop_at or plan.num_steps
    log = Logger(plan.out_dir, d, plan.num_steps, start_step, start_step if plan.resume_from else None)

    flops_per_token = model.estimate_flops()
    peak = peak_flops(d.device, cfg.peak_flops)
    n_train, n_val = plan.num_docs
    log.print(f"model: {plan.model_config} | {model.num_params():,} params | {flops_per_token:.3g} FLOPs/token")
    log.print(f"data: {n_train} train / {n_val} val docs, {len(plan.train_tokens):,} / {len(plan.val_tokens):,} "
              f"tokens ({plan.tokenizer!r}) | {d.world_size} rank(s) on {d.device.type} | "
              f"{plan.total_batch_size:,} tokens/step = {cfg.device_batch_size} x {cfg.seq_len} x "
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
    if start_step == 0 and cfg.eval_every > 0:
        last_val = run_eval(0)

    step = start_step
    times, skipped, flat, previous_loss = [], 0, 0, None
    running, last_save = step, time.monotonic()
    fingerprint = data_fingerprint(plan.train_tokens, plan.val_tokens)  # saved in every checkpoint
    stop = stop or StopSignals()  # not entered: no handlers (tests, library use)
    try:
        while step < stop_at:
            running = step + 1  # the step a failure below belongs to
            lrm = lr_schedule.lr_multiplier(step, plan.num_steps, cfg.warmup_ratio, cfg.warmdown_ratio,
                                         cfg.final_lr_frac)
            momentum = lr_schedule.muon_momentum(step, cfg.momentum_warmup_steps)
            optimizer.set_lr_multiplier(lrm)
            optimizer.set_muon_momentum(momentum)

            synchronize(d.device)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=d.device)
            for micro in range(plan.grad_accum):
                x, y = next(loader)
                with autocast(d.device):
                    loss = train_model(x, y)
                loss_sum += loss.detach()
                # each micro-batch's mean loss, scaled so the accumulated gradient is the mean over them
                loss = loss / plan.grad_accum
                if reduce_in_backward and micro == plan.grad_accum - 1:
                    with optimizer.reduce_in_backward(loss):  # ZeRO-2: reduce_scatter as gradients appear
                        loss.backward()
                else:
                    loss.backward()
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = clip_grad_norm_synchronized_(model.parameters(), cfg.grad_clip).item()
            try:
                stepped = optimizer.step()
            except NonFiniteGradientError as e:
                raise NonFiniteGradientError(f"step {step + 1}: {e.with_hint('--nonfinite skip')}") from None
            optimizer.zero_grad(set_to_none=True)
            if not stepped:
                skipped += 1
                log.record(f"step {step + 1:5d} | skipped: non-finite gradient (--nonfinite skip; {skipped} so far)",
                           type="skipped", step=step + 1)
            mean_loss = loss_sum / plan.grad_accum
            if d.active:
                dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)  # the loss of the whole batch, for the log
            loss_value = mean_loss.item()  # also waits for the step to finish
            synchronize(d.device)
            dt = time.perf_counter() - t0
            step += 1
            times.append(dt)

            if not math.isfinite(loss_value) and stepped:  # a skipped step (--nonfinite skip) changed nothing
                raise TrainingDiverged(f"step {step}: loss is {loss_value}: training diverged")
            if stepped:
                flat, previous_loss = (flat + 1 if loss_value == previous_loss else 0), loss_value
            if flat >= FLAT_LOSS_STEPS - 1:
                raise TrainingDiverged(
                    f"step {step}: the loss has been exactly {loss_value!r} for {FLAT_LOSS_STEPS} steps of different "
                    "batches: the model no longer depends on its input (its activations overflowed or vanished; "
                    f"are the learning rates too large? --matrix-lr {cfg.matrix_lr:g}, --embedding-lr "
                    f"{cfg.embedding_lr:g}, --unembedding-lr {cfg.unembedding_lr:g})")
            tok_per_s = plan.total_batch_size / dt
            mfu = flops_per_token * tok_per_s / (peak * d.world_size) if peak else None
            text = (f"step {step:5d}/{plan.num_steps} | loss {loss_value:.6f} | lrm {lrm:.3f} | mom {momentum:.3f} | "
                    f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu "
                    + (f"{mfu:.2%}" if mfu is not None else "n/a"))
            if grad_norm is not None:
                text += f" | gnorm {grad_norm:.3f}"
            log.record(text, type="train", step=step, loss=loss_value, lr_multiplier=lrm, muon_momentum=momentum,
                       dt=dt, tokens_per_s=tok_per_s, mfu=mfu, grad_norm=grad_norm)
            log.advance()

            last = step == plan.num_steps
            if last or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
                last_val = run_eval(step)
            # a signal on any rank (preemption, Ctrl-C) or a time-based checkpoint: agreed by all ranks
            signalled, due = stop.agreed(d.device, d.active, cfg.checkpoint_minutes > 0 and
                                         time.monotonic() - last_save > 60 * cfg.checkpoint_minutes)
            if not cfg.no_checkpoint and (last or step == stop_at or signalled or due or
                                          (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)):
                last_save = time.monotonic()
                t = time.perf_counter()
                with collective_timeout(5 * cfg.collective_timeout, restore=cfg.collective_timeout):
                    path = save_checkpoint(plan.out_dir, step, model, optimizer, plan.tokenizer,
                                           loader.state_dict(), dict(args=cfg.to_dict(), optimizer=cfg.optimizer,
                                                                  data=fingerprint),
                                           d.rank, keep=cfg.keep_checkpoints)
                log.print(f"step {step:5d} | checkpoint {path} ({time.perf_counter() - t:.1f}s)")
            if signalled:
                log.print(f"step {step:5d} | stopped by {signal.Signals(signalled).name}: "
                          + ("no checkpoint (--no-checkpoint)" if cfg.no_checkpoint else
                             "checkpoint saved; rerun with --resume (or --resume auto) to continue"))
                raise Stopped(signalled)
    except Exception as e:
        if not is_collective_failure(e):
            raise
        silent = unanswered_ranks(f"torch_impl/failed_step_{running}", d.rank, d.world_size)
        who = (f"rank(s) {', '.join(map(str, silent))} did not answer (dead, hung, or far behind)" if silent
               else "a rank died, hangs, or is far behind")
        raise CollectiveFailure(
            f"step {running}: a collective did not complete within --collective-timeout {cfg.collective_timeout:g} s; "
            f"{who}; rank {d.rank} of {d.world_size} reports: {str(e).strip().splitlines()[0][:300]}") from None
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

    if cfg.sample_tokens > 0 and step == plan.num_steps:
        whole = whole_model(model, d)  # collective under FSDP2
        if d.master:
            from torch_impl.tools.sample import generate_text
            log.print("sample:")
            print(cfg.sample_prompt, end="", flush=True)
            generate_text(whole, plan.tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed,
                          stream=sys.stdout)
            print(flush=True)
    return summary


def main(argv=None) -> int:
    # torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor and warns on every call site, on
    # every rank; the old names are what gloo and NCCL both support, so keep the log readable
    warnings.filterwarnings("ignore", message=r".*_tensor` is deprecated", category=FutureWarning)
    # under torchrun every rank parses the same flags and meets the same usage errors: rank 0 alone
    # prints them (and --help); RANK is what Dist.master reads too, and it is known before the group
    quiet = os.environ.get("RANK", "0") != "0"
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext(), \
            contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        cfg = TrainConfig.from_argv(argv)
    d = None
    try:
        d = init_from_env(cfg.device_type(), timeout=timedelta(seconds=cfg.collective_timeout))
        with StopSignals() as stop:
            train(plan_run(cfg, d), d, stop)
        if d.active:
            # every rank reaches the teardown together: a rank that exits while a peer is still
            # tearing down its gloo pairs can make the peer abort (seen ~1 in 16 runs under load)
            dist.barrier()
        return 0
    except RunComplete as e:
        if d.master:
            print(e, flush=True)
        return 0
    except (UsageError, NonFiniteGradientError, TrainingDiverged) as e:
        if not quiet:  # one line, from rank 0
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except CheckpointError as e:  # a failed save (e.g. a full disk): every rank raises it, rank 0 says it
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # a signal: the checkpoint is saved; 128 + signum, the shell's "ended by a signal"
        return 128 + e.signum
    except CollectiveFailure as e:  # every surviving rank says it: rank 0 may be the one that died
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        while _LOCKS:
            _LOCKS.pop().close()  # releases the flock
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
