"""``local``: one process, the whole sequence, flash attention. The oracle every other strategy
is checked against."""

from __future__ import annotations

import torch

from ..layout import check_cu_seqlens
from ..rotary import RotaryEmbedding
from ..weights import AttentionWeights, check_block_input, project_out, project_qkv
from .base import Strategy, register
from .common import attend, rotate


def local_attention(
    x: torch.Tensor,
    w: AttentionWeights,
    rope: RotaryEmbedding | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-process attention block over the whole sequence: ``[B, S, h] -> [B, S, h]``.

    ``cu_seqlens``: packed documents (int32 offsets over the flattened ``[B * S]`` tokens, every
    row boundary a document boundary): attention inside each document, RoPE restarting at each.
    """
    check_block_input(x, w, rope)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
    q, k, v = project_qkv(x, w)
    q, k = rotate(q, k, rope, cu_seqlens)
    o = attend(q, k, v, causal, softmax_scale, cu_seqlens)
    return project_out(o, w)


@register
class Local(Strategy):
    name = "local"
    summary = "one process, the whole sequence, flash attention (the oracle)"
    use_when = "the sequence fits one GPU; every other strategy is checked against it"
    color = "#7f7f7f"
    single_process = True

    def head_degree(self, sp, ulysses_degree, n_heads, n_kv_heads) -> int:
        return 1

    def granule(self, sp, chunks, ulysses_degree=None) -> int:
        return 1

    def permutation(self, seq_len, sp, chunks, ulysses_degree=None) -> torch.Tensor:
        return torch.arange(seq_len)

    def attend(self, strategy, x, w, rope, cu_seqlens):
        return local_attention(x, w, rope, causal=strategy.causal, softmax_scale=strategy.softmax_scale,
                               cu_seqlens=cu_seqlens)  # fmt: skip
