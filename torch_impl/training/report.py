"""What the training loop reports: the run's description, one line per step (loss, schedules,
time, throughput, MFU), and the summary at the end, each also a record of metrics.jsonl."""

from __future__ import annotations

from torch_impl.training.device import peak_flops
from torch_impl.training.metrics_log import MetricsLog
from torch_impl.training.plan import Plan
from torch_impl.training.runtime import Dist
from torch_impl.training.step import StepResult


class Rate:
    """Tokens per second and model FLOPs utilization (MFU: achieved model FLOP/s over the devices'
    peak; None where the peak is unknown, e.g. on CPU without --peak-flops)."""

    def __init__(self, model, plan: Plan, d: Dist):
        self.flops_per_token = model.estimate_flops()
        self.peak = peak_flops(d.device, plan.cfg.peak_flops)
        self.world_size = d.world_size

    def mfu(self, tokens_per_s: float) -> float | None:
        return self.flops_per_token * tokens_per_s / (self.peak * self.world_size) if self.peak else None


def announce(log: MetricsLog, plan: Plan, model, d: Dist, rate: Rate, start_step: int) -> None:
    cfg = plan.cfg
    n_train, n_val = plan.num_docs
    log.print(f"model: {plan.model_config} | {model.num_params():,} params | {rate.flops_per_token:.3g} FLOPs/token")
    log.print(f"data: {n_train} train / {n_val} val docs, {len(plan.train_tokens):,} / {len(plan.val_tokens):,} "
              f"tokens ({plan.tokenizer!r}) | {d.world_size} rank(s) on {d.device.type} | "
              f"{plan.total_batch_size:,} tokens/step = {cfg.device_batch_size} x {cfg.seq_len} x "
              f"{d.world_size} ranks x {plan.grad_accum} accum | {plan.num_steps} steps, "
              f"{plan.num_steps * plan.total_batch_size:,} tokens")
    if plan.resume_from is not None:
        log.print(f"resumed from {plan.resume_from} at step {start_step}")


def log_step(log: MetricsLog, plan: Plan, step: int, result: StepResult, lrm: float, momentum: float,
             rate: Rate) -> None:
    dt = result.seconds
    tok_per_s = plan.total_batch_size / dt
    mfu = rate.mfu(tok_per_s)
    text = (f"step {step:5d}/{plan.num_steps} | loss {result.loss:.6f} | lrm {lrm:.3f} | mom {momentum:.3f} | "
            f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu " + (f"{mfu:.2%}" if mfu is not None else "n/a"))
    if result.grad_norm is not None:
        text += f" | gnorm {result.grad_norm:.3f}"
    log.record(text, type="train", step=step, loss=result.loss, lr_multiplier=lrm, muon_momentum=momentum,
               dt=dt, tokens_per_s=tok_per_s, mfu=mfu, grad_norm=result.grad_norm)
    log.advance()


def summarize(log: MetricsLog, plan: Plan, step: int, times: list[float], last_val: dict | None,
              rate: Rate) -> dict:
    """The summary record; throughput is the steady state's (the first step pays for warm-up:
    allocations, compilation)."""
    steady = times[1:] or times
    summary = dict(type="summary", step=step, steps_run=len(times), total_time=sum(times),
                   tokens_per_s=plan.total_batch_size * len(steady) / sum(steady) if steady else None)
    if summary["tokens_per_s"] is not None and rate.peak:
        summary["mfu"] = rate.mfu(summary["tokens_per_s"])
    if last_val is not None:
        summary.update(last_val)
    log.record(f"done: {len(times)} steps in {sum(times):.1f}s"
               + (f", {summary['tokens_per_s']:,.0f} tok/s after the first step" if summary["tokens_per_s"] else "")
               + (f", val bpb {last_val['val_bpb']:.4f}" if last_val else ""), **summary)
    return summary
