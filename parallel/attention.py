"""Attention blocks: ``local`` (the oracle), ``ulysses`` and ``fpdt``, over the same weights.

Each block maps this rank's hidden states ``[B, S/P, h]`` to ``[B, S/P, h]`` (``local``: the
whole ``[B, S, h]``) using :class:`~parallel.weights.AttentionWeights` and an optional
:class:`~parallel.rotary.RotaryEmbedding` applied at global positions ``0..S-1``. Tokens are in
the strategy's layout (:meth:`AttentionStrategy.shard`): contiguous ``S/P`` slices for
``ulysses``, the FPDT permutation for ``fpdt``.

    strategy = AttentionStrategy("fpdt", group, chunks=4, offload=True)
    y_local = strategy(strategy.shard(x_full), weights, rope)    # this rank's part
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import fpdt_kernels

from .all_to_all import check_heads, head_to_seq, kv_seq_to_head, seq_to_head
from .distributed import SPGroup
from .executor import Timeline
from .fpdt import FPDTSpec, fpdt_attention_core
from .host_store import HostStore, default_host_store, saved_tensors_on_host
from .layout import check_cu_seqlens, check_layout, document_positions, local_positions, shard
from .rotary import RotaryEmbedding, apply_rotary
from .weights import AttentionWeights, project_out, project_qkv

STRATEGIES = ("local", "ulysses", "fpdt")


def check_strategy(kind: str, world: int | None = None) -> None:
    """Raise ``ValueError`` unless ``kind`` names a strategy that runs on ``world`` ranks
    (``None``: check the name only).

    ``local`` is the single-process oracle: it runs on exactly one rank.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"unknown strategy {kind!r}; use one of {STRATEGIES}")
    if kind == "local" and world not in (None, 1):
        raise ValueError(f"strategy 'local' runs in one process; got {world} ranks (use ulysses or fpdt)")


def check_setup(kind: str, seq_len: int, world: int, chunks: int, n_heads: int, n_kv_heads: int) -> None:
    """Every check a strategy makes before it runs, in the order a user should fix them: the
    strategy itself, the head split over ``world`` ranks, then the token layout (``seq_len`` in
    ``world * chunks`` equal pieces; ``chunks`` counts only for ``fpdt``)."""
    check_strategy(kind, world)
    check_heads(n_heads, n_kv_heads, world)
    check_layout(seq_len, world, chunks if kind == "fpdt" else 1)


