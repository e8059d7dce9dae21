"""Triton forward: one query block against a range of keys, online softmax in fp32.

Writes the output (any float dtype) and the natural-log LSE, or merges the block's result into
running fp32 ``(out, lse)`` accumulators in place (``ACCUMULATE``), so an FPDT pipeline needs no
separate merge pass. Causal masking is at global offsets: key ``k_start+n`` is visible to query
``q_start+m`` iff ``n <= m + DELTA`` with ``DELTA = q_start - k_start``.

Packed documents (``DOCS``, a constexpr: without it the kernel compiles as if it did not exist):
row ``m`` sees the keys ``[lo[m], hi[m])`` of its span (``documents.py``: its document intersected
with the causal bound), non-decreasing along the rows. A query block visits only the key tiles
from its first row's ``lo`` to its last row's ``hi``; those inside every row's span run unmasked.

Head dims: ``D`` is the true head dim (what ``out`` holds), ``DP >= D`` the width ``q, k, v``
are laid out with (the launcher zero-pads odd dims to whole 16-byte vectors), ``BD`` the power
of two the tiles use. Strides arrive divided by the vector widths ``IV`` (inputs) and ``OV``
(output); multiplying them back by the constexprs tells Triton rows start on vector boundaries.

Tensor descriptors (``TMA``, a config switch; sm_90's copy engine): Q, K, V are loaded and the
output stored through per-head 2-D descriptors built in the kernel, whose bounds replace the
masks of the loads. Only for launches with ``TMA_OK`` (16-bit inputs, 16-byte aligned rows and
bases, no ``DOCS``); autotune considers these tiles only with ``FPDT_TMA=1`` (``triton_common``),
and then ``run`` gives Triton the global scratch the descriptors are built in. ``WS`` (with
``TMA`` only) warp-specialises the key loop: one loop over every visible tile, all masked.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRET,
    LOG2E,
    Launch,
    Tiles,
    autotune_configs,
    dot_precision,
    head_dim_block,
    pad_head_dim,
    padded_head_dim,
    run,
    seq_bucket,
    span_blocks,
    strides,
    tile,
    tma_allowed,
    vector_width,
)

# The TMA tiles clean at d <= 128 (also merging, ACCUMULATE); at d <= 64 two more fit (triton 3.6
# and 3.9). TMA_OK launches only: 16-bit, 16-byte aligned rows, no document spans.
_TMA_CLEAN = (
    "128x128 w8 s3 tma",
    "128x128 w8 s2 tma",
    "128x64 w8 s3 tma",
    "64x64 w4 s3 tma",
    "128x64 w4 s3 tma ws",
    "128x64 w4 s2 tma ws",
    "128x128 w4 s2 tma ws",
)
# The forward's tiles; autotune picks among the clean ones. 128x64 w8 s3 was 1.30x SDPA's flash
# kernel at d=128, S=16K, bf16 on an H200; 128x64 w4 s3 spills at d=128 on both targets, and
# 128x32 w4 s4 at d=111 on sm_90, 64x32 w4 s4 and 64x64 w4 s3 at d=40 on sm_80 (triton 3.6).
_CLEAN_16BIT = {
    (90, 2, 64): ("128x64 w8 s3", "128x128 w8 s3", "128x64 w4 s3", "128x32 w4 s4", "64x64 w4 s3", "64x32 w4 s4",
                  "32x32 w4 s2", *_TMA_CLEAN, "128x64 w4 s3 tma", "128x128 w4 s3 tma ws"),
    (90, 2, 128): ("128x64 w8 s3", "128x128 w8 s3", "64x64 w4 s3", "64x32 w4 s4", "128x32 w8 s3", "32x32 w4 s2",
                   *_TMA_CLEAN),
    (90, 2, 256): ("128x32 w8 s3", "64x64 w8 s2", "64x32 w8 s2", "128x32 w8 s2", "32x32 w4 s2"),
    (80, 2, 64): ("128x64 w8 s3", "128x128 w8 s3", "128x32 w4 s4", "32x32 w4 s2"),
    (80, 2, 128): ("128x64 w8 s3", "64x32 w4 s4", "128x32 w8 s3", "64x64 w8 s2", "32x32 w4 s2"),
    (80, 2, 256): ("64x32 w8 s2", "32x32 w4 s2"),
}  # fmt: skip
# The merge epilogue (ACCUMULATE: the chunk API) holds the running output tile too: fewer tiles fit.
# At d=256 every wgmma tile spills there, so the merge runs mma.sync tiles.
_CLEAN_16BIT_ACCUMULATE = _CLEAN_16BIT | {
    (90, 2, 256): ("32x32 w4 s2",),
    (80, 2, 128): tuple(n for n in _CLEAN_16BIT[80, 2, 128] if n != "64x32 w4 s4"),
}
# fp32 inputs run tf32x3 (three products per dot): about twice the registers of bf16, so small
# tiles. At d=256 no fp32 tile is spill-free; the one listed spills least (~1 KB).
_CLEAN_32BIT = {
    (90, 4, 64): ("64x32 w4 s2", "128x32 w8 s2", "64x32 w8 s2", "32x32 w4 s2"),
    (90, 4, 128): ("64x16 w4 s2", "16x32 w4 s2", "32x32 w8 s2", "16x16 w4 s2"),
    (90, 4, 256): ("16x16 w4 s2",),
    (80, 4, 64): ("64x32 w8 s2", "32x32 w4 s2"),
    (80, 4, 128): ("16x32 w4 s2", "32x32 w8 s2", "16x16 w4 s2"),
    (80, 4, 256): ("16x16 w4 s2",),
}  # fmt: skip

_tile = functools.partial(tile, TMA=False, WS=False)

TILES = Tiles(
    [
        _tile(128, 64, 8, 3),
        # Tensor-descriptor (TMA) tiles, sm_90, opt-in (FPDT_TMA=1). 128x128 is FlashAttention-3's
        # d=128 causal tile; its 128x176 (d=128) and 192x128 (d=64) cannot be built: Triton's
        # blocks and descriptor boxes are powers of two.
        _tile(128, 128, 8, 3, TMA=True),
        _tile(128, 128, 8, 2, TMA=True),
        _tile(128, 64, 8, 3, TMA=True),
        _tile(128, 64, 4, 3, TMA=True),
        _tile(64, 64, 4, 3, TMA=True),
        # Warp-specialised: num_warps=4 is the consumer group's size; triton 3.6 adds a producer
        # group and a second consumer group (12 warps, setmaxnreg). At num_warps=8 it silently
        # does not specialise, and without TMA neither.
        _tile(128, 64, 4, 3, TMA=True, WS=True),
        _tile(128, 64, 4, 2, TMA=True, WS=True),
        _tile(128, 128, 4, 2, TMA=True, WS=True),
        _tile(128, 128, 4, 3, TMA=True, WS=True),
        _tile(128, 128, 8, 3),
        _tile(128, 64, 4, 3),
        _tile(128, 32, 4, 4),
        _tile(64, 64, 4, 3),
        _tile(64, 32, 4, 4),
        _tile(128, 32, 8, 3),
        _tile(64, 64, 8, 2),
        _tile(128, 32, 8, 2),
        _tile(64, 32, 8, 2),
        _tile(64, 32, 4, 2),
        _tile(64, 16, 4, 2),
        _tile(32, 32, 8, 2),
        _tile(16, 32, 4, 2),
        _tile(16, 16, 4, 2),
        _tile(32, 32, 4, 2),  # the fallback: clean at every head dim on both targets (bf16/fp16)
    ],
    _CLEAN_16BIT | _CLEAN_32BIT,
    _CLEAN_16BIT_ACCUMULATE | _CLEAN_32BIT,
    # Measured with the document spans: sm_80 128x64 spills 24-48 B (triton 3.9), sm_90 128x128
    # spills 148 B (triton 3.6). Kept: sm_90 128x64 spills 8 B on triton 3.9 only at d=111 with
    # accumulation, not causal, and is clean on 3.6 and at d=128, where it is the main tile.
    spill_docs={(80, 2, 128): ("128x64 w8 s3",), (90, 2, 128): ("128x128 w8 s3",)},
)


@triton.jit
def _fwd_inner(
    b_q, p_kn, p_vn, b_mi, b_li, b_acc, n0, o_mg, b_lo, b_hi, o_n, o_d, stride_ks, stride_vs,
    Sk, DELTA, qk_scale,
    MASKED: tl.constexpr,
    SCALE_POSITIVE: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    DP: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax: returns the updated running (max, sum, acc).

    ``MASKED=False`` is the fast path for blocks every row sees in full; ``MASKED=True`` applies
    the bounds (``n < Sk``) and causal (``n <= m + DELTA``) masks, or with ``DOCS`` the rows'
    spans ``b_lo <= n < b_hi`` (which lie inside ``[0, Sk]``); ``o_mg`` are the rows' indices.
    With ``TMA``, ``p_kn, p_vn`` are the head's K/V descriptors, read at row ``n0``.

    ``SCALE_POSITIVE``: the row maximum commutes with a positive scale (rounding is monotonic, so
    the maximum is the same to the bit), so only the maxima are scaled and each score's scale and
    shift are one FMA: one multiply fewer per score than scaling the scores first. A zero or
    negative scale scales the scores first.
    """
    m_d = o_d < DP  # folds away when DP == BD
    if MASKED:
        m_n = (n0 + o_n) < Sk
        m_k = m_n[None, :] & m_d[:, None]
        m_v = m_n[:, None] & m_d[None, :]
    else:
        m_k = m_d[:, None]
        m_v = m_d[None, :]
    if TMA:
        # The copy engine zero-fills rows past Sk and columns past DP: no masks on the loads.
        b_kt = tl.trans(p_kn.load([n0, 0]))
        b_v = p_vn.load([n0, 0])
    else:
        b_kt = tl.load(p_kn + o_n[None, :] * stride_ks + o_d[:, None], mask=m_k, other=0.0)
        b_v = tl.load(p_vn + o_n[:, None] * stride_vs + o_d[None, :], mask=m_v, other=0.0)
    if UPCAST:
        b_kt = b_kt.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION)
    if not SCALE_POSITIVE:
        b_s = b_s * qk_scale
    if MASKED:
        if DOCS:
            m_vis = ((n0 + o_n)[None, :] >= b_lo[:, None]) & ((n0 + o_n)[None, :] < b_hi[:, None])
        else:
            m_vis = m_n[None, :]
            if CAUSAL:
                m_vis = m_vis & ((n0 + o_n)[None, :] <= o_mg[:, None] + DELTA)
        b_s = tl.where(m_vis, b_s, float("-inf"))
    b_smax = tl.max(b_s, 1)
    if SCALE_POSITIVE:
        b_smax = b_smax * qk_scale
    b_mnew = tl.maximum(b_mi, b_smax)
    if MASKED:
        # A row with no visible key so far keeps m = -inf; shift by 0 there to avoid inf - inf.
        b_msafe = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)
    else:
        b_msafe = b_mnew
    if SCALE_POSITIVE:
        b_p = tl.exp2(b_s * qk_scale - b_msafe[:, None])
    else:
        b_p = tl.exp2(b_s - b_msafe[:, None])
    b_alpha = tl.exp2(b_mi - b_msafe)
    b_li = b_li * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return b_mnew, b_li, b_acc


