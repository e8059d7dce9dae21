"""``torch`` backend: PyTorch's memory-efficient CPU flash-attention kernel, one block at a time.

``aten._scaled_dot_product_flash_attention_for_cpu`` returns an LSE and its backward takes the
(merged) output and LSE, which is exactly the chunk contract. It only knows "no mask" and
"top-left causal", so a causal block at arbitrary global offsets is cut into at most two pieces
it covers (see ``_pieces``); no ``[Sq, Sk]`` mask is ever built. Packed documents: one call per
document piece of the block (``pieces_forward``). CPU tensors only: for CUDA tensors
``fpdt_kernels.backend.resolve_backend`` turns a forced ``torch`` into ``naive``.
"""

from __future__ import annotations

import torch

from . import naive
from .common import accumulator_dtype

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _pieces(sq: int, sk: int, q_start: int, k_start: int, causal: bool):
    """Split a block into ``(rows, keys, top_left_causal)`` pieces with disjoint keys per row.

    Key ``n`` is visible to query ``m`` iff ``n <= m + delta`` with ``delta = q_start - k_start``.
    """
    rows, keys = slice(0, sq), slice(0, sk)
    if not causal:
        return [(rows, keys, False)]
    delta = q_start - k_start
    if delta >= sk - 1:  # every key is at or before every query
        return [(rows, keys, False)]
    if delta + sq - 1 < 0:  # no query sees any key
        return []
    if delta <= 0:  # rows m < -delta see nothing; from row -delta on it is top-left causal
        return [(slice(-delta, sq), keys, True)]
    # 0 < delta < sk-1: keys 0..delta are visible to every row; key delta+1+n' is visible to
    # row 1+m' iff n' <= m', i.e. top-left causal on (rows 1.., keys delta+1..).
    pieces = [(rows, slice(0, delta + 1), False)]
    if sq > 1:
        pieces.append((slice(1, sq), slice(delta + 1, sk), True))
    return pieces


def _heads_first(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    # [B, S, Hkv, d] -> [B, Hkv*groups, S, d] (query head h reads KV head h // groups).
    if groups > 1:
        x = x.repeat_interleave(groups, dim=2)
    return x.transpose(1, 2)


def chunk_forward(q, k, v, q_start, k_start, causal, scale, out, lse):
    """Merge the block's attention into the fp32 accumulators ``out``/``lse`` in place."""
    groups = q.shape[2] // k.shape[2]
    for rows, keys, top_left in _pieces(q.shape[1], k.shape[1], q_start, k_start, causal):
        o_blk, lse_blk = _flash_fwd(
            _heads_first(q[:, rows]),
            _heads_first(k[:, keys], groups),
            _heads_first(v[:, keys], groups),
            0.0,
            top_left,
            scale=scale,
        )
        new_out, new_lse = naive.merge_attention(out[:, rows], lse[:, :, rows], o_blk.transpose(1, 2), lse_blk)
        out[:, rows] = new_out
        lse[:, :, rows] = new_lse


def chunk_backward(do, q, k, v, out, lse, q_start, k_start, causal, scale, dq, dk, dv):
    """Accumulate the block's gradients into fp32 ``dq, dk, dv`` (``out``/``lse`` are merged)."""
    Sq, H = q.shape[1], q.shape[2]
    groups = H // k.shape[2]
    out = out.to(q.dtype)
    do = do.to(q.dtype)
    for rows, keys, top_left in _pieces(Sq, k.shape[1], q_start, k_start, causal):
        dq_p, dk_p, dv_p = _flash_bwd(
            _heads_first(do[:, rows]),
            _heads_first(q[:, rows]),
            _heads_first(k[:, keys], groups),
            _heads_first(v[:, keys], groups),
            _heads_first(out[:, rows]),
            lse[:, :, rows].to(accumulator_dtype(q.dtype)).contiguous(),
            0.0,
            top_left,
            scale=scale,
        )
        dq[:, rows] += dq_p.transpose(1, 2)
        dk[:, keys] += _sum_query_heads(dk_p.transpose(1, 2), groups)
        dv[:, keys] += _sum_query_heads(dv_p.transpose(1, 2), groups)


def pieces_forward(q, k, v, pieces, causal, scale, out, lse):
    """``chunk_forward`` on each document's piece of the block (``documents.Piece``)."""
    for p in pieces:
        b = slice(p.b, p.b + 1)
        chunk_forward(
            q[b, p.rows], k[b, p.keys], v[b, p.keys], p.q_start, p.k_start, causal, scale, out[b, p.rows],
            lse[b, :, p.rows],
        )  # fmt: skip


def pieces_backward(do, q, k, v, out, lse, pieces, causal, scale, dq, dk, dv):
    """``chunk_backward`` on each document's piece of the block (``documents.Piece``)."""
    for p in pieces:
        b = slice(p.b, p.b + 1)
        chunk_backward(
            do[b, p.rows], q[b, p.rows], k[b, p.keys], v[b, p.keys], out[b, p.rows], lse[b, :, p.rows],
            p.q_start, p.k_start, causal, scale, dq[b, p.rows], dk[b, p.keys], dv[b, p.keys],
        )  # fmt: skip


def covers_whole_block(sq: int, sk: int, q_start: int, causal: bool) -> bool:
    """True when one call of the CPU kernel covers every row and key (no merge needed): non-causal,
    or causal with the diagonal at the top-left (``q_start = 0``, e.g. ``Sq == Sk``)."""
    pieces = _pieces(sq, sk, q_start, 0, causal)
    return len(pieces) == 1 and pieces[0][0] == slice(0, sq) and pieces[0][1] == slice(0, sk)


def flash_forward(q, k, v, causal, scale):
    """``flash_attention``'s forward where ``covers_whole_block``: ``(out, lse)`` straight from the
    CPU kernel, ``out`` in the input dtype (no fp32 accumulator, no merge), as SDPA would."""
    groups = q.shape[2] // k.shape[2]
    _, _, top_left = _pieces(q.shape[1], k.shape[1], k.shape[1] - q.shape[1], 0, causal)[0]
    out, lse = _flash_fwd(_heads_first(q), _heads_first(k, groups), _heads_first(v, groups), 0.0, top_left, scale=scale)
    return out.transpose(1, 2), lse  # [B, H, Sq, d] (laid out as bshd) -> [B, Sq, H, d]


def flash_backward(do, q, k, v, out, lse, causal, scale):
    """The backward of ``flash_forward``: ``(dq, dk, dv)`` in the input dtype, no fp32 copies."""
    Sq, Sk = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    _, _, top_left = _pieces(Sq, Sk, Sk - Sq, 0, causal)[0]
    dq, dk, dv = _flash_bwd(
        _heads_first(do), _heads_first(q), _heads_first(k, groups), _heads_first(v, groups), _heads_first(out),
        lse, 0.0, top_left, scale=scale,
    )  # fmt: skip
    dq, dk, dv = (g.transpose(1, 2) for g in (dq, dk, dv))  # [B, H, S, d] -> [B, S, H, d]
    return dq, _sum_query_heads(dk, groups), _sum_query_heads(dv, groups)


def _sum_query_heads(g: torch.Tensor, groups: int) -> torch.Tensor:
    """A K/V gradient per query head ``[B, n, H, d]`` summed over the ``groups`` query heads that
    share each K/V head: ``[B, n, H / groups, d]``. Without sharing (MHA) it is ``g`` itself, not a
    copy: at long chunks a copy is one more dK-sized temporary at the backward's peak."""
    if groups == 1:
        return g
    B, n, H, D = g.shape
    return g.reshape(B, n, H // groups, groups, D).sum(3)
