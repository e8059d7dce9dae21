"""Packed documents: checks of ``cu_seqlens`` and what each backend needs to attend inside them.

Two conventions, both flash-attn's int32 cumulative offsets ``[n_docs + 1]`` starting at 0:

- varlen (``flash_attention_varlen``): ``cu_seqlens_q`` over the ``total_q`` query tokens and
  ``cu_seqlens_k`` over the ``total_k`` key tokens; document ``i`` is rows
  ``cu_q[i]..cu_q[i+1]`` and keys ``cu_k[i]..cu_k[i+1]``, causal aligned bottom-right in it.
- chunk (``attention_chunk_forward/backward(cu_seqlens=)``): offsets over the flattened
  ``[B * S]`` tokens of the whole packed batch, ``S = cu[-1] / B``, every row boundary a document
  boundary; a block's rows and keys sit at global positions ``q_start..`` and ``k_start..`` of
  each row, so row ``b``'s position ``p`` is flattened position ``b * S + p``.

The Triton kernels take *spans*: for each query row the keys ``[lo, hi)`` it sees (its document
intersected with the causal bound), and for each key the rows ``[lo, hi)`` that see it. Both are
non-decreasing along the block, so a tile's visible keys (rows) lie between its first row's ``lo``
and its last row's ``hi``, and the kernels visit only those tiles. Spans are built with torch ops
on the tensors' device, so a pipeline's chunk calls never wait on the host. The torch backend
takes *pieces*: one ``(row, rows, keys, q_start, k_start)`` block per document a block touches.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch


class Piece(NamedTuple):
    """The part of a block inside one document: batch row ``b``, query rows ``rows`` and keys
    ``keys`` of the block, at global positions ``q_start`` and ``k_start`` (for the causal rule)."""

    b: int
    rows: slice
    keys: slice
    q_start: int
    k_start: int


def _check_tensor(name: str, cu) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 offsets, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (flash-attn's convention), got {cu.dtype}; use .int()")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D [n_docs + 1] with n_docs >= 1, got shape {tuple(cu.shape)}")


def _check_values(name: str, offsets: list[int], total: int | None) -> None:
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    bad = next((i for i in range(1, len(offsets)) if offsets[i] < offsets[i - 1]), None)
    if bad is not None:
        raise ValueError(
            f"{name} must not decrease (document lengths >= 0); got {offsets[bad - 1]} then {offsets[bad]} at {bad}"
        )
    if total is not None and offsets[-1] != total:
        raise ValueError(f"{name} must end at the tensors' token count {total}, got {offsets[-1]}")


def check_varlen(cu_q, cu_k, total_q: int, total_k: int, max_q, max_k, device) -> tuple[list[int], list[int]]:
    """Check varlen offsets and maxima against the tensors; return the offsets as lists."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        _check_tensor(name, cu)
        if cu.device.type != "cpu" and cu.device != device:
            raise ValueError(f"{name} is on {cu.device}; put it on the CPU or on q's device {device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must count the same documents, got {cu_q.numel() - 1} and "
            f"{cu_k.numel() - 1}"
        )
    offsets_q, offsets_k = cu_q.tolist(), cu_k.tolist()
    _check_values("cu_seqlens_q", offsets_q, total_q)
    _check_values("cu_seqlens_k", offsets_k, total_k)
    for name, max_len, offsets in (("max_seqlen_q", max_q, offsets_q), ("max_seqlen_k", max_k, offsets_k)):
        if isinstance(max_len, bool) or not isinstance(max_len, int):
            raise TypeError(f"{name} must be an int, got {type(max_len).__name__}")
        longest = max(b - a for a, b in pairwise(offsets))
        if max_len < longest:
            raise ValueError(f"{name}={max_len} is shorter than the longest document ({longest} tokens)")
    return offsets_q, offsets_k


def check_chunk(cu, batch: int, q_start: int, sq: int, k_start: int, sk: int, device) -> list[int] | None:
    """Check chunk-API offsets; return them as a list, or None when they live on q's GPU.

    Offsets on the CPU are checked in full (start at 0, never decrease, ``B`` rows of equal length
    whose boundaries are document boundaries, the block inside a row). Offsets already on the GPU
    are checked for dtype and shape only: reading their values would make every chunk call of a
    pipeline wait for the GPU.
    """
    _check_tensor("cu_seqlens", cu)
    if cu.device.type != "cpu":
        if cu.device != device:
            raise ValueError(f"cu_seqlens is on {cu.device}; put it on the CPU or on q's device {device}")
        if q_start < 0 or k_start < 0:
            raise ValueError(f"q_start={q_start} and k_start={k_start} must be >= 0 with cu_seqlens")
        return None
    offsets = cu.tolist()
    _check_values("cu_seqlens", offsets, None)
    total = offsets[-1]
    if batch == 0:  # an empty batch has no rows to split the offsets into
        if total != 0:
            raise ValueError(f"cu_seqlens ends at {total}, but q has B=0 rows; an empty batch takes cu_seqlens [0, 0]")
        return offsets
    if total % batch != 0:
        raise ValueError(f"cu_seqlens ends at {total}, which is not B={batch} rows of equal length")
    seq = total // batch
    missing = sorted(set(range(0, total, seq)) - set(offsets)) if seq > 0 else []
    if missing:
        raise ValueError(f"every row boundary (multiples of S={seq}) must be a document boundary; cu_seqlens "
                         f"lacks {missing[:4]}")  # fmt: skip
    for name, start, n in (("q", q_start, sq), ("k", k_start, sk)):
        if start < 0 or start + n > seq:
            raise ValueError(
                f"the {name} block [{start}, {start + n}) must lie inside a row of S={seq} tokens "
                f"(cu_seqlens[-1] / B = {total} / {batch})"
            )
    return offsets