@triton.autotune(
    configs=autotune_configs(TILES.configs),
    key=["D", "GROUPS", "CAUSAL", "DOCS", "ACCUMULATE", "SQ_BUCKET", "SK_BUCKET", "PRECISION"],
    prune_configs_by={"early_config_prune": TILES.prune},
    # Autotuning runs the kernel several times; accumulators must not see every run.
    restore_value=["Out", "Lse"],
)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Spans,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    Sq, Sk, H, DELTA, qk_scale,
    SQ_BUCKET, SK_BUCKET,
    SCALE_POSITIVE: tl.constexpr,
    GROUPS: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BD: tl.constexpr,
    IV: tl.constexpr,
    OV: tl.constexpr,
    TMA_OK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
):  # fmt: skip
    stride_qb, stride_qs, stride_qh = stride_qb * IV, stride_qs * IV, stride_qh * IV
    stride_kb, stride_ks, stride_kh = stride_kb * IV, stride_ks * IV, stride_kh * IV
    stride_vb, stride_vs, stride_vh = stride_vb * IV, stride_vs * IV, stride_vh * IV
    stride_ob, stride_os, stride_oh = stride_ob * OV, stride_os * OV, stride_oh * OV
    n_m = tl.cdiv(Sq, BM)
    i_m = tl.program_id(0)
    if CAUSAL:
        # Bottom query blocks see the most keys: launch them first for a balanced tail.
        i_m = n_m - 1 - i_m
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hk = i_h // GROUPS
    m_start = i_m * BM

    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_m = (m_start + o_m) < Sq

    tl.static_assert(TMA or not WS, "warp specialisation needs the TMA loads")
    if TMA:
        tl.static_assert(TMA_OK and not DOCS, "TMA tiles need 16-byte aligned rows and no document spans")
        # One 2-D descriptor per head, built in the kernel (in the scratch set_tma_allocator
        # provides): the copy engine bounds it, so rows past Sq/Sk and columns past DP read as 0.
        q_desc = tl.make_tensor_descriptor(
            Q + i_b * stride_qb + i_h * stride_qh, shape=[Sq, DP], strides=[stride_qs, 1], block_shape=[BM, BD]
        )
        b_q = q_desc.load([m_start, 0])
        p_k = tl.make_tensor_descriptor(
            K + i_b * stride_kb + i_hk * stride_kh, shape=[Sk, DP], strides=[stride_ks, 1], block_shape=[BN, BD]
        )
        p_v = tl.make_tensor_descriptor(
            V + i_b * stride_vb + i_hk * stride_vh, shape=[Sk, DP], strides=[stride_vs, 1], block_shape=[BN, BD]
        )
    else:
        p_q = Q + i_b * stride_qb + i_h * stride_qh + m_start.to(tl.int64) * stride_qs
        b_q = tl.load(p_q + o_m[:, None] * stride_qs + o_d[None, :], mask=m_m[:, None] & (o_d < DP)[None, :], other=0.0)
        p_k = K + i_b * stride_kb + i_hk * stride_kh
        p_v = V + i_b * stride_vb + i_hk * stride_vh
    if UPCAST:
        b_q = b_q.to(tl.float32)

    b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    if DOCS:
        # Spans [B, 2, Sq] hold lo then hi of every row; rows past Sq get the empty span [0, 0).
        p_lo = Spans + i_b * 2 * Sq + m_start
        p_hi = p_lo + Sq
        m_last = tl.minimum(BM, Sq - m_start) - 1
        b_lo = tl.load(p_lo + o_m, mask=m_m, other=0)
        b_hi = tl.load(p_hi + o_m, mask=m_m, other=0)
        # Spans never decrease: the first row's lo and the last row's hi bound every row's keys,
        # and [last row's lo, first row's hi) is in every row's span.
        v_lo, f_hi, f_lo, v_hi = tl.load(p_lo), tl.load(p_hi), tl.load(p_lo + m_last), tl.load(p_hi + m_last)
        n_start, f0, f1, n_head, n_masked = span_blocks(v_lo, v_hi, f_lo, f_hi, BN)
        p_kn = p_k + f0.to(tl.int64) * stride_ks
        p_vn = p_v + f0.to(tl.int64) * stride_vs
        for n0 in range(f0, f1, BN):
            b_mi, b_li, b_acc = _fwd_inner(
                b_q, p_kn, p_vn, b_mi, b_li, b_acc, n0, m_start + o_m, b_lo, b_hi, o_n, o_d, stride_ks, stride_vs,
                Sk, DELTA, qk_scale, MASKED=False, SCALE_POSITIVE=SCALE_POSITIVE, CAUSAL=CAUSAL, DOCS=DOCS,
                UPCAST=UPCAST, PRECISION=PRECISION, DP=DP, TMA=False,
            )  # fmt: skip
            p_kn += BN * stride_ks
            p_vn += BN * stride_vs
        # The masked tiles, in one loop (one copy of the masked code): before f0, then from f1 on.
        for j in range(0, n_masked):
            n0 = tl.where(j < n_head, n_start + j * BN, f1 + (j - n_head) * BN)
            b_mi, b_li, b_acc = _fwd_inner(
                b_q, p_k + n0.to(tl.int64) * stride_ks, p_v + n0.to(tl.int64) * stride_vs, b_mi, b_li, b_acc,
                n0, m_start + o_m, b_lo, b_hi, o_n, o_d, stride_ks, stride_vs,
                Sk, DELTA, qk_scale, MASKED=True, SCALE_POSITIVE=SCALE_POSITIVE, CAUSAL=CAUSAL, DOCS=DOCS,
                UPCAST=UPCAST, PRECISION=PRECISION, DP=DP, TMA=False,
            )  # fmt: skip
    else:
        # Keys [0, n_full) are visible to every row of the block and in bounds: no masks there.
        # Keys [n_full, n_end) need the bounds and (causal) diagonal masks. Beyond n_end: skipped.
        if CAUSAL:
            n_end = tl.minimum(Sk, tl.maximum(m_start + BM + DELTA, 0))
            n_full = tl.minimum(tl.maximum(m_start + DELTA + 1, 0), Sk) // BN * BN
        else:
            n_end = Sk
            n_full = Sk // BN * BN

        # The K/V pointers advance by one block per step (64-bit pointer arithmetic, so offsets
        # never overflow int32 at millions of tokens); descriptors are read at n0 instead.
        p_kn = p_k
        p_vn = p_v
        if WS:
            # Triton 3.6 warp-specialises a loop (producer warps issue the TMA copies, two consumer
            # warp groups the wgmma) only when no loop follows it (a second loop fails its pass on
            # sm_90): one loop over every visible tile, all masked.
            n_full = 0
        else:
            for n0 in range(0, n_full, BN):
                b_mi, b_li, b_acc = _fwd_inner(
                    b_q, p_kn, p_vn, b_mi, b_li, b_acc, n0, m_start + o_m, o_m, o_m, o_n, o_d, stride_ks, stride_vs,
                    Sk, DELTA, qk_scale, MASKED=False, SCALE_POSITIVE=SCALE_POSITIVE, CAUSAL=CAUSAL, DOCS=DOCS,
                    UPCAST=UPCAST, PRECISION=PRECISION, DP=DP, TMA=TMA,
                )  # fmt: skip
                if not TMA:
                    p_kn += BN * stride_ks
                    p_vn += BN * stride_vs
        for n0 in tl.range(n_full, n_end, BN, warp_specialize=WS):
            b_mi, b_li, b_acc = _fwd_inner(
                b_q, p_kn, p_vn, b_mi, b_li, b_acc, n0, m_start + o_m, o_m, o_m, o_n, o_d, stride_ks, stride_vs,
                Sk, DELTA, qk_scale, MASKED=True, SCALE_POSITIVE=SCALE_POSITIVE, CAUSAL=CAUSAL, DOCS=DOCS,
                UPCAST=UPCAST, PRECISION=PRECISION, DP=DP, TMA=TMA,
            )  # fmt: skip
            if not TMA:
                p_kn += BN * stride_ks
                p_vn += BN * stride_vs

    # Natural-log LSE of the block; rows that saw no key: out = 0, lse = -inf.
    m_seen = b_li > 0.0
    b_lse = tl.where(m_seen, (b_mi + tl.log2(tl.where(m_seen, b_li, 1.0))) / LOG2E, float("-inf"))
    b_out = b_acc / tl.where(m_seen, b_li, 1.0)[:, None]

    p_l = Lse + i_b * stride_lb + i_h * stride_lh + m_start + o_m
    m_o = m_m[:, None] & (o_d < D)[None, :]
    if TMA:
        # Stores through the descriptor are clipped to its [Sq, D] bounds.
        o_desc = tl.make_tensor_descriptor(
            Out + i_b * stride_ob + i_h * stride_oh, shape=[Sq, D], strides=[stride_os, 1], block_shape=[BM, BD]
        )
    else:
        p_o = Out + i_b * stride_ob + i_h * stride_oh + m_start.to(tl.int64) * stride_os
        p_o = p_o + o_m[:, None] * stride_os + o_d[None, :]
    if ACCUMULATE:
        # Online-softmax merge with the running state; safe when either side is -inf.
        b_lprev = tl.load(p_l, mask=m_m, other=float("-inf"))
        if TMA:
            b_oprev = o_desc.load([m_start, 0]).to(tl.float32)
        else:
            b_oprev = tl.load(p_o, mask=m_o, other=0.0).to(tl.float32)
        b_mx = tl.maximum(b_lprev, b_lse)
        b_mx = tl.where(b_mx == float("-inf"), 0.0, b_mx)
        b_wa = tl.exp(b_lprev - b_mx)
        b_wb = tl.exp(b_lse - b_mx)
        b_w = b_wa + b_wb
        m_any = b_w > 0.0
        b_wsafe = tl.where(m_any, b_w, 1.0)
        b_out = (b_oprev * (b_wa / b_wsafe)[:, None]) + (b_out * (b_wb / b_wsafe)[:, None])
        b_lse = tl.where(m_any, b_mx + tl.log(b_wsafe), float("-inf"))
    if TMA:
        o_desc.store([m_start, 0], b_out.to(Out.dtype.element_ty))
    else:
        tl.store(p_o, b_out.to(Out.dtype.element_ty), mask=m_o)
    tl.store(p_l, b_lse, mask=m_m)


