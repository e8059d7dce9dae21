"""``usp``: Ulysses x ring (unified sequence parallelism). The ``sp`` ranks split into groups of
``U`` consecutive ranks (``parallel.ulysses_degree``; inside a node) that exchange heads by
all-to-all, and ``R = sp / U`` ring positions that pass K/V around a ring across the groups. K/V
heads are replicated only when ``U`` exceeds them, so ``sp`` can grow past the head count.

FPDT's chunk pipeline is not stacked on the Ulysses part: the ring already bounds the attention
state per rank to its own K/V block and two received ones of ``S/R`` tokens, and chunking the
Ulysses all-to-all as well would multiply the ring's point-to-point steps by ``u`` for a saving
the ring degree gives anyway.
"""

from __future__ import annotations

import torch

from ..distributed import check_ulysses_degree
from ..ring import ring_permutation, split_sp_group, usp_attention
from .base import Strategy, register

# The default Ulysses degree never exceeds the GPUs of one node: its all-to-alls stay on NVLink.
GPUS_PER_NODE = 8


def default_ulysses_degree(sp: int, n_heads: int, n_kv_heads: int) -> int:
    """The largest ``U`` dividing ``sp`` with ``U <= 8`` (one node) that splits both the query and
    the K/V heads evenly (no K/V replication)."""
    return max(u for u in range(1, min(sp, GPUS_PER_NODE) + 1) if sp % u == 0 and n_heads % u == 0
               and n_kv_heads % u == 0)  # fmt: skip


@register
class USP(Strategy):
    name = "usp"
    summary = "Ulysses all-to-all inside groups of U ranks x ring attention across the sp/U groups"
    use_when = "sp past the KV heads or past a node: Ulysses inside the node, the ring across nodes"
    color = "#9467bd"
    uses_ulysses_degree = True

    def head_degree(self, sp, ulysses_degree, n_heads, n_kv_heads) -> int:
        if ulysses_degree is None:
            return default_ulysses_degree(sp, n_heads, n_kv_heads)
        check_ulysses_degree(sp, ulysses_degree)
        return ulysses_degree

    def granule(self, sp, chunks, ulysses_degree=None) -> int:
        return 2 * sp  # two zigzag pieces per ring position, each split over the Ulysses group

    def _split(self, sp, ulysses_degree) -> tuple[int, int]:
        if ulysses_degree is None:
            raise ValueError("usp's layout needs the resolved Ulysses degree (parallel.parallelize resolves it)")
        return sp // ulysses_degree, ulysses_degree

    def permutation(self, seq_len, sp, chunks, ulysses_degree=None) -> torch.Tensor:
        ring, ulysses = self._split(sp, ulysses_degree)
        return ring_permutation(seq_len, ring, ulysses)

    def subgroups(self, group, ulysses_degree):
        return split_sp_group(group, ulysses_degree)

    def attend(self, strategy, x, w, rope, cu_seqlens):
        ulysses, ring = strategy.process_groups()
        return usp_attention(x, w, rope, ulysses=ulysses, ring=ring, causal=strategy.causal,
                             softmax_scale=strategy.softmax_scale, cu_seqlens=cu_seqlens)  # fmt: skip
