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
    if world < 1 or chunks < 1:
        raise ValueError(f"gpus={world} and chunks={chunks} must both be >= 1")
    if seq_len < 1 or seq_len % (world * chunks):
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
