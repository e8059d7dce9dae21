"""The learning rate: linear warm-up, then cosine decay to ``lr_min`` at the schedule's horizon."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, horizon: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if horizon <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (horizon - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup: int, horizon: int, min_ratio: float):
    """A ``LambdaLR`` (its ``state_dict`` goes into checkpoints) following :func:`lr_factor`."""
    if warmup < 0 or horizon < 1 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"lr schedule needs warmup >= 0, steps >= 1, 0 <= lr_min/lr <= 1; got {warmup}, "
                         f"{horizon}, {min_ratio}")  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, horizon, min_ratio))