def _rotate(q, k, rope: RotaryEmbedding | None, cu_seqlens: torch.Tensor | None = None):
    """RoPE on the whole sequence ``[B, S, heads, d]``: at positions ``0..S-1``, or, for packed
    documents, at each token's position inside its document."""
    if rope is None:
        return q, k
    B, S = q.shape[:2]
    if cu_seqlens is None:
        cos, sin = rope.span(0, S, device=q.device)
    else:
        cos, sin = rope.tables(document_positions(cu_seqlens, B, S))
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _attend(q, k, v, causal: bool, softmax_scale: float | None, cu_seqlens: torch.Tensor | None):
    """Attention over the whole sequence ``[B, S, heads, d]``; with packed documents (offsets over
    the flattened ``[B * S]`` tokens) each token attends inside its own document only."""
    if cu_seqlens is None:
        return fpdt_kernels.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    B, S = q.shape[:2]
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    flat = [t.flatten(0, 1) for t in (q, k, v)]  # [B * S, heads, d]
    o = fpdt_kernels.flash_attention_varlen(*flat, cu_seqlens, cu_seqlens, longest, longest, causal=causal,
                                       softmax_scale=softmax_scale)  # fmt: skip
    return o.view(B, S, *o.shape[1:])


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
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
    q, k, v = project_qkv(x, w)
    q, k = _rotate(q, k, rope, cu_seqlens)
    o = _attend(q, k, v, causal, softmax_scale, cu_seqlens)
    return project_out(o, w)


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

    ``cu_seqlens``: the packed documents of the whole ``[B, S]`` sequence (see :func:`local_attention`).
    """
    check_heads(w.n_heads, w.n_kv_heads, group.size)
    check_layout(x.shape[1] * group.size, group.size, 1)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1] * group.size)
    q, k, v = project_qkv(x, w)  # [B, S/P, H, d]
    q = seq_to_head(q, group)  # -> [B, S, H/P, d]
    k, v = kv_seq_to_head(k, group), kv_seq_to_head(v, group)  # -> [B, S, Hkv', d]
    q, k = _rotate(q, k, rope, cu_seqlens)
    o = _attend(q, k, v, causal, softmax_scale, cu_seqlens)
    return project_out(head_to_seq(o, group), w)  # [B, S, H/P, d] -> [B, S/P, H, d] -> [B, S/P, h]


def fpdt_attention(
    x: torch.Tensor,
    w: AttentionWeights,
    rope: RotaryEmbedding | None = None,
    *,
    group: SPGroup,
    chunks: int,
    causal: bool = True,
    offload: bool = True,
    softmax_scale: float | None = None,
    store: HostStore | None = None,
    timeline: Timeline | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """FPDT block: ``[B, S/P, h]`` in the FPDT layout (``chunks`` chunks) -> ``[B, S/P, h]``.

    ``offload``: keep saved chunks in the host store (``store``, default the process-wide one);
    ``timeline``: record every op's start/end; ``cu_seqlens``: the packed documents of the whole
    ``[B, S]`` sequence (see :func:`local_attention`): the schedules then omit every chunk block
    whose chunks share no document.
    """
    check_heads(w.n_heads, w.n_kv_heads, group.size)
    check_layout(x.shape[1] * group.size, group.size, chunks)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1] * group.size)
    if offload and store is None:
        store = default_host_store()
    spec = FPDTSpec(
        group=group,
        chunks=chunks,
        n_heads=w.n_heads,
        n_kv_heads=w.n_kv_heads,
        head_dim=w.head_dim,
        causal=causal,
        offload=offload,
        rope=rope,
        softmax_scale=softmax_scale,
        store=store,
        timeline=timeline,
        cu_seqlens=cu_seqlens,
    )
    o = fpdt_attention_core(x, w.wqkv, w.bqkv, spec)  # [B, S/P, H, d]
    # With offload, what the output projection saves for its weight gradient (the sequence-long
    # attention output) waits in host memory too, as the chunks do: the device keeps no
    # sequence-long tensor of the block.
    with saved_tensors_on_host(store, only=o) if offload else contextlib.nullcontext():
        return project_out(o, w)


@dataclass(frozen=True)
class AttentionStrategy:
    """How a model's attention runs: ``kind`` in ``local | ulysses | fpdt`` plus its settings.

    Call it as ``strategy(x, weights, rope)``; ``shard``/``positions`` give the token layout the
    rest of the model (embeddings, labels, positions) must use.
    """

    kind: str = "local"
    group: SPGroup = SPGroup.single()
    chunks: int = 1
    offload: bool = True
    causal: bool = True
    softmax_scale: float | None = None
    store: HostStore | None = None

    def __post_init__(self):
        check_strategy(self.kind, self.group.size)
        if self.chunks < 1 or (self.kind != "fpdt" and self.chunks != 1):
            raise ValueError(f"chunks={self.chunks}: only 'fpdt' takes chunks > 1 (and chunks >= 1)")

    @property
    def layout_chunks(self) -> int:
        return self.chunks if self.kind == "fpdt" else 1

    def check(self, seq_len: int, n_heads: int, n_kv_heads: int) -> None:
        """Raise the documented ``ValueError`` if this strategy cannot run this shape."""
        check_setup(self.kind, seq_len, self.group.size, self.chunks, n_heads, n_kv_heads)

    def positions(self, seq_len: int) -> torch.Tensor:
        """Global positions of this rank's tokens (``[S/P]``)."""
        return local_positions(seq_len, self.group.size, self.layout_chunks, self.group.rank)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of a full-length tensor (inputs, labels, ...)."""
        return shard(x, self.group.size, self.layout_chunks, self.group.rank, dim)

    def __call__(
        self,
        x: torch.Tensor,
        w: AttentionWeights,
        rope: RotaryEmbedding | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ):
        if self.kind == "local":
            return local_attention(x, w, rope, causal=self.causal, softmax_scale=self.softmax_scale,
                                   cu_seqlens=cu_seqlens)  # fmt: skip
        if self.kind == "ulysses":
            return ulysses_attention(x, w, rope, group=self.group, causal=self.causal,
                                     softmax_scale=self.softmax_scale, cu_seqlens=cu_seqlens)  # fmt: skip
        return fpdt_attention(
            x,
            w,
            rope,
            group=self.group,
            chunks=self.chunks,
            causal=self.causal,
            offload=self.offload,
            softmax_scale=self.softmax_scale,
            store=self.store,
            cu_seqlens=cu_seqlens,
        )
