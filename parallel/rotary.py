"""Rotary position embedding (RoPE, "rotate half" convention as in Llama/GPT-NeoX).

Tables are computed for given global positions, so a pipeline can build them per chunk
(``O(C*d)``) instead of holding full-length tables. Angles are computed in float64: at 2M
tokens an fp32 ``position * frequency`` would be off by ~0.1 rad.
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """``cos``/``sin`` tables ``[S, d]`` (fp32) for head dim ``d`` and base ``base``."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dim, got d={head_dim}")
        self.head_dim = head_dim
        self.base = float(base)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[len(positions), d]`` fp32 on ``positions.device``."""
        half = self.head_dim // 2
        dev = positions.device
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64, device=dev) / half)
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()

    def span(self, start: int, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for the contiguous positions ``start .. start+length-1``."""
        return self.tables(torch.arange(start, start + length, device=device))

    def __repr__(self) -> str:
        return f"RotaryEmbedding(head_dim={self.head_dim}, base={self.base})"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, d]`` by the tables ``[S, d]``; fp32 math, result in ``x.dtype``.

    Differentiable; :func:`apply_rotary_backward` is its explicit backward.
    """
    xf = x.float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def apply_rotary_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`apply_rotary` w.r.t. its input: the inverse rotation."""
    return apply_rotary(dy, cos, -sin)
