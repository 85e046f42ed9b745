"""The training loop: pretrain a nanochat-style GPT with Muon + AdamW, on one process or many.

    python -m torch_impl.train --depth 4 --steps 200                       # one process, no process group
    torchrun --standalone --nproc_per_node=2 -m torch_impl.train --depth 4  # data parallel, 2 ranks

On CPU the ranks talk over gloo, on CUDA over NCCL with one GPU per rank and bf16 autocast. How the
ranks split the training state is --sharding: zero2 (default) keeps the whole model on every rank,
with no DDP wrapper, because DistMuon / DistAdamW (ZeRO-2) average the gradients themselves with a
reduce_scatter (during the last micro-batch's backward), update the shard each rank owns, and
all-gather the new weights; fsdp splits parameters, gradients and optimizer state by rows (FSDP2,
applied from outside in training/build.py). Every rank reads its own slice of each batch.

One optimizer step = grad_accum micro-batches per rank, so the tokens per step (--total-batch-size) do
not depend on the number of ranks. The run is deterministic: the data walk is fixed and the schedules
are pure functions of the step, so a run resumed from a checkpoint reproduces the losses of an
uninterrupted one bit for bit.

`train` reads top-down; each job is a named piece: building (build.py), one step (step.py), the
loss watch (health.py), the record (metrics_log.py), validation (evaluate.py), when and how to save
(checkpointer.py), the stop agreed on every rank (preemption.py), a failed collective named
(runtime.py). Everything is validated before the output directory is touched (plan.py).
"""

from __future__ import annotations

import signal
import sys
import time

import torch

from torch_impl.data.loader import DistributedTokenLoader, token_bytes
from torch_impl.training import lr_schedule
from torch_impl.training.build import build_model, build_optimizer, whole_model
from torch_impl.training.checkpoint import load_training_state
from torch_impl.training.checkpointer import Checkpointer
from torch_impl.training.evaluate import evaluate
from torch_impl.training.generate import generate_text
from torch_impl.training.health import LossWatch
from torch_impl.training.metrics_log import MetricsLog
from torch_impl.training.out_dir import start_out_dir
from torch_impl.training.plan import Plan
from torch_impl.training.preemption import Stopped, StopSignals
from torch_impl.training.report import Rate, announce, log_step, summarize
from torch_impl.training.runtime import Dist, collective_failures_named, collective_timeout
from torch_impl.training.step import train_step


def train(plan: Plan, d: Dist, stop: StopSignals | None = None) -> dict:
    """Run the plan on this rank (every rank calls it); returns the summary record."""
    cfg = plan.cfg
    model = build_model(plan, d)
    optimizer = build_optimizer(model, cfg, plan.ns_dtype, d.active)
    train_model = torch.compile(model, dynamic=False) if cfg.compile else model
    loader = DistributedTokenLoader(plan.train_tokens, cfg.device_batch_size, cfg.seq_len, d.rank,
                                    d.world_size, d.device)
    start_step = resume(plan, model, optimizer, loader, d)
    start_out_dir(plan, d)
    log = MetricsLog(plan.out_dir, d, plan.num_steps, start_step, start_step if plan.resume_from else None)
    rate = Rate(model, plan, d)
    announce(log, plan, model, d, rate, start_step)
    validate = Validation(model, plan, d, log)
    last_val = validate(0) if start_step == 0 and cfg.eval_every > 0 else None
    # ZeRO-2 reduces in the last micro-batch's backward and drops the full gradients; clipping needs
    # them whole, so it keeps the reduction in the step
    reduce_in_backward = d.active and cfg.sharding == "zero2" and cfg.grad_clip == 0
    watch, saver = LossWatch(cfg), Checkpointer(plan, d, model, optimizer, loader, log)
    stop = stop or StopSignals()  # not entered: no handlers (tests, library use)
    step, stop_at, times, skipped = start_step, cfg.stop_at or plan.num_steps, [], 0
    with collective_failures_named(d, cfg.collective_timeout) as running:
        while step < stop_at:
            running.step = step + 1  # the step a failure below belongs to
            lrm = lr_schedule.lr_multiplier(step, plan.num_steps, cfg.warmup_ratio, cfg.warmdown_ratio,
                                            cfg.final_lr_frac)
            momentum = lr_schedule.muon_momentum(step, cfg.momentum_warmup_steps)
            optimizer.set_lr_multiplier(lrm)
            optimizer.set_muon_momentum(momentum)
            result = train_step(train_model, optimizer, loader, plan, d, step + 1, reduce_in_backward)
            step += 1
            times.append(result.seconds)
            if not result.stepped:
                skipped += 1
                log.record(f"step {step:5d} | skipped: non-finite gradient (--nonfinite skip; {skipped} so far)",
                           type="skipped", step=step)
            watch.check(step, result.loss, result.stepped)
            log_step(log, plan, step, result, lrm, momentum, rate)
            if step == plan.num_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
                last_val = validate(step)
            # a signal on any rank (preemption, Ctrl-C) or a time-based checkpoint: agreed by all ranks
            signalled, time_due = stop.agreed(saver.time_due())
            if saver.due(step, signalled, time_due):
                saver.save(step)
            if signalled:
                log.print(f"step {step:5d} | stopped by {signal.Signals(signalled).name}: "
                          + ("no checkpoint (--no-checkpoint)" if cfg.no_checkpoint else
                             "checkpoint saved; rerun with --resume (or --resume auto) to continue"))
                raise Stopped(signalled)
    log.close()
    summary = summarize(log, plan, step, times, last_val, rate)
    if cfg.sample_tokens > 0 and step == plan.num_steps:
        sample(model, plan, d, log)
    return summary


def resume(plan: Plan, model, optimizer, loader: DistributedTokenLoader, d: Dist) -> int:
    """Restore model, optimizer, RNG and data position from plan.resume_from; the step to continue
    from (0 for a fresh run)."""
    if plan.resume_from is None:
        return 0
    cfg = plan.cfg
    with collective_timeout(5 * cfg.collective_timeout, restore=cfg.collective_timeout):
        meta = load_training_state(plan.resume_from, model, optimizer, d.rank)
    loader.load_state_dict(meta["loader"])
    return meta["step"]


class Validation:
    """`validate(step)`: evaluate on the held-out tokens and record it; returns the result."""

    def __init__(self, model, plan: Plan, d: Dist, log: MetricsLog):
        self.model, self.plan, self.d, self.log = model, plan, d, log
        self.tok_bytes = token_bytes(plan.tokenizer, d.device)

    def __call__(self, step: int) -> dict:
        t = time.perf_counter()
        res = evaluate(self.model, self.plan.val_tokens, self.plan, self.d, self.tok_bytes)
        self.log.record(f"step {step:5d} | val loss {res['val_loss']:.4f} | val bpb {res['val_bpb']:.4f} | "
                        f"{time.perf_counter() - t:.1f}s", type="val", step=step, **res)
        return res


def sample(model, plan: Plan, d: Dist, log: MetricsLog) -> None:
    """The end-of-run sample, printed by rank 0 (gathering the whole model is a collective under FSDP2)."""
    cfg = plan.cfg
    whole = whole_model(model, d)
    if d.master:
        log.print("sample:")
        print(cfg.sample_prompt, end="", flush=True)
        generate_text(whole, plan.tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed,
                      stream=sys.stdout)
        print(flush=True)
