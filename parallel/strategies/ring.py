"""``ring``: context-parallel ring attention. Each rank keeps its queries and passes its K/V block
around the ring of ``P`` ranks (point-to-point, overlapped with the block's attention); partial
outputs are merged by their log-sum-exp. Causal load balance by the zigzag layout (rank ``r`` holds
pieces ``r`` and ``2P-1-r`` of ``2P``). The ring itself is :mod:`parallel.ring`."""

from __future__ import annotations

import torch

from ..ring import ring_attention, ring_permutation
from .base import Strategy, register


@register
class Ring(Strategy):
    name = "ring"
    summary = "K/V blocks passed around a ring of P ranks by P2P, zigzag layout, LSE merge"
    use_when = "P above the KV heads, or slow all-to-all links; no head-count limit on P"
    color = "#2ca02c"

    def head_degree(self, sp, ulysses_degree, n_heads, n_kv_heads) -> int:
        return 1

    def granule(self, sp, chunks, ulysses_degree=None) -> int:
        return 2 * sp  # two zigzag pieces per rank

    def permutation(self, seq_len, sp, chunks, ulysses_degree=None) -> torch.Tensor:
        return ring_permutation(seq_len, sp)

    def attend(self, strategy, x, w, rope, cu_seqlens):
        return ring_attention(x, w, rope, group=strategy.group, causal=strategy.causal,
                              softmax_scale=strategy.softmax_scale, cu_seqlens=cu_seqlens)  # fmt: skip
