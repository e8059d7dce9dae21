"""The attention projection weights, shared by every strategy's block (``local``,
``ulysses``, ``fpdt``, ``ring``, ``usp``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionWeights:
    """Projection tensors owned by a model's attention module (``nn.Parameter`` s or plain).

    ``wqkv``: ``[(H + 2*Hkv)*d, h]``, rows laid out ``[Q | K | V]``; ``bqkv``: ``[(H+2Hkv)*d]``
    or ``None``; ``wo``: ``[h, H*d]``; ``bo``: ``[h]`` or ``None``.
    """

    wqkv: torch.Tensor
    wo: torch.Tensor
    n_heads: int
    n_kv_heads: int
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None

    def __post_init__(self):
        H, Hkv = self.n_heads, self.n_kv_heads
        if H < 1 or Hkv < 1 or H % Hkv:
            raise ValueError(f"H={H} query heads must be a positive multiple of Hkv={Hkv} KV heads")
        if self.wo.dim() != 2 or self.wo.shape[1] % H:
            raise ValueError(f"wo must be [h, H*d] with H={H}, got {tuple(self.wo.shape)}")
        d, h = self.head_dim, self.hidden
        if tuple(self.wqkv.shape) != ((H + 2 * Hkv) * d, h):
            raise ValueError(
                f"wqkv must be [(H+2*Hkv)*d, h] = {((H + 2 * Hkv) * d, h)} for H={H}, Hkv={Hkv}, "
                f"d={d}, h={h}; got {tuple(self.wqkv.shape)}"
            )
        if self.bqkv is not None and tuple(self.bqkv.shape) != ((H + 2 * Hkv) * d,):
            raise ValueError(f"bqkv must be [{(H + 2 * Hkv) * d}], got {tuple(self.bqkv.shape)}")
        if self.bo is not None and tuple(self.bo.shape) != (h,):
            raise ValueError(f"bo must be [{h}], got {tuple(self.bo.shape)}")

    @property
    def head_dim(self) -> int:
        return self.wo.shape[1] // self.n_heads

    @property
    def hidden(self) -> int:
        return self.wo.shape[0]

    @classmethod
    def random(
        cls,
        hidden: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        generator: torch.Generator | None = None,
        requires_grad: bool = True,
    ) -> AttentionWeights:
        """Gaussian weights (std ``1/sqrt(h)``; ``1/sqrt(H*d)`` for ``wo``), for tests and benchmarks."""
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = hidden // n_heads if head_dim is None else head_dim
        rows = (n_heads + 2 * n_kv_heads) * head_dim

        def rand(*shape, fan_in):
            t = torch.randn(*shape, generator=generator, dtype=torch.float32) / math.sqrt(fan_in)
            return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

        return cls(
            wqkv=rand(rows, hidden, fan_in=hidden),
            wo=rand(hidden, n_heads * head_dim, fan_in=n_heads * head_dim),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            bqkv=rand(rows, fan_in=hidden) if bias else None,
            bo=rand(hidden, fan_in=hidden) if bias else None,
        )

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in (self.wqkv, self.bqkv, self.wo, self.bo) if t is not None]


def project_qkv(x: torch.Tensor, w: AttentionWeights):
    """``x [B, s, h] -> q [B, s, H, d], k, v [B, s, Hkv, d]`` (differentiable)."""
    B, s, _ = x.shape
    H, Hkv, d = w.n_heads, w.n_kv_heads, w.head_dim
    qkv = F.linear(x, w.wqkv, w.bqkv)  # [B, s, (H + 2Hkv) d]
    q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
    return q.reshape(B, s, H, d), k.reshape(B, s, Hkv, d), v.reshape(B, s, Hkv, d)


def project_out(o: torch.Tensor, w: AttentionWeights) -> torch.Tensor:
    """``o [B, s, H, d] -> [B, s, h]`` (differentiable)."""
    return F.linear(o.flatten(2), w.wo, w.bo)


def check_block_input(x, w: AttentionWeights, rope=None) -> None:
    """Raise unless ``x`` is an attention block's input ``[B >= 1, S, h]`` for ``w`` (its hidden
    size) and ``rope`` (``None`` or a ``RotaryEmbedding``) rotates ``w``'s head dim: every block
    checks this before its first matmul, so a mismatch is named instead of failing inside it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, S, h], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[0] < 1 or x.shape[2] != w.hidden:
        raise ValueError(f"x must be [B >= 1, S, h={w.hidden}] (h: the weights' hidden size), got {tuple(x.shape)}")
    if rope is not None and getattr(rope, "head_dim", None) != w.head_dim:
        raise ValueError(f"rope rotates head dim {getattr(rope, 'head_dim', None)}, but the weights' heads have "
                         f"d={w.head_dim}; use RotaryEmbedding({w.head_dim}, base)")  # fmt: skip
