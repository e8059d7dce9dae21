"""Rotary position embedding (RoPE, "rotate half" convention as in Llama/GPT-NeoX).

Tables are computed for given global positions, so a pipeline can build them per chunk
(``O(C*d)``) instead of holding full-length tables. Angles are computed in float64: at 2M
tokens an fp32 ``position * frequency`` would be off by ~0.1 rad.

The ``*_into`` variants compute the same bits into buffers the caller owns, so a pipeline
stage on a side stream allocates nothing (see :class:`parallel.executor.DeviceBuffers`).
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """``cos``/``sin`` tables ``[S, d]`` (fp32) for head dim ``d`` and base ``base``."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dim, got d={head_dim}")
        if not float(base) > 0:  # base ** (-k/half): a base <= 0 gives NaN angles
            raise ValueError(f"rotary embedding needs a base (rope_theta) > 0, got {base}")
        self.head_dim = head_dim
        self.base = float(base)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[*positions.shape, d]`` fp32 on ``positions.device``: ``[S, d]``
        for one sequence's positions, ``[B, S, d]`` for per-row positions (packed documents)."""
        half = self.head_dim // 2
        dev = positions.device
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64, device=dev) / half)
        angles = positions.to(torch.float64)[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()

    def span(self, start: int, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for the contiguous positions ``start .. start+length-1``."""
        return self.tables(torch.arange(start, start + length, device=device))

    def span_into(self, start: int, cos: torch.Tensor, sin: torch.Tensor, work: torch.Tensor) -> None:
        """:meth:`span` written into ``cos, sin [C, d]`` (fp32), bit for bit, allocating nothing;
        ``work``: float64, at least :meth:`span_work` elements."""
        C, d = cos.shape
        half = d // 2
        inv_freq, pos = work[:half], work[half : half + C]
        angles = work[half + C : half + C + C * half].view(C, half)
        value = work[half + C + C * half : half + C + 2 * C * half].view(C, half)
        torch.arange(half, out=inv_freq)  # as tables() computes it, op by op
        torch.pow(self.base, inv_freq.neg_().div_(half), out=inv_freq)
        torch.arange(start, start + C, out=pos)  # float64: exact integers, as int64 .to(float64)
        torch.mul(pos[:, None], inv_freq[None, :], out=angles)
        for fn, table in ((torch.cos, cos), (torch.sin, sin)):
            fn(angles, out=value)
            table[:, :half].copy_(value)  # both halves hold the same angles
            table[:, half:].copy_(value)

    def span_work(self, length: int) -> int:
        """float64 elements :meth:`span_into` needs for ``length`` positions."""
        return self.head_dim // 2 + length * (self.head_dim + 1)

    def __repr__(self) -> str:
        return f"RotaryEmbedding(head_dim={self.head_dim}, base={self.base})"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _per_head(table: torch.Tensor) -> torch.Tensor:
    """``[S, d]`` or ``[B, S, d]`` tables broadcast over ``[B, S, H, d]``."""
    return table[None, :, None, :] if table.dim() == 2 else table[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, d]`` by the tables ``[S, d]`` (or ``[B, S, d]``: positions per row);
    fp32 math, result in ``x.dtype``.

    Differentiable; :func:`apply_rotary_backward` is its explicit backward.
    """
    xf = x.float()
    cos, sin = _per_head(cos), _per_head(sin)
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def apply_rotary_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`apply_rotary` w.r.t. its input: the inverse rotation."""
    return apply_rotary(dy, cos, -sin)


def apply_rotary_into(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    work: torch.Tensor,
    *,
    inverse: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`apply_rotary` (``inverse``: :func:`apply_rotary_backward`) computed in ``work``.

    ``work`` is fp32 with at least ``2 * x.numel()`` elements; the fp32 result is a view of it,
    returned, and copied into ``out`` when given (``out`` may be ``x``). The bits equal the
    allocating functions' before their cast to ``x.dtype``: each product is rounded to fp32 and
    then added once, as there, and ``a - p`` is ``a + (-p)`` exactly.
    """
    n, half = x.numel(), x.shape[-1] // 2
    xf = work[:n].view(x.shape)
    y = work[n : 2 * n].view(x.shape)
    cos, sin = _per_head(cos), _per_head(sin)
    xf.copy_(x)
    torch.mul(xf, cos, out=y)
    xf[..., half:].mul_(sin[..., :half])  # x2 * sin: the first half's rotation term
    xf[..., :half].mul_(sin[..., half:])  # x1 * sin: the second half's
    first, second = (y[..., :half].add_, y[..., half:].sub_) if inverse else (y[..., :half].sub_, y[..., half:].add_)
    first(xf[..., half:])
    second(xf[..., :half])
    if out is not None:
        out.copy_(y)
    return y
