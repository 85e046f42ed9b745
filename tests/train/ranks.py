"""Training cases run inside the ranks of the session's rank pool (tests/dist/harness.py):
the trainer in process, on a gloo group the pool formed, without torchrun or a fresh
interpreter per rank. Each case plans and runs one training run on every rank, exactly as
`python -m torch_impl.train` does after `init_from_env` (which describes the pool's group)."""

from __future__ import annotations

from tests.train.common import metrics


def case_train(argv: list[str]) -> list[tuple[str, int, float]]:
    """Train with `argv` on this rank; rank 0 returns the run's (kind, step, loss) records."""
    from torch_impl.training.config import TrainConfig
    from torch_impl.training.loop import train
    from torch_impl.training.out_dir import release_locks
    from torch_impl.training.plan import plan_run
    from torch_impl.training.runtime import init_from_env

    cfg = TrainConfig.from_argv(argv)
    d = init_from_env(cfg.device_type())
    try:
        train(plan_run(cfg, d), d)
    finally:
        release_locks()  # as main() does when the run ends: the out-dir lock is the process's
    if d.rank != 0:
        return []
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss")))
            for r in metrics(cfg.out_dir) if r["type"] in ("train", "val")]
