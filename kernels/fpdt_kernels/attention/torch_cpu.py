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
    if sq == 0 or sk == 0:  # no (query, key) pair; the CPU kernel would die of SIGFPE on it
        return []
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


def _prescaled(scale: float, causal: bool) -> bool:
    """The CPU kernel masks before it scales, so with a causal mask a scale <= 0 turns masked
    scores (-inf) into NaN (0) or +inf (< 0): then ``q * scale`` runs at scale 1 (the same scores),
    and the backward multiplies dQ by ``scale`` (the chain rule)."""
    return causal and scale <= 0


def _kernel_scale(q: torch.Tensor, scale: float, causal: bool) -> tuple[torch.Tensor, float, float]:
    """``(q, scale, dq_factor)`` for the CPU kernel: unchanged (``dq_factor`` 1) unless ``_prescaled``."""
    return (q * scale, 1.0, scale) if _prescaled(scale, causal) else (q, scale, 1.0)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [B, S, heads, d] -> [B, heads, S, d]


def _query_groups(q: torch.Tensor, k: torch.Tensor) -> list[slice]:
    """The query heads as ``groups = H / Hkv`` strided slices, slice ``g`` holding heads
    ``j * groups + g`` (query head ``h`` reads KV head ``h // groups``): each slice lines up one
    to one with the KV heads, so the kernel runs on the unexpanded K/V. Expanding K/V to every
    query head (and its dK/dV per query head) would hold ``groups`` times their bytes, which the
    GPU kernels never do, and the simulated device memory of a CPU run must not either."""
    groups = q.shape[2] // k.shape[2]
    return [slice(g, None, groups) for g in range(groups)]


def chunk_forward(q, k, v, q_start, k_start, causal, scale, out, lse):
    """Merge the block's attention into the fp32 accumulators ``out``/``lse`` in place."""
    q, scale, _ = _kernel_scale(q, scale, causal)
    for rows, keys, top_left in _pieces(q.shape[1], k.shape[1], q_start, k_start, causal):
        k_p, v_p = _heads_first(k[:, keys]), _heads_first(v[:, keys])
        for g in _query_groups(q, k):
            o_blk, lse_blk = _flash_fwd(_heads_first(q[:, rows, g]), k_p, v_p, 0.0, top_left, scale=scale)
            naive.merge_into(out[:, rows, g], lse[:, g, rows], o_blk.transpose(1, 2), lse_blk)


def chunk_backward(do, q, k, v, out, lse, q_start, k_start, causal, scale, dq, dk, dv):
    """Accumulate the block's gradients into fp32 ``dq, dk, dv`` (``out``/``lse`` are merged)."""
    out = out.to(q.dtype)
    do = do.to(q.dtype)
    lse = lse.to(accumulator_dtype(q.dtype))
    q, scale, dq_factor = _kernel_scale(q, scale, causal)
    for rows, keys, top_left in _pieces(q.shape[1], k.shape[1], q_start, k_start, causal):
        k_p, v_p = _heads_first(k[:, keys]), _heads_first(v[:, keys])
        for g in _query_groups(q, k):
            dq_p, dk_p, dv_p = _flash_bwd(
                _heads_first(do[:, rows, g]), _heads_first(q[:, rows, g]), k_p, v_p, _heads_first(out[:, rows, g]),
                lse[:, g, rows].contiguous(), 0.0, top_left, scale=scale,
            )  # fmt: skip
            dq[:, rows, g] += dq_p.transpose(1, 2) if dq_factor == 1.0 else dq_factor * dq_p.transpose(1, 2)
            dk[:, keys] += dk_p.transpose(1, 2)
            dv[:, keys] += dv_p.transpose(1, 2)


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
    _, _, top_left = _pieces(q.shape[1], k.shape[1], k.shape[1] - q.shape[1], 0, causal)[0]
    q, scale, _ = _kernel_scale(q, scale, causal)
    groups = _query_groups(q, k)
    if len(groups) == 1:
        out, lse = _flash_fwd(_heads_first(q), _heads_first(k), _heads_first(v), 0.0, top_left, scale=scale)
        return out.transpose(1, 2), lse  # [B, H, Sq, d] (laid out as bshd) -> [B, Sq, H, d]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=accumulator_dtype(q.dtype))
    k, v = _heads_first(k), _heads_first(v)
    for g in groups:
        o_g, lse[:, g] = _flash_fwd(_heads_first(q[:, :, g]), k, v, 0.0, top_left, scale=scale)
        out[:, :, g] = o_g.transpose(1, 2)
    return out, lse


def flash_backward(do, q, k, v, out, lse, causal, scale):
    """The backward of ``flash_forward``: ``(dq, dk, dv)`` in the input dtype. With GQA the K/V
    gradients of the query-head groups are summed in fp32, then cast once."""
    Sq, Sk = q.shape[1], k.shape[1]
    _, _, top_left = _pieces(Sq, Sk, Sk - Sq, 0, causal)[0]
    q, scale, dq_factor = _kernel_scale(q, scale, causal)
    groups = _query_groups(q, k)
    if len(groups) == 1:
        grads = _flash_bwd(_heads_first(do), _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(out),
                           lse, 0.0, top_left, scale=scale)  # fmt: skip
        dq, dk, dv = (g.transpose(1, 2) for g in grads)  # [B, H, S, d] -> [B, S, H, d]
        return (dq if dq_factor == 1.0 else dq * dq_factor), dk, dv
    dq = torch.empty_like(q)
    acc = accumulator_dtype(k.dtype)
    dk, dv = torch.zeros(k.shape, dtype=acc), torch.zeros(v.shape, dtype=acc)
    k_h, v_h = _heads_first(k), _heads_first(v)
    for g in groups:
        dq_g, dk_g, dv_g = _flash_bwd(
            _heads_first(do[:, :, g]), _heads_first(q[:, :, g]), k_h, v_h, _heads_first(out[:, :, g]),
            lse[:, g].contiguous(), 0.0, top_left, scale=scale,
        )  # fmt: skip
        dq[:, :, g] = dq_g.transpose(1, 2) if dq_factor == 1.0 else dq_factor * dq_g.transpose(1, 2)
        dk += dk_g.transpose(1, 2)
        dv += dv_g.transpose(1, 2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