def pad_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` with rows that load as whole 16-byte vectors (zero-padded copies where needed)."""
    dp = padded_head_dim(tensors[0].shape[-1], tensors[0].dtype)
    return tuple(pad_head_dim(t, dp) for t in tensors)


def forward_launch(q, k, v, q_start, k_start, causal, scale, out, lse, accumulate, spans=None) -> Launch:
    """The forward's launch; ``q, k, v`` as ``pad_inputs`` left them, ``out`` at the true head dim;
    ``spans``: the rows' key spans ``[B, 2, Sq]`` int32 for packed documents (``documents.py``)."""
    B, Sq, H, DP = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    iv, ov = vector_width(q, k, v), vector_width(out)
    args = dict(
        Q=q, K=k, V=v, Out=out, Lse=lse, Spans=spans,
        **dict(zip(("stride_qb", "stride_qs", "stride_qh"), strides(q, iv), strict=True)),
        **dict(zip(("stride_kb", "stride_ks", "stride_kh"), strides(k, iv), strict=True)),
        **dict(zip(("stride_vb", "stride_vs", "stride_vh"), strides(v, iv), strict=True)),
        **dict(zip(("stride_ob", "stride_os", "stride_oh"), strides(out, ov), strict=True)),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        Sq=Sq, Sk=Sk, H=H, DELTA=q_start - k_start, qk_scale=scale * LOG2E.value,
        SQ_BUCKET=seq_bucket(Sq), SK_BUCKET=seq_bucket(Sk), SCALE_POSITIVE=scale > 0,
        GROUPS=H // Hkv, CAUSAL=causal, DOCS=spans is not None, ACCUMULATE=accumulate, UPCAST=INTERPRET,
        PRECISION=dot_precision(q.dtype), D=out.shape[-1], DP=DP, BD=head_dim_block(DP), IV=iv, OV=ov,
        TMA_OK=tma_allowed(spans, q, iv, (ov, out)),
    )  # fmt: skip
    return Launch(_fwd_kernel, lambda meta: (triton.cdiv(Sq, meta["BM"]), B * H), args)


def chunk_forward(q, k, v, q_start, k_start, causal, scale, out, lse, accumulate, spans=None):
    """Launch the forward: write (or merge, ``accumulate=True``) one block into ``out``/``lse``."""
    if q.shape[0] == 0 or q.shape[1] == 0:
        return
    q, k, v = pad_inputs(q, k, v)
    # Launch on q's GPU even when it is not the current device.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        run(forward_launch(q, k, v, q_start, k_start, causal, scale, out, lse, accumulate, spans))
