"""Learning-rate schedules: a pure function of the step, so resuming needs only the step number.

  cosine: linear warmup 0 -> lr, then cosine from lr down to min_lr at max_steps
  wsd:    warmup, then constant lr (stable), then a linear decay to min_lr over the last `decay_steps`
  linear: warmup, then linear from lr down to min_lr at max_steps
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int, schedule: str = "cosine",
          decay_steps: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "wsd":
        decay = decay_steps if decay_steps is not None else max(1, max_steps // 10)
        start = max(warmup, max_steps - decay)
        if step < start:
            return lr
        frac = min(1.0, (step - start) / max(1, max_steps - start))
        return lr + (min_lr - lr) * frac
    frac = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "linear":
        return lr + (min_lr - lr) * frac
    raise ValueError(f"unknown schedule {schedule!r}: use cosine, wsd or linear")


def from_config(optim, max_steps: int):
    """step -> lr for an OptimConfig."""
    return lambda step: lr_at(step, lr=optim.lr, min_lr=optim.min_lr, warmup=optim.warmup, max_steps=max_steps,
                              schedule=optim.schedule, decay_steps=optim.decay_steps)
