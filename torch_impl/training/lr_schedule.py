"""
Learning-rate and Muon-momentum schedules, as functions of the step index.

Both follow nanochat (https://github.com/karpathy/nanochat, base_train.py):

- LR multiplier: optional linear warmup, then flat at 1.0, then a linear warmdown to
  `final_lr_frac` over the last `warmdown_ratio` of the run. Flat-then-decay ("trapezoidal",
  WSD) needs no decision about the total length until the warmdown starts, and does as well as
  cosine at the end of the run.
- Muon momentum: 0.85 -> 0.95 linearly over the first 300 steps. A low momentum early lets the
  optimizer follow the fast-changing gradients of a fresh model; the high one later averages noise.

`step` is 0-based: the index of the optimizer step about to be taken. Both functions are pure, so
a resumed run that restarts at step s gets exactly the values an uninterrupted one had.
"""

from __future__ import annotations


def lr_multiplier(step: int, num_steps: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Multiplier on every group's initial lr at 0-based `step` of a `num_steps` run."""
    warmup = round(warmup_ratio * num_steps)
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_steps - warmdown:
        return 1.0
    # progress runs 1 -> 1/warmdown over the warmdown: the last step still moves (lr > final)
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum at 0-based `step`: `start` -> `end` linearly over `warmup_steps`, then `end`."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def validate(num_steps: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> None:
    """Raise ValueError for a schedule that cannot be what the user meant."""
    if num_steps < 1:
        raise ValueError(f"the run must have at least 1 step, got {num_steps}")
    for name, v in (("warmup_ratio", warmup_ratio), ("warmdown_ratio", warmdown_ratio),
                    ("final_lr_frac", final_lr_frac)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if warmup_ratio + warmdown_ratio > 1.0:
        raise ValueError(f"warmup_ratio + warmdown_ratio must be <= 1, got {warmup_ratio} + {warmdown_ratio}")
