"""Pieces the whole-sequence blocks share: RoPE over the whole sequence and flash attention over
it (or over each packed document)."""

from __future__ import annotations

import torch

import fpdt_kernels

from ..layout import document_positions
from ..rotary import RotaryEmbedding, apply_rotary


def rotate(q, k, rope: RotaryEmbedding | None, cu_seqlens: torch.Tensor | None = None):
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


def attend(q, k, v, causal: bool, softmax_scale: float | None, cu_seqlens: torch.Tensor | None):
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
