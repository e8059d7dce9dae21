"""Rules every attention backend shares: the softmax-scale default and the accumulator dtype."""

from __future__ import annotations

import math

import torch


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale``, or ``1/sqrt(head_dim)`` when it is None (an explicit 0.0 stays 0.0)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Running output, LSE and gradient accumulators: float64 for float64 inputs (the CPU
    oracle; the Triton backend rejects float64), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32
