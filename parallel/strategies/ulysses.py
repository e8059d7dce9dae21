"""``ulysses``: DeepSpeed-Ulysses. Each rank holds ``S/P`` contiguous tokens; an all-to-all
scatters the heads and gathers the sequence, attention runs on the whole sequence for ``H/P``
heads, and the inverse all-to-all brings the output back."""

from __future__ import annotations

import torch

from ..all_to_all import check_heads, head_to_seq, kv_seq_to_head, seq_to_head
from ..distributed import SPGroup
from ..layout import check_cu_seqlens, check_layout, permutation
from ..rotary import RotaryEmbedding
from ..weights import AttentionWeights, check_block_input, project_out, project_qkv
from .base import Strategy, register
from .common import attend, rotate


def ulysses_attention(
    x: torch.Tensor,
    w: AttentionWeights,
    rope: RotaryEmbedding | None = None,
    *,
    group: SPGroup,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSpeed-Ulysses block: ``[B, S/P, h]`` (contiguous slice ``rank``) -> ``[B, S/P, h]``.

    ``cu_seqlens``: the packed documents of the whole ``[B, S]`` sequence (see ``local_attention``).
    """
    check_block_input(x, w, rope)
    check_heads(w.n_heads, w.n_kv_heads, group.size)
    check_layout(x.shape[1] * group.size, group.size, 1)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1] * group.size)
    q, k, v = project_qkv(x, w)  # [B, S/P, H, d]
    q = seq_to_head(q, group)  # -> [B, S, H/P, d]
    k, v = kv_seq_to_head(k, group), kv_seq_to_head(v, group)  # -> [B, S, Hkv', d]
    q, k = rotate(q, k, rope, cu_seqlens)
    o = attend(q, k, v, causal, softmax_scale, cu_seqlens)
    return project_out(head_to_seq(o, group), w)  # [B, S, H/P, d] -> [B, S/P, H, d] -> [B, S/P, h]


@register
class Ulysses(Strategy):
    name = "ulysses"
    summary = "all-to-all over heads; each rank attends the whole sequence for H/P heads"
    use_when = "P <= the KV heads (no replication) and the whole sequence's attention state fits one GPU"
    color = "#1f77b4"
    baseline = True

    def permutation(self, seq_len, sp, chunks, ulysses_degree=None) -> torch.Tensor:
        return permutation(seq_len, sp, 1)

    def attend(self, strategy, x, w, rope, cu_seqlens):
        return ulysses_attention(x, w, rope, group=strategy.group, causal=strategy.causal,
                                 softmax_scale=strategy.softmax_scale, cu_seqlens=cu_seqlens)  # fmt: skip
