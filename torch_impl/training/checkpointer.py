"""When the loop saves a checkpoint, and the save itself: at the end, at --stop-at, every
--checkpoint-every steps, after --checkpoint-minutes, and when a signal stopped the run (the last
two agreed by every rank, whose clocks and signals differ). Checkpoint I/O gets 5x the collective
timeout of the loop."""

from __future__ import annotations

import time

from torch_impl.data.loader import DistributedTokenLoader
from torch_impl.training.checkpoint import save_checkpoint
from torch_impl.training.metrics_log import MetricsLog
from torch_impl.training.plan import Plan, data_fingerprint
from torch_impl.training.runtime import Dist, collective_timeout


class Checkpointer:
    def __init__(self, plan: Plan, d: Dist, model, optimizer, loader: DistributedTokenLoader, log: MetricsLog):
        self.plan, self.d, self.model, self.optimizer, self.loader, self.log = plan, d, model, optimizer, loader, log
        self.stop_at = plan.cfg.stop_at or plan.num_steps
        self.last_save = time.monotonic()
        self.fingerprint = data_fingerprint(plan.train_tokens, plan.val_tokens)  # saved in every checkpoint

    def time_due(self) -> bool:
        """This rank's clock says a --checkpoint-minutes checkpoint is due (agree before acting)."""
        minutes = self.plan.cfg.checkpoint_minutes
        return minutes > 0 and time.monotonic() - self.last_save > 60 * minutes

    def due(self, step: int, signalled: bool, time_due: bool) -> bool:
        cfg = self.plan.cfg
        periodic = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
        return not cfg.no_checkpoint and (step in (self.plan.num_steps, self.stop_at) or signalled or time_due
                                          or periodic)

    def save(self, step: int) -> None:
        cfg = self.plan.cfg
        self.last_save = time.monotonic()
        t = time.perf_counter()
        with collective_timeout(5 * cfg.collective_timeout, restore=cfg.collective_timeout):
            path = save_checkpoint(self.plan.out_dir, step, self.model, self.optimizer, self.plan.tokenizer,
                                   self.loader.state_dict(), dict(args=cfg.to_dict(), optimizer=cfg.optimizer,
                                                                  data=self.fingerprint),
                                   self.d.rank, keep=cfg.keep_checkpoints)
        self.log.print(f"step {step:5d} | checkpoint {path} ({time.perf_counter() - t:.1f}s)")
