"""FPDT token layout: which global tokens each rank holds, and in which order.

The global sequence is cut into ``u*P`` pieces of ``c = S/(u*P)`` tokens; rank ``r`` holds
pieces ``j*P + r`` for ``j = 0..u-1``, so the all-to-all of its local chunk ``j`` rebuilds the
contiguous global span ``[j*C, (j+1)*C)`` with ``C = S/u``. With ``u = 1`` this is the Ulysses
layout (contiguous ``S/P`` slices). Example, ``S=16, P=2, u=2``: rank 0 holds tokens
``0-3, 8-11``, rank 1 holds ``4-7, 12-15``.

Positions (RoPE) and labels follow the same permutation: ``shard(labels, ...)``.
"""

from __future__ import annotations

import torch


def check_layout(seq_len: int, world: int, chunks: int) -> None:
    """Raise ``ValueError`` unless ``seq_len`` splits into ``world*chunks`` equal pieces."""
    if world < 1 or chunks < 1 or seq_len < 1:
        raise ValueError(f"seq_len={seq_len}, gpus={world} and chunks={chunks} must all be >= 1")
    if seq_len % (world * chunks):
        n = world * chunks
        raise ValueError(f"seq_len={seq_len} is not divisible by gpus*chunks={n}; use a multiple of {n}")


def permutation(seq_len: int, world: int, chunks: int) -> torch.Tensor:
    """Global token index of every position in rank-major order: ``x[:, perm]`` is the
    concatenation of the ranks' local sequences (rank 0 first). ``[S]`` int64."""
    check_layout(seq_len, world, chunks)
    c = seq_len // (world * chunks)
    # [u, P, c]: element (j, r, t) is global token j*C + r*c + t; rank-major is (r, j, t).
    return torch.arange(seq_len).reshape(chunks, world, c).transpose(0, 1).reshape(-1)


def inverse_permutation(seq_len: int, world: int, chunks: int) -> torch.Tensor:
    """``inv`` with ``x_perm[:, inv] == x``: undoes :func:`permutation`."""
    perm = permutation(seq_len, world, chunks)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(seq_len)
    return inv


def local_positions(seq_len: int, world: int, chunks: int, rank: int) -> torch.Tensor:
    """Global positions of rank ``rank``'s ``S/P`` local tokens, in local order. ``[S/P]`` int64."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside 0..{world - 1}")
    n = seq_len // world
    return permutation(seq_len, world, chunks)[rank * n : (rank + 1) * n]


def shard(x: torch.Tensor, world: int, chunks: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s local part of a full-length tensor (tokens along ``dim``)."""
    pos = local_positions(x.shape[dim], world, chunks, rank).to(x.device)
    return x.index_select(dim, pos)


def unshard(shards: list[torch.Tensor], chunks: int, dim: int = 1) -> torch.Tensor:
    """Rebuild the full-length tensor from every rank's local part (rank order)."""
    world = len(shards)
    full = torch.cat(shards, dim=dim)
    inv = inverse_permutation(full.shape[dim], world, chunks).to(full.device)
    return full.index_select(dim, inv)


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` are document offsets over the flattened
    ``[batch * seq_len]`` tokens (flash-attn's varlen convention): int32, starting at 0, strictly
    increasing, ending at ``batch * seq_len``, every row boundary a document boundary."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of document offsets, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")  # fmt: skip
    cu = cu_seqlens.tolist()
    total = batch * seq_len
    if cu[0] != 0 or cu[-1] != total or any(b <= a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must increase strictly from 0 to B*S={total}; got {cu[:6]}...{cu[-2:]}")
    missing = sorted(set(range(0, total, seq_len)) - set(cu))
    if missing:
        raise ValueError(f"every row boundary must be a document boundary (B={batch}, S={seq_len}); "
                         f"cu_seqlens lacks {missing[:4]}")  # fmt: skip


def document_positions(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Each token's position inside its document, ``[batch, seq_len]`` int64: positions restart at
    0 at every document start (RoPE per document)."""
    check_cu_seqlens(cu_seqlens, batch, seq_len)
    flat = torch.arange(batch * seq_len, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()
    doc = torch.searchsorted(starts, flat, right=True) - 1
    return (flat - starts[doc]).reshape(batch, seq_len)