# ---------------------------------------------------------------------------- spans (Triton)


def key_spans(rows: torch.Tensor, sk: int) -> torch.Tensor:
    """``[B, 2, Sk]`` int32 from row spans ``[B, 2, Sq]``: for each key ``n`` the rows
    ``[first, end)`` that see it. Row spans are non-decreasing, so ``{m : lo[m] <= n < hi[m]}`` runs
    from the first row with ``hi > n`` to the last row with ``lo <= n``."""
    lo, hi = rows[:, 0].contiguous(), rows[:, 1].contiguous()
    n = torch.arange(sk, device=rows.device, dtype=rows.dtype).expand(rows.shape[0], sk).contiguous()
    first = torch.searchsorted(hi, n, right=True)
    end = torch.maximum(torch.searchsorted(lo, n, right=True), first)
    return torch.stack([first, end], 1).to(torch.int32)


def _row_spans(lo: torch.Tensor, hi: torch.Tensor, sk: int) -> torch.Tensor:
    """``[B, 2, Sq]`` int32 from each row's keys ``[lo, hi)``, clamped into ``[0, Sk]``; an empty
    span stays at its ``lo``, which keeps ``hi`` non-decreasing along the rows."""
    lo = lo.clamp(0, sk)
    hi = torch.maximum(hi.clamp(max=sk), lo)
    return torch.stack([lo, hi], 1).to(torch.int32)


def chunk_spans(cu, batch, q_start, sq, k_start, sk, causal, device) -> torch.Tensor:
    """Row spans ``[B, 2, Sq]`` of a chunk-API block (see the module docstring), built on ``device``."""
    cu = cu.to(device=device, dtype=torch.int64)
    row0 = torch.arange(batch, device=device)[:, None] * (cu[-1] // batch)  # [B, 1] flattened row starts
    m = torch.arange(sq, device=device)
    doc = (torch.searchsorted(cu, row0 + q_start + m, right=True) - 1).clamp(0, cu.numel() - 2)  # [B, Sq]
    lo = cu[doc] - row0 - k_start  # in the key block's coordinates
    hi = cu[doc + 1] - row0 - k_start
    if causal:  # key k_start+n visible to query q_start+m iff n <= m + q_start - k_start
        hi = torch.minimum(hi, m + (q_start - k_start + 1))
    return _row_spans(lo, hi, sk)


def varlen_spans(cu_q, cu_k, total_q, total_k, causal, device) -> torch.Tensor:
    """Row spans ``[1, 2, total_q]`` of a varlen call (one batch row of ``total_k`` keys)."""
    cu_q = cu_q.to(device=device, dtype=torch.int64)
    cu_k = cu_k.to(device=device, dtype=torch.int64)
    r = torch.arange(total_q, device=device)
    doc = (torch.searchsorted(cu_q, r, right=True) - 1).clamp(0, cu_q.numel() - 2)
    lo, hi = cu_k[doc], cu_k[doc + 1]
    if causal:  # bottom-right: local query m sees local key n iff n <= m + len_k - len_q
        hi = torch.minimum(hi, r + cu_k[doc + 1] - cu_q[doc + 1] + 1)
    return _row_spans(lo[None], hi[None], total_k)


# ---------------------------------------------------------------------------- pieces (torch)


def chunk_pieces(offsets: list[int], batch: int, q_start: int, sq: int, k_start: int, sk: int) -> list[Piece]:
    """The block's parts inside each document, row by row (documents a block does not touch on
    both sides are not listed: those tiles are skipped)."""
    seq = offsets[-1] // batch
    pieces = []
    for b in range(batch):
        base = b * seq
        for s, e in pairwise(offsets):
            s, e = s - base, e - base  # the document in row b's positions
            r0, r1 = max(s, q_start), min(e, q_start + sq)
            c0, c1 = max(s, k_start), min(e, k_start + sk)
            if r0 < r1 and c0 < c1:
                pieces.append(Piece(b, slice(r0 - q_start, r1 - q_start), slice(c0 - k_start, c1 - k_start), r0, c0))
    return pieces


def varlen_pieces(offsets_q: list[int], offsets_k: list[int]) -> list[Piece]:
    """One piece per document with rows and keys; ``q_start = len_k - len_q`` aligns the causal
    rule bottom-right. Documents without rows or keys are not listed (their rows output 0)."""
    pieces = []
    for (a, b), (c, e) in zip(pairwise(offsets_q), pairwise(offsets_k), strict=True):
        if b > a and e > c:
            pieces.append(Piece(0, slice(a, b), slice(c, e), (e - c) - (b - a), 0))
    return pieces
