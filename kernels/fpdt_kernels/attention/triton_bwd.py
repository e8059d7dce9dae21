"""Triton backward: ``delta`` preprocess, a dK/dV kernel and a dQ kernel (FlashAttention-2 style).

They take the MERGED ``out``/``lse`` of the whole attention row, so a pipeline can run them block
by block. The chunk API ACCUMULATES into fp32 ``dq, dk, dv`` buffers owned by the caller;
``flash_attention`` has the kernels write its gradients in the input dtype instead (no fp32
copies). The dK/dV kernel keeps one KV block resident and streams the query blocks of the query
heads of its GQA group; the dQ kernel keeps a query block resident and streams the KV blocks.
Both recompute ``P = exp(S - lse)``; rows whose lse is -inf (saw no key) get P = 0. Both split
their loop as the forward does: blocks every row/key sees in full run without masks; only the
diagonal and the tail blocks pay for them. Head dims and strides as in ``triton_fwd``.

Packed documents (``DOCS``, as in ``triton_fwd``): the dQ kernel walks the key tiles of its rows'
spans, the dK/dV kernel the query tiles of its keys' spans (the rows ``[lo[n], hi[n])`` that see
key ``n``, ``documents.key_spans``); tiles outside them are not visited.

dK/dV parallelism for GQA/MQA: one program per (KV block, query head), a grid of
``Sk/BN x B*H`` as for MHA, so MQA launches as many programs as MHA; the query heads of a group
add their parts into fp32 dK/dV buffers with atomics. Chosen over (a) one program walking its
group's heads, which launched only ``Sk/BN x B*Hkv`` programs and whose head loop spilled (sm_80
at d <= 64, sm_90 at d=128 with triton 3.9), and (b) a per-query-head buffer plus a reduction,
which needs a ``[B, Sk, H, d]`` fp32 buffer (GROUPS times dK/dV) where atomics need none. The
price: GQA dK/dV sums are not bit-reproducible run to run (MHA ones are). Accumulating launches
(the chunk API) add with atomics too: with one writer per element that is deterministic, and it
needs no load of the old values, so no second tile in registers.

Split dK/dV (configs with ``SPLIT``, listed for sm_90 at d=256): two programs per KV block, one
for dV and one for dK, each holding one fp32 accumulator; the only way found to give d=256 a
wgmma tile (``BN >= 64``) without register spills. Autotune weighs it against the fused tiles.

Tensor descriptors (``TMA``, a config switch of all three kernels; sm_90, as in ``triton_fwd``):
Q, K, V and dO are read through per-head 2-D descriptors whose bounds replace the load masks,
and the fused kernel adds its dQ parts by the copy engine's bulk reduction instead of one atomic
per element. Only for launches with ``TMA_OK`` (16-bit inputs, 16-byte aligned rows, the fused
kernel's fp32 dQ too, no ``DOCS``); autotune considers them only with ``FPDT_TMA=1``. ``WS`` (with
``TMA``; the dK/dV and dQ kernels) warp-specialises the loop: a producer warp issues the copies
and two consumer warp groups split the resident block's rows. Triton 3.6 builds it only for one
loop with no loop after it (so every tile of it is masked) and no atomic add after it, so those
tiles serve launches that write their outputs once: dK/dV for MHA without ``ACCUMULATE``, dQ
without ``ACCUMULATE`` (``Tiles.ws_applies``); the fused kernel has none (its dQ reductions in
the loop fail that pass too).
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
    run,
    seq_bucket,
    span_blocks,
    strides,
    tile,
    tma_allowed,
    vector_elements,
    vector_width,
)


@triton.jit
def _delta_kernel(
    Out, dO, Delta,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    Sq, H,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
):  # fmt: skip
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    m_start = i_m * BM
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = (m_start + o_m) < Sq
    mask = m_m[:, None] & (o_d < D)[None, :]
    p_o = Out + i_b * stride_ob + i_h * stride_oh + m_start.to(tl.int64) * stride_os
    p_do = dO + i_b * stride_db + i_h * stride_dh + m_start.to(tl.int64) * stride_ds
    b_o = tl.load(p_o + o_m[:, None] * stride_os + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    b_do = tl.load(p_do + o_m[:, None] * stride_ds + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    tl.store(Delta + i_b * stride_lb + i_h * stride_lh + m_start + o_m, b_delta, mask=m_m)


# The TMA tiles clean on triton 3.6 and 3.9 (sm_90, 16-bit; TMA_OK launches only, the ws ones only
# where ws_applies). At d=128 the ws tiles with BM=64 spill on both (72-248 B), 64x128 w8 and
# 64x64 w4 on 3.6 (68-172 B); the fused 32x128 tiles spill at d=128 on 3.6 (16-148 B).
_BOTH_TMA_CLEAN = ("64x64 w8 s2 tma", "64x64 w8 s3 tma", "32x64 w8 s2 tma", "32x64 w8 s3 tma")  # dK/dV and fused
_DKDV_TMA_CLEAN = {
    64: ("64x128 w4 s2 tma ws", "64x128 w4 s3 tma ws", "32x128 w4 s2 tma ws", "32x128 w4 s3 tma ws",
         "64x64 w4 s2 tma ws", "64x128 w8 s2 tma", "32x128 w8 s2 tma", "32x128 w8 s3 tma", "64x64 w4 s2 tma",
         *_BOTH_TMA_CLEAN),
    128: ("32x128 w4 s2 tma ws", "32x128 w4 s3 tma ws", "32x128 w8 s2 tma", "32x128 w8 s3 tma", *_BOTH_TMA_CLEAN),
}  # fmt: skip
_DQ_TMA_CLEAN = ("128x64 w8 s2 tma", "128x64 w8 s3 tma", "64x64 w4 s2 tma", "64x64 w4 s2 tma ws",
                 "64x64 w4 s3 tma ws", "64x128 w4 s2 tma ws")  # fmt: skip
_FUSED_TMA_CLEAN = {
    64: ("64x128 w8 s2 tma", "32x128 w8 s2 tma", "32x128 w8 s3 tma", "64x64 w4 s2 tma", *_BOTH_TMA_CLEAN),
    128: _BOTH_TMA_CLEAN,
}
# dK/dV holds two [BN, BD] fp32 accumulators: large BN needs 8 warps, and at d=256 no fused tile
# with BN >= 64 (what wgmma needs) avoids spilling: there the fused kernel runs mma.sync tiles and
# the split ones (one accumulator per program, see _dkdv_kernel) run wgmma; autotune picks.
# 32x64 w4 s3 and 32x128 w8 s3 at d=128 (sm_90): clean on triton 3.9, spill on 3.6.
_DKDV_CLEAN_16BIT = {
    (90, 2, 64): ("32x128 w8 s2", "32x128 w8 s3", "64x128 w8 s2", "64x64 w8 s2", "32x64 w4 s3", "32x32 w8 s2",
                  *_DKDV_TMA_CLEAN[64]),
    (90, 2, 128): ("32x128 w8 s2", "16x128 w8 s3", "32x64 w8 s3", "32x32 w8 s2", *_DKDV_TMA_CLEAN[128]),
    (90, 2, 256): ("32x128 w8 s3 split", "16x128 w8 s3 split", "16x64 w8 s2 split", "16x32 w8 s2", "64x32 w8 s2",
                   "32x32 w8 s2"),
    (80, 2, 64): ("32x128 w8 s2", "32x128 w8 s3", "16x128 w8 s3", "32x64 w8 s3", "32x64 w4 s3", "32x32 w8 s2"),
    (80, 2, 128): ("32x64 w8 s3", "64x64 w8 s2", "32x32 w8 s2"),
    (80, 2, 256): ("16x32 w8 s2", "32x32 w8 s2"),
}  # fmt: skip
_DQ_CLEAN_16BIT = {
    (90, 2, 64): ("128x64 w8 s2", "128x64 w8 s3", "64x64 w4 s2", "64x64 w4 s3", "128x32 w8 s2", "64x32 w4 s3",
                  "32x32 w8 s2", *_DQ_TMA_CLEAN),
    (90, 2, 128): ("128x64 w8 s2", "128x64 w8 s3", "64x64 w4 s2", "64x64 w4 s3", "128x32 w8 s2", "64x32 w4 s3",
                   "32x32 w8 s2", *_DQ_TMA_CLEAN),
    (90, 2, 256): ("64x32 w8 s2", "128x32 w8 s2", "32x32 w8 s2"),
    (80, 2, 64): ("128x32 w8 s2", "64x32 w4 s3", "32x64 w4 s3", "32x128 w8 s2", "32x32 w8 s2"),
    (80, 2, 128): ("64x32 w4 s3", "32x64 w4 s3", "32x128 w8 s2", "32x32 w8 s2"),
    (80, 2, 256): ("64x32 w8 s2", "32x32 w8 s2"),
}  # fmt: skip
# fp32 inputs (tf32x3) as in the forward: small tiles; at d=256 the listed ones spill least.
_DKDV_CLEAN_32BIT = {
    (90, 4, 64): ("32x32 w8 s2", "16x32 w8 s2", "16x32 w4 s2"),
    (90, 4, 128): ("16x16 w8 s2", "32x16 w8 s2"),
    (90, 4, 256): ("16x16 w8 s2",),
    (80, 4, 64): ("32x32 w8 s2", "16x32 w8 s2", "16x32 w4 s2"),
    (80, 4, 128): ("16x16 w8 s2", "32x16 w8 s2"),
    (80, 4, 256): ("16x16 w8 s2",),
}  # fmt: skip
_DQ_CLEAN_32BIT = {
    (90, 4, 64): ("64x32 w4 s2", "64x32 w8 s2", "128x32 w8 s2", "64x16 w4 s2", "32x32 w8 s2"),
    (90, 4, 128): ("16x32 w4 s2", "16x16 w4 s2"),
    (90, 4, 256): ("16x16 w4 s2",),
    (80, 4, 64): ("32x32 w8 s2", "32x32 w4 s2"),
    (80, 4, 128): ("16x32 w4 s2", "16x16 w4 s2"),
    (80, 4, 256): ("16x16 w4 s2",),
}  # fmt: skip

_tile = functools.partial(tile, SPLIT=False, TMA=False, WS=False)

DKDV_TILES = Tiles(
    [
        _tile(32, 128, 8, 3, SPLIT=True),
        _tile(16, 128, 8, 3, SPLIT=True),
        _tile(16, 64, 8, 2, SPLIT=True),
        _tile(32, 128, 8, 2),
        _tile(32, 128, 8, 3),
        _tile(64, 128, 8, 2),
        _tile(16, 128, 8, 3),
        _tile(64, 64, 8, 2),
        _tile(32, 64, 8, 3),
        _tile(32, 64, 4, 3),
        _tile(16, 32, 8, 2),
        _tile(64, 32, 8, 2),
        _tile(16, 32, 4, 2),
        _tile(16, 16, 8, 2),
        _tile(32, 16, 8, 2),
        # Tensor-descriptor (TMA) tiles, sm_90, opt-in (FPDT_TMA=1) as the forward's. Warp-specialised
        # ones (ws) run num_warps=4 per consumer group: triton 3.6 adds a producer warp group and a
        # second consumer group, each consumer holding half the KV block's dK/dV rows.
        _tile(64, 128, 4, 2, TMA=True, WS=True),
        _tile(64, 128, 4, 3, TMA=True, WS=True),
        _tile(32, 128, 4, 2, TMA=True, WS=True),
        _tile(32, 128, 4, 3, TMA=True, WS=True),
        _tile(64, 64, 4, 2, TMA=True, WS=True),
        _tile(64, 128, 8, 2, TMA=True),
        _tile(32, 128, 8, 2, TMA=True),
        _tile(32, 128, 8, 3, TMA=True),
        _tile(64, 64, 4, 2, TMA=True),
        _tile(64, 64, 8, 2, TMA=True),
        _tile(64, 64, 8, 3, TMA=True),
        _tile(32, 64, 8, 2, TMA=True),
        _tile(32, 64, 8, 3, TMA=True),
        _tile(32, 32, 8, 2),  # the fallback: clean at every head dim on both targets (bf16/fp16)
    ],
    _DKDV_CLEAN_16BIT | _DKDV_CLEAN_32BIT,
    # With the keys' document spans (triton 3.9): 16 B at sm_80 d=64, 24 B at sm_90 d=256.
    spill_docs={(80, 2, 64): ("32x32 w8 s2",), (90, 2, 256): ("64x32 w8 s2",)},
    # The kernel's static assert says why: no atomic add may follow a warp-specialised loop.
    ws_applies=lambda args: args["GROUPS"] == 1 and not args["ACCUMULATE"],
)
_dq_tile = functools.partial(tile, TMA=False, WS=False)
DQ_TILES = Tiles(
    [
        _dq_tile(128, 64, 8, 2),
        _dq_tile(128, 64, 8, 3),
        _dq_tile(64, 64, 4, 2),
        _dq_tile(64, 64, 4, 3),
        _dq_tile(128, 32, 8, 2),
        _dq_tile(64, 32, 4, 3),
        _dq_tile(32, 64, 4, 3),
        _dq_tile(32, 128, 8, 2),
        _dq_tile(64, 32, 8, 2),
        _dq_tile(64, 32, 4, 2),
        _dq_tile(64, 16, 4, 2),
        _dq_tile(16, 32, 4, 2),
        _dq_tile(16, 16, 4, 2),
        _dq_tile(32, 32, 4, 2),
        # TMA tiles (sm_90, FPDT_TMA=1); ws: two consumer groups of num_warps=4 split the rows.
        _dq_tile(128, 64, 8, 2, TMA=True),
        _dq_tile(128, 64, 8, 3, TMA=True),
        _dq_tile(64, 64, 4, 2, TMA=True),
        _dq_tile(64, 64, 4, 2, TMA=True, WS=True),
        _dq_tile(64, 64, 4, 3, TMA=True, WS=True),
        _dq_tile(64, 128, 4, 2, TMA=True, WS=True),
        _dq_tile(32, 32, 8, 2),  # the fallback: clean at every head dim on both targets (bf16/fp16)
    ],
    _DQ_CLEAN_16BIT | _DQ_CLEAN_32BIT,
    spill_docs={(90, 2, 128): ("128x64 w8 s3",)},  # 8 B with the rows' document spans (triton 3.6)
    ws_applies=lambda args: not args["ACCUMULATE"],  # the kernel's static assert says why
)

# The fused backward's tiles: the dK/dV kernel's, whose programs also hold a [BM, BD] fp32 dQ part
# per query block and issue its atomic adds, so fewer stay free of spills. Clean on triton 3.6 and
# 3.9 (compile_check --kernel fused): 64x128 at d=64 spills on 3.9 (8-28 B), every split config at
# d=256 on one version or the other (smem or spills), so d=256 runs mma.sync tiles here.
_FUSED_CLEAN = {
    (90, 2, 64): ("32x128 w8 s2", "32x128 w8 s3", "64x64 w8 s2", "32x64 w4 s3", *_FUSED_TMA_CLEAN[64]),
    (90, 2, 128): ("32x128 w8 s2", "16x128 w8 s3", "32x64 w8 s3", "32x32 w8 s2", *_FUSED_TMA_CLEAN[128]),
    (90, 2, 256): ("16x32 w8 s2", "32x32 w8 s2"),
    (80, 2, 64): ("32x128 w8 s2", "32x128 w8 s3", "16x128 w8 s3", "32x64 w8 s3", "32x64 w4 s3", "32x32 w8 s2"),
    (80, 2, 128): ("32x64 w8 s3", "32x32 w8 s2"),
    (80, 2, 256): ("16x32 w8 s2",),
    # fp32 (tf32x3): at d=256 no tile is spill-free; the one listed spills least (~2.4 KB).
    (90, 4, 64): ("16x32 w8 s2", "16x32 w4 s2", "32x32 w8 s2"),
    (90, 4, 128): ("16x16 w8 s2",),
    (90, 4, 256): ("16x16 w8 s2",),
    (80, 4, 64): ("16x32 w8 s2", "16x32 w4 s2", "32x32 w8 s2"),
    (80, 4, 128): ("16x16 w8 s2",),
    (80, 4, 256): ("16x16 w8 s2",),
}  # fmt: skip
FUSED_TILES = Tiles(
    # Warp specialisation fails triton 3.6's pass with the dQ matmul and its reduction in the loop.
    [c for c in DKDV_TILES.configs if not c.kwargs["WS"]],
    _FUSED_CLEAN,
    # With the keys' document spans: 32x128 at d=128 (sm_90) and 32x32 at d=256 (sm_90, 3.9),
    # 32x64 w4 at d<=64 (sm_80, 3.9) spill.
    spill_docs={(90, 2, 128): ("32x128 w8 s2",), (90, 2, 256): ("32x32 w8 s2",), (80, 2, 64): ("32x64 w4 s3",)},
)

_KEY = ["D", "GROUPS", "CAUSAL", "DOCS", "SQ_BUCKET", "SK_BUCKET", "PRECISION"]


@triton.jit
def _dkdv_inner(
    b_k, b_v, b_dk, b_dv, p_q, p_do, p_l, p_dl, p_dq, m0, n_start, b_lo, b_hi, o_m, o_n, o_d, stride_qs, stride_ds,
    stride_dqs, Sq, DELTA, qk_scale, sm_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    PART: tl.constexpr,
    FUSED: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One query block's contribution to the resident KV block's (dK, dV) (``PART`` 0), its dV
    only (1) or its dK only (2). ``FUSED``: where dK is computed, also add the block's part of
    dQ, ``scale * dS @ K``, into the fp32 rows at ``p_dq`` (the fifth matmul; atomics, since
    every KV block adds into the same rows).

    ``MASKED=False``: every row is in bounds and sees every key of the block. ``MASKED=True``:
    rows past ``Sq`` load as zeros with lse = +inf (so P = 0), and the causal mask applies (with
    ``DOCS``: the keys' row spans ``b_lo <= m < b_hi``). Keys past ``Sk`` need no mask: they only
    touch their own dK/dV rows, which are never stored.

    ``p_q``, ``p_do`` and ``p_dq`` point at the block's first row; with ``TMA`` they are the head's
    descriptors instead, read (and dQ added into) at row ``m0``.
    """
    m_d = o_d < DP  # folds away when DP == BD
    if TMA:
        # The copy engine zero-fills rows past Sq and columns past DP: no masks on these loads.
        b_qt = tl.trans(p_q.load([m0, 0]))
        b_do = p_do.load([m0, 0])
    elif MASKED:
        m_m = (m0 + o_m) < Sq
        b_qt = tl.load(p_q + o_m[None, :] * stride_qs + o_d[:, None], mask=m_m[None, :] & m_d[:, None], other=0.0)
        b_do = tl.load(p_do + o_m[:, None] * stride_ds + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
    else:
        b_qt = tl.load(p_q + o_m[None, :] * stride_qs + o_d[:, None], mask=m_d[:, None], other=0.0)
        b_do = tl.load(p_do + o_m[:, None] * stride_ds + o_d[None, :], mask=m_d[None, :], other=0.0)
    if MASKED:
        m_m = (m0 + o_m) < Sq
        b_lse = tl.load(p_l + m0 + o_m, mask=m_m, other=float("inf"))
        b_delta = tl.load(p_dl + m0 + o_m, mask=m_m, other=0.0)
    else:
        b_lse = tl.load(p_l + m0 + o_m)
        b_delta = tl.load(p_dl + m0 + o_m)
    if UPCAST:
        b_qt = b_qt.to(tl.float32)
        b_do = b_do.to(tl.float32)
    if MASKED:
        # lse = -inf: the row saw no key anywhere; +inf makes its probabilities 0. (A row of an
        # unmasked block sees every key of this block, so its lse is finite.)
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    b_lse = b_lse * LOG2E
    b_st = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale  # [BN, BM]
    b_pt = tl.exp2(b_st - b_lse[None, :])
    if MASKED and DOCS:
        m_vis = ((m0 + o_m)[None, :] >= b_lo[:, None]) & ((m0 + o_m)[None, :] < b_hi[:, None])
        b_pt = tl.where(m_vis, b_pt, 0.0)
    elif MASKED and CAUSAL:
        m_vis = (n_start + o_n)[:, None] <= (m0 + o_m)[None, :] + DELTA
        b_pt = tl.where(m_vis, b_pt, 0.0)
    if PART != 2:
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
    if PART != 1:
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=PRECISION)
        if FUSED:
            b_dq = tl.dot(tl.trans(b_dst.to(b_k.dtype)), b_k, input_precision=PRECISION) * sm_scale  # [BM, BD]
            if TMA:
                # One bulk reduction by the copy engine, clipped to the descriptor's [Sq, D].
                p_dq.atomic_add([m0, 0], b_dq)
            else:
                m_dq = (o_d < D)[None, :]
                if MASKED:
                    m_dq = m_dq & ((m0 + o_m) < Sq)[:, None]
                tl.atomic_add(p_dq + o_m[:, None] * stride_dqs + o_d[None, :], b_dq, mask=m_dq, sem="relaxed")
    return b_dk, b_dv


@triton.jit
def _dkdv_program(
    Q, K, V, dO, Lse, Delta, dK, dV, dQ, KeySpans,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh,
    Sq, Sk, H, DELTA, sm_scale, qk_scale,
    SQ_BUCKET, SK_BUCKET,
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
    BM: tl.constexpr,
    BN: tl.constexpr,
    i_n,
    PART: tl.constexpr,
    FUSED: tl.constexpr,
    QV: tl.constexpr,
    TMA_OK: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
):  # fmt: skip
    """``_dkdv_kernel``'s body: the dK/dV of KV block ``i_n`` (``PART`` 0), its dV (1) or its dK (2);
    with ``FUSED``, the dQ parts too (strides of fp32 ``dQ`` divided by ``QV``). ``TMA``: K, V, Q
    and dO are read (and dQ added) through per-head tensor descriptors; ``WS`` (with ``TMA``)
    warp-specialises the query loop (module docstring)."""
    stride_qb, stride_qs, stride_qh = stride_qb * IV, stride_qs * IV, stride_qh * IV
    stride_kb, stride_ks, stride_kh = stride_kb * IV, stride_ks * IV, stride_kh * IV
    stride_vb, stride_vs, stride_vh = stride_vb * IV, stride_vs * IV, stride_vh * IV
    stride_db, stride_ds, stride_dh = stride_db * IV, stride_ds * IV, stride_dh * IV
    stride_dkb, stride_dks, stride_dkh = stride_dkb * OV, stride_dks * OV, stride_dkh * OV
    stride_dvb, stride_dvs, stride_dvh = stride_dvb * OV, stride_dvs * OV, stride_dvh * OV
    stride_dqb, stride_dqs, stride_dqh = stride_dqb * QV, stride_dqs * QV, stride_dqh * QV
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hk = i_h // GROUPS
    n_start = i_n * BN

    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_n = (n_start + o_n) < Sk

    tl.static_assert(TMA or not WS, "warp specialisation needs the TMA loads")
    # Triton 3.6's warp-specialisation pass fails on any atomic add after the loop (pointers or
    # descriptors alike): WS tiles write dK/dV once, so MHA without ACCUMULATE only.
    tl.static_assert(not WS or (GROUPS == 1 and not ACCUMULATE), "WS tiles need MHA without ACCUMULATE")
    if TMA:
        tl.static_assert(TMA_OK and not DOCS, "TMA tiles need 16-byte aligned rows and no document spans")
        # Descriptors built in the kernel (the scratch set_tma_allocator provides); their bounds
        # zero-fill rows past Sk and columns past DP.
        k_desc = tl.make_tensor_descriptor(
            K + i_b * stride_kb + i_hk * stride_kh, shape=[Sk, DP], strides=[stride_ks, 1], block_shape=[BN, BD]
        )
        b_k = k_desc.load([n_start, 0])
        b_v = b_k
        if PART != 1:  # dV alone needs no V
            v_desc = tl.make_tensor_descriptor(
                V + i_b * stride_vb + i_hk * stride_vh, shape=[Sk, DP], strides=[stride_vs, 1], block_shape=[BN, BD]
            )
            b_v = v_desc.load([n_start, 0])
    else:
        p_k = K + i_b * stride_kb + i_hk * stride_kh + n_start.to(tl.int64) * stride_ks
        p_v = V + i_b * stride_vb + i_hk * stride_vh + n_start.to(tl.int64) * stride_vs
        m_in = m_n[:, None] & (o_d < DP)[None, :]
        b_k = tl.load(p_k + o_n[:, None] * stride_ks + o_d[None, :], mask=m_in, other=0.0)
        b_v = b_k
        if PART != 1:  # dV alone needs no V
            b_v = tl.load(p_v + o_n[:, None] * stride_vs + o_d[None, :], mask=m_in, other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)

    if DOCS:
        # Key spans [B, 2, Sk]: key n is seen by rows [lo[n], hi[n]); keys past Sk get [0, 0).
        p_lo = KeySpans + i_b * 2 * Sk + n_start
        p_hi = p_lo + Sk
        n_last = tl.minimum(BN, Sk - n_start) - 1
        b_lo = tl.load(p_lo + o_n, mask=m_n, other=0)
        b_hi = tl.load(p_hi + o_n, mask=m_n, other=0)
        # Spans never decrease (as the forward's row spans).
        v_lo, f_hi, f_lo, v_hi = tl.load(p_lo), tl.load(p_hi), tl.load(p_lo + n_last), tl.load(p_hi + n_last)
        m_first, f0, f1, n_head, n_masked = span_blocks(v_lo, v_hi, f_lo, f_hi, BM)
        b_dk = tl.zeros([BN, BD], dtype=tl.float32)
        b_dv = tl.zeros([BN, BD], dtype=tl.float32)
        p_q = Q + i_b * stride_qb + i_h * stride_qh
        p_do = dO + i_b * stride_db + i_h * stride_dh
        p_l = Lse + i_b * stride_lb + i_h * stride_lh
        p_dl = Delta + i_b * stride_lb + i_h * stride_lh
        p_dq = p_dl  # a placeholder of the same type (fp32 rows) where dQ is not FUSED's
        if FUSED:
            p_dq = dQ + i_b * stride_dqb + i_h * stride_dqh
        p_qm = p_q + f0.to(tl.int64) * stride_qs
        p_dom = p_do + f0.to(tl.int64) * stride_ds
        p_dqm = p_dq + f0.to(tl.int64) * stride_dqs
        for m0 in range(f0, f1, BM):
            b_dk, b_dv = _dkdv_inner(
                b_k, b_v, b_dk, b_dv, p_qm, p_dom, p_l, p_dl, p_dqm, m0, n_start,
                b_lo, b_hi, o_m, o_n, o_d, stride_qs, stride_ds, stride_dqs, Sq, DELTA, qk_scale, sm_scale,
                MASKED=False, CAUSAL=CAUSAL, DOCS=DOCS, UPCAST=UPCAST, PRECISION=PRECISION, D=D, DP=DP,
                PART=PART, FUSED=FUSED, TMA=False,
            )  # fmt: skip
            p_qm += BM * stride_qs
            p_dom += BM * stride_ds
            p_dqm += BM * stride_dqs
        for j in range(0, n_masked):
            m0 = tl.where(j < n_head, m_first + j * BM, f1 + (j - n_head) * BM)
            b_dk, b_dv = _dkdv_inner(
                b_k, b_v, b_dk, b_dv, p_q + m0.to(tl.int64) * stride_qs, p_do + m0.to(tl.int64) * stride_ds,
                p_l, p_dl, p_dq + m0.to(tl.int64) * stride_dqs, m0, n_start, b_lo, b_hi, o_m, o_n, o_d,
                stride_qs, stride_ds, stride_dqs, Sq, DELTA, qk_scale, sm_scale,
                MASKED=True, CAUSAL=CAUSAL, DOCS=DOCS, UPCAST=UPCAST, PRECISION=PRECISION, D=D, DP=DP,
                PART=PART, FUSED=FUSED, TMA=False,
            )  # fmt: skip
    else:
        # Query blocks (aligned to BM): [m_lo, m_mid) cross the causal diagonal and [m_tail, Sq) is
        # the partial last block: one masked loop walks both. [m_mid, m_tail) see every key of this
        # block: no masks. Rows before m_lo see none of these keys.
        m_tail = Sq // BM * BM
        if CAUSAL:
            m_lo = tl.minimum(tl.maximum(n_start - DELTA, 0), Sq) // BM * BM
            m_all = tl.minimum(n_start + BN, Sk) - 1 - DELTA  # the first row that sees every key
            m_mid = tl.minimum(m_lo + tl.cdiv(tl.maximum(m_all - m_lo, 0), BM) * BM, tl.cdiv(Sq, BM) * BM)
        else:
            # A tensor, not the literal 0: compiled Triton turns literals into constexprs, which
            # have no .to() for the 64-bit offsets below (the interpreter would not notice).
            m_lo = n_start * 0
            m_mid = m_lo
        n_diag = (m_mid - m_lo) // BM
        m_rest = tl.maximum(m_mid, m_tail)  # the masked tail starts here
        n_masked = n_diag + tl.cdiv(Sq - m_rest, BM)

        b_dk = tl.zeros([BN, BD], dtype=tl.float32)
        b_dv = tl.zeros([BN, BD], dtype=tl.float32)
        p_q = Q + i_b * stride_qb + i_h * stride_qh
        p_do = dO + i_b * stride_db + i_h * stride_dh
        p_l = Lse + i_b * stride_lb + i_h * stride_lh
        p_dl = Delta + i_b * stride_lb + i_h * stride_lh
        p_dq = p_dl  # a placeholder of the same type (fp32 rows) where dQ is not FUSED's
        if FUSED:
            p_dq = dQ + i_b * stride_dqb + i_h * stride_dqh
        if TMA:
            # The head's descriptors stand in for the row pointers; the inner step reads them at m0.
            p_q = tl.make_tensor_descriptor(p_q, shape=[Sq, DP], strides=[stride_qs, 1], block_shape=[BM, BD])
            p_do = tl.make_tensor_descriptor(p_do, shape=[Sq, DP], strides=[stride_ds, 1], block_shape=[BM, BD])
            if FUSED:
                p_dq = tl.make_tensor_descriptor(p_dq, shape=[Sq, D], strides=[stride_dqs, 1], block_shape=[BM, BD])
            p_qm, p_dom, p_dqm = p_q, p_do, p_dq
        else:
            p_qm = p_q + m_mid.to(tl.int64) * stride_qs
            p_dom = p_do + m_mid.to(tl.int64) * stride_ds
            p_dqm = p_dq + m_mid.to(tl.int64) * stride_dqs
        if WS:
            # Triton 3.6 warp-specialises a loop (a producer warp issues the TMA copies, two
            # consumer warp groups split the KV block's rows) only when no loop follows it: one loop
            # over every query tile that sees these keys, all masked.
            m_mid = m_lo
            m_tail = tl.cdiv(Sq, BM) * BM
        for m0 in tl.range(m_mid, m_tail, BM, warp_specialize=WS):
            b_dk, b_dv = _dkdv_inner(
                b_k, b_v, b_dk, b_dv, p_qm, p_dom, p_l, p_dl, p_dqm, m0, n_start,
                o_n, o_n, o_m, o_n, o_d, stride_qs, stride_ds, stride_dqs, Sq, DELTA, qk_scale, sm_scale,
                MASKED=WS, CAUSAL=CAUSAL, DOCS=DOCS, UPCAST=UPCAST, PRECISION=PRECISION, D=D, DP=DP,
                PART=PART, FUSED=FUSED, TMA=TMA,
            )  # fmt: skip
            if not TMA:
                p_qm += BM * stride_qs
                p_dom += BM * stride_ds
                p_dqm += BM * stride_dqs
        if not WS:
            for j in range(0, n_masked):
                m0 = tl.where(j < n_diag, m_lo + j * BM, m_rest + (j - n_diag) * BM)
                if TMA:
                    p_qj, p_doj, p_dqj = p_q, p_do, p_dq
                else:
                    p_qj = p_q + m0.to(tl.int64) * stride_qs
                    p_doj = p_do + m0.to(tl.int64) * stride_ds
                    p_dqj = p_dq + m0.to(tl.int64) * stride_dqs
                b_dk, b_dv = _dkdv_inner(
                    b_k, b_v, b_dk, b_dv, p_qj, p_doj, p_l, p_dl, p_dqj, m0, n_start, o_n, o_n, o_m, o_n, o_d,
                    stride_qs, stride_ds, stride_dqs, Sq, DELTA, qk_scale, sm_scale,
                    MASKED=True, CAUSAL=CAUSAL, DOCS=DOCS, UPCAST=UPCAST, PRECISION=PRECISION, D=D, DP=DP,
                    PART=PART, FUSED=FUSED, TMA=TMA,
                )  # fmt: skip

    b_dk = b_dk * sm_scale
    p_dk = dK + i_b * stride_dkb + i_hk * stride_dkh + n_start.to(tl.int64) * stride_dks
    p_dk = p_dk + o_n[:, None] * stride_dks + o_d[None, :]
    p_dv = dV + i_b * stride_dvb + i_hk * stride_dvh + n_start.to(tl.int64) * stride_dvs
    p_dv = p_dv + o_n[:, None] * stride_dvs + o_d[None, :]
    m_out = m_n[:, None] & (o_d < D)[None, :]
    if ACCUMULATE or GROUPS > 1:
        # Add into fp32 buffers that carry other blocks' or query heads' parts (module docstring).
        if PART != 1:
            tl.atomic_add(p_dk, b_dk, mask=m_out, sem="relaxed")
        if PART != 2:
            tl.atomic_add(p_dv, b_dv, mask=m_out, sem="relaxed")
    else:
        if PART != 1:
            tl.store(p_dk, b_dk.to(dK.dtype.element_ty), mask=m_out)
        if PART != 2:
            tl.store(p_dv, b_dv.to(dV.dtype.element_ty), mask=m_out)


@triton.jit
def _dkdv_body(
    Q, K, V, dO, Lse, Delta, dK, dV, dQ, KeySpans,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh,
    Sq, Sk, H, DELTA, sm_scale, qk_scale,
    SQ_BUCKET, SK_BUCKET,
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
    QV: tl.constexpr,
    FUSED: tl.constexpr,
    TMA_OK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
):  # fmt: skip
    # SPLIT: programs 2i and 2i + 1 compute KV block i's dV and its dK, each holding one [BN, BD]
    # fp32 accumulator instead of two, for computing P twice (5 matmuls instead of 4). At d=256
    # on sm_90 the fused kernel spills in every tile wgmma can run (BN >= 64); split ones do not.
    # FUSED: the program that computes dK also adds the dQ parts (``dQ`` is then an fp32 buffer).
    i_n = tl.program_id(0)
    if SPLIT:
        if i_n % 2 == 0:
            _dkdv_program(
                Q, K, V, dO, Lse, Delta, dK, dV, dQ, KeySpans,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_db, stride_ds, stride_dh, stride_lb, stride_lh, stride_dkb, stride_dks, stride_dkh,
                stride_dvb, stride_dvs, stride_dvh, stride_dqb, stride_dqs, stride_dqh,
                Sq, Sk, H, DELTA, sm_scale, qk_scale, SQ_BUCKET, SK_BUCKET,
                GROUPS, CAUSAL, DOCS, ACCUMULATE, UPCAST, PRECISION, D, DP, BD, IV, OV, BM, BN,
                i_n // 2, PART=1, FUSED=FUSED, QV=QV, TMA_OK=TMA_OK, TMA=TMA, WS=WS,
            )  # fmt: skip
        else:
            _dkdv_program(
                Q, K, V, dO, Lse, Delta, dK, dV, dQ, KeySpans,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_db, stride_ds, stride_dh, stride_lb, stride_lh, stride_dkb, stride_dks, stride_dkh,
                stride_dvb, stride_dvs, stride_dvh, stride_dqb, stride_dqs, stride_dqh,
                Sq, Sk, H, DELTA, sm_scale, qk_scale, SQ_BUCKET, SK_BUCKET,
                GROUPS, CAUSAL, DOCS, ACCUMULATE, UPCAST, PRECISION, D, DP, BD, IV, OV, BM, BN,
                i_n // 2, PART=2, FUSED=FUSED, QV=QV, TMA_OK=TMA_OK, TMA=TMA, WS=WS,
            )  # fmt: skip
    else:
        _dkdv_program(
            Q, K, V, dO, Lse, Delta, dK, dV, dQ, KeySpans,
            stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_db, stride_ds, stride_dh, stride_lb, stride_lh, stride_dkb, stride_dks, stride_dkh,
            stride_dvb, stride_dvs, stride_dvh, stride_dqb, stride_dqs, stride_dqh,
            Sq, Sk, H, DELTA, sm_scale, qk_scale, SQ_BUCKET, SK_BUCKET,
            GROUPS, CAUSAL, DOCS, ACCUMULATE, UPCAST, PRECISION, D, DP, BD, IV, OV, BM, BN,
            i_n, PART=0, FUSED=FUSED, QV=QV, TMA_OK=TMA_OK, TMA=TMA, WS=WS,
        )  # fmt: skip


# One body, two autotuned kernels: the split backward's dK/dV kernel (deterministic with MHA) and
# the fused backward (dK, dV and dQ in one pass over the scores; dQ by atomics). Each has its own
# tile table, since the fused program holds a dQ tile too; autotune must restore what it adds into.
_dkdv_kernel = triton.autotune(
    configs=autotune_configs(DKDV_TILES.configs),
    key=_KEY + ["ACCUMULATE"],
    prune_configs_by={"early_config_prune": DKDV_TILES.prune},
    restore_value=["dK", "dV"],
)(_dkdv_body)
_fused_kernel = triton.autotune(
    configs=autotune_configs(FUSED_TILES.configs),
    key=_KEY + ["ACCUMULATE"],
    prune_configs_by={"early_config_prune": FUSED_TILES.prune},
    restore_value=["dK", "dV", "dQ"],
)(_dkdv_body)


@triton.jit
def _dq_inner(
    b_q, b_do, b_lse, b_delta, b_dq, p_kn, p_vn, n0, o_mg, b_lo, b_hi, o_n, o_d, stride_ks, stride_vs,
    Sk, DELTA, qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    DP: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One key block's contribution to the resident query block's dQ (masks as ``_fwd_inner``;
    with ``TMA``, ``p_kn, p_vn`` are the head's K/V descriptors, read at row ``n0``)."""
    m_d = o_d < DP  # folds away when DP == BD
    if MASKED:
        m_n = (n0 + o_n) < Sk
        m_kv = m_n[None, :] & m_d[:, None]
    else:
        m_kv = m_d[:, None]
    if TMA:
        # The copy engine zero-fills rows past Sk and columns past DP: no masks on the loads.
        b_kt = tl.trans(p_kn.load([n0, 0]))
        b_vt = tl.trans(p_vn.load([n0, 0]))
    else:
        b_kt = tl.load(p_kn + o_n[None, :] * stride_ks + o_d[:, None], mask=m_kv, other=0.0)
        b_vt = tl.load(p_vn + o_n[None, :] * stride_vs + o_d[:, None], mask=m_kv, other=0.0)
    if UPCAST:
        b_kt = b_kt.to(tl.float32)
        b_vt = b_vt.to(tl.float32)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
    b_p = tl.exp2(b_s - b_lse[:, None])
    if MASKED:
        if DOCS:
            m_vis = ((n0 + o_n)[None, :] >= b_lo[:, None]) & ((n0 + o_n)[None, :] < b_hi[:, None])
        else:
            m_vis = m_n[None, :]
            if CAUSAL:
                m_vis = m_vis & ((n0 + o_n)[None, :] <= o_mg[:, None] + DELTA)
        b_p = tl.where(m_vis, b_p, 0.0)
    b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PRECISION)
    return b_dq


@triton.autotune(
    configs=autotune_configs(DQ_TILES.configs),
    key=_KEY + ["ACCUMULATE"],
    prune_configs_by={"early_config_prune": DQ_TILES.prune},
    restore_value=["dQ"],
)
@triton.jit
def _dq_kernel(
    Q, K, V, dO, Lse, Delta, dQ, Spans,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    stride_dqb, stride_dqs, stride_dqh,
    Sq, Sk, H, DELTA, sm_scale, qk_scale,
    SQ_BUCKET, SK_BUCKET,
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
    stride_db, stride_ds, stride_dh = stride_db * IV, stride_ds * IV, stride_dh * IV
    stride_dqb, stride_dqs, stride_dqh = stride_dqb * OV, stride_dqs * OV, stride_dqh * OV
    n_m = tl.cdiv(Sq, BM)
    i_m = tl.program_id(0)
    if CAUSAL:
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
    m_in = m_m[:, None] & (o_d < DP)[None, :]

    tl.static_assert(TMA or not WS, "warp specialisation needs the TMA loads")
    # Triton 3.6's warp-specialisation pass fails on an atomic add after the loop.
    tl.static_assert(not WS or not ACCUMULATE, "WS tiles write dQ once: no ACCUMULATE")
    # Rows past Sq load as zeros with lse = +inf: P = 0 there, so the loops need no row mask.
    if TMA:
        tl.static_assert(TMA_OK and not DOCS, "TMA tiles need 16-byte aligned rows and no document spans")
        # Per-head descriptors built in the kernel (the scratch set_tma_allocator provides).
        q_desc = tl.make_tensor_descriptor(
            Q + i_b * stride_qb + i_h * stride_qh, shape=[Sq, DP], strides=[stride_qs, 1], block_shape=[BM, BD]
        )
        do_desc = tl.make_tensor_descriptor(
            dO + i_b * stride_db + i_h * stride_dh, shape=[Sq, DP], strides=[stride_ds, 1], block_shape=[BM, BD]
        )
        b_q = q_desc.load([m_start, 0])
        b_do = do_desc.load([m_start, 0])
    else:
        p_q = Q + i_b * stride_qb + i_h * stride_qh + m_start.to(tl.int64) * stride_qs
        p_do = dO + i_b * stride_db + i_h * stride_dh + m_start.to(tl.int64) * stride_ds
        b_q = tl.load(p_q + o_m[:, None] * stride_qs + o_d[None, :], mask=m_in, other=0.0)
        b_do = tl.load(p_do + o_m[:, None] * stride_ds + o_d[None, :], mask=m_in, other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    p_l = Lse + i_b * stride_lb + i_h * stride_lh + m_start + o_m
    b_lse = tl.load(p_l, mask=m_m, other=float("inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * LOG2E
    b_delta = tl.load(Delta + i_b * stride_lb + i_h * stride_lh + m_start + o_m, mask=m_m, other=0.0)

    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    if DOCS:
        # The key tiles of the rows' spans, as in the forward.
        p_lo = Spans + i_b * 2 * Sq + m_start
        p_hi = p_lo + Sq
        m_last = tl.minimum(BM, Sq - m_start) - 1
        b_lo = tl.load(p_lo + o_m, mask=m_m, other=0)
        b_hi = tl.load(p_hi + o_m, mask=m_m, other=0)
        v_lo, f_hi, f_lo, v_hi = tl.load(p_lo), tl.load(p_hi), tl.load(p_lo + m_last), tl.load(p_hi + m_last)
        n_start, f0, f1, n_head, n_masked = span_blocks(v_lo, v_hi, f_lo, f_hi, BN)
        b_dq = tl.zeros([BM, BD], dtype=tl.float32)
        p_kn = p_k + f0.to(tl.int64) * stride_ks
        p_vn = p_v + f0.to(tl.int64) * stride_vs
        for n0 in range(f0, f1, BN):
            b_dq = _dq_inner(
                b_q, b_do, b_lse, b_delta, b_dq, p_kn, p_vn, n0, m_start + o_m, b_lo, b_hi, o_n, o_d, stride_ks,
                stride_vs, Sk, DELTA, qk_scale,
                MASKED=False, CAUSAL=CAUSAL, DOCS=DOCS, UPCAST=UPCAST, PRECISION=PRECISION, DP=DP, TMA=False,
            )  # fmt: skip
            p_kn += BN * stride_ks
            p_vn += BN * stride_vs
        for j in range(0, n_masked):
            n0 = tl.where(j < n_head, n_start + j * BN, f1 + (j - n_head) * BN)
            b_dq = _dq_inner(
                b_q, b_do, b_lse, b_delta, b_dq, p_k + n0.to(tl.int64) * stride_ks, p_v + n0.to(tl.int64) * stride_vs,
                n0, m_start + o_m, b_lo, b_hi, o_n, o_d, stride_ks, stride_vs, Sk, DELTA, qk_scale,
                MASKED=True, CAUSAL=CAUSAL, DOCS=DOCS, UPCAST=UPCAST, PRECISION=PRECISION, DP=DP, TMA=False,
            )  # fmt: skip
    else:
        # Key ranges as in the forward: [0, n_full) unmasked, [n_full, n_end) masked.
        if CAUSAL:
            n_end = tl.minimum(Sk, tl.maximum(m_start + BM + DELTA, 0))
            n_full = tl.minimum(tl.maximum(m_start + DELTA + 1, 0), Sk) // BN * BN
        else:
            n_end = Sk
            n_full = Sk // BN * BN

        if TMA:
            # Descriptors are read at n0 instead of advancing pointers.
            p_kn = tl.make_tensor_descriptor(
                K + i_b * stride_kb + i_hk * stride_kh, shape=[Sk, DP], strides=[stride_ks, 1], block_shape=[BN, BD]
            )
            p_vn = tl.make_tensor_descriptor(
                V + i_b * stride_vb + i_hk * stride_vh, shape=[Sk, DP], strides=[stride_vs, 1], block_shape=[BN, BD]
            )
        else:
            p_kn = K + i_b * stride_kb + i_hk * stride_kh
            p_vn = V + i_b * stride_vb + i_hk * stride_vh
        b_dq = tl.zeros([BM, BD], dtype=tl.float32)
        if WS:
            # As in the forward: triton 3.6 warp-specialises a loop only when no loop follows it,
            # so one loop over every visible key tile, all masked.
            n_full = 0
        else:
            for n0 in range(0, n_full, BN):
                b_dq = _dq_inner(
                    b_q, b_do, b_lse, b_delta, b_dq, p_kn, p_vn, n0, m_start + o_m, o_m, o_m, o_n, o_d, stride_ks,
                    stride_vs, Sk, DELTA, qk_scale,
                    MASKED=False, CAUSAL=CAUSAL, DOCS=DOCS, UPCAST=UPCAST, PRECISION=PRECISION, DP=DP, TMA=TMA,
                )  # fmt: skip
                if not TMA:
                    p_kn += BN * stride_ks
                    p_vn += BN * stride_vs
        for n0 in tl.range(n_full, n_end, BN, warp_specialize=WS):
            b_dq = _dq_inner(
                b_q, b_do, b_lse, b_delta, b_dq, p_kn, p_vn, n0, m_start + o_m, o_m, o_m, o_n, o_d, stride_ks,
                stride_vs, Sk, DELTA, qk_scale,
                MASKED=True, CAUSAL=CAUSAL, DOCS=DOCS, UPCAST=UPCAST, PRECISION=PRECISION, DP=DP, TMA=TMA,
            )  # fmt: skip
            if not TMA:
                p_kn += BN * stride_ks
                p_vn += BN * stride_vs

    b_dq = b_dq * sm_scale
    p_dq = dQ + i_b * stride_dqb + i_h * stride_dqh + m_start.to(tl.int64) * stride_dqs
    p_dq = p_dq + o_m[:, None] * stride_dqs + o_d[None, :]
    m_out = m_m[:, None] & (o_d < D)[None, :]
    if ACCUMULATE:
        # One writer per element: deterministic, and no load (as in the dK/dV kernel).
        tl.atomic_add(p_dq, b_dq, mask=m_out, sem="relaxed")
    else:
        tl.store(p_dq, b_dq.to(dQ.dtype.element_ty), mask=m_out)


def delta_launch(out, do, delta) -> Launch:
    """``delta = rowsum(do * out)`` into fp32 ``delta [B, H, Sq]`` (``do`` may be head-padded)."""
    B, Sq, H, D = out.shape
    BD = head_dim_block(D)
    BM = max(16, 4096 // BD)  # two [BM, BD] fp32 tiles on 4 warps: BM=32 spilled at d=256 (sm_80)
    args = dict(
        Out=out, dO=do, Delta=delta,
        stride_ob=out.stride(0), stride_os=out.stride(1), stride_oh=out.stride(2),
        stride_db=do.stride(0), stride_ds=do.stride(1), stride_dh=do.stride(2),
        stride_lb=delta.stride(0), stride_lh=delta.stride(1),
        Sq=Sq, H=H, D=D, BD=BD, BM=BM,
    )  # fmt: skip
    return Launch(_delta_kernel, (triton.cdiv(Sq, BM), B * H), args)


def backward_launches(
    do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, dq, dk, dv, accumulate, spans=None, fused=False
):
    """The backward's launches in order: delta (when not given), dK/dV, dQ; with ``fused``,
    delta and one kernel that adds dQ into ``dq``, which must then be fp32 (zeros, or running
    sums with ``accumulate``).

    ``q, k, v, do`` as ``triton_fwd.pad_inputs`` left them; ``out`` at the true head dim; the
    gradient buffers at the true head dim or at ``q``'s padded one (then every column is stored;
    the padding columns come out 0). ``accumulate=False`` overwrites ``dq, dk, dv`` (any float
    dtype), except that GQA dK/dV (``H > Hkv``) are added into, so they must then be fp32 zeros.
    ``spans``: for packed documents, the rows' and the keys' spans ``([B, 2, Sq], [B, 2, Sk])``."""
    B, Sq, H, DP = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    D = dq.shape[-1]  # the columns stored: the true head dim, or DP for head-padded buffers
    launches = []
    if delta is None:
        delta = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        launches.append(delta_launch(out, do, delta))
    if lse.stride(-1) != 1 or lse.stride() != delta.stride():
        lse = lse.contiguous()
        delta = delta.contiguous()
    iv = vector_width(q, k, v, do)
    common = dict(
        Q=q, K=k, V=v, dO=do, Lse=lse, Delta=delta,
        **dict(zip(("stride_qb", "stride_qs", "stride_qh"), strides(q, iv), strict=True)),
        **dict(zip(("stride_kb", "stride_ks", "stride_kh"), strides(k, iv), strict=True)),
        **dict(zip(("stride_vb", "stride_vs", "stride_vh"), strides(v, iv), strict=True)),
        **dict(zip(("stride_db", "stride_ds", "stride_dh"), strides(do, iv), strict=True)),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        Sq=Sq, Sk=Sk, DELTA=q_start - k_start, sm_scale=scale, qk_scale=scale * LOG2E.value,
        SQ_BUCKET=seq_bucket(Sq), SK_BUCKET=seq_bucket(Sk),
        GROUPS=H // Hkv, CAUSAL=causal, DOCS=spans is not None, ACCUMULATE=accumulate, UPCAST=INTERPRET,
        PRECISION=dot_precision(q.dtype), D=D, DP=DP, BD=head_dim_block(DP), IV=iv,
    )  # fmt: skip
    rows, keys = (None, None) if spans is None else spans
    ov = vector_width(dk, dv)
    if fused and dq.dtype != torch.float32:
        raise TypeError(f"the fused backward adds dQ into an fp32 buffer, got {dq.dtype}")
    qv = vector_width(dq) if fused else 1
    dkdv = dict(
        common, dK=dk, dV=dv, KeySpans=keys, H=H, OV=ov, dQ=dq if fused else None, QV=qv, FUSED=fused,
        TMA_OK=tma_allowed(spans, q, iv, *([(qv, dq)] if fused else [])),  # the fused kernel reduces into dQ
        **dict(zip(("stride_dkb", "stride_dks", "stride_dkh"), strides(dk, ov), strict=True)),
        **dict(zip(("stride_dvb", "stride_dvs", "stride_dvh"), strides(dv, ov), strict=True)),
        **dict(zip(("stride_dqb", "stride_dqs", "stride_dqh"), strides(dq, qv) if fused else (0, 0, 0), strict=True)),
    )  # fmt: skip
    kernel = _fused_kernel if fused else _dkdv_kernel
    launches.append(
        Launch(kernel, lambda meta: (triton.cdiv(Sk, meta["BN"]) * (2 if meta["SPLIT"] else 1), B * H), dkdv)
    )
    if fused:
        return launches
    ov = vector_width(dq)
    dqa = dict(
        common, dQ=dq, Spans=rows, H=H, OV=ov, TMA_OK=tma_allowed(spans, q, iv),
        **dict(zip(("stride_dqb", "stride_dqs", "stride_dqh"), strides(dq, ov), strict=True)),
    )  # fmt: skip
    launches.append(Launch(_dq_kernel, lambda meta: (triton.cdiv(Sq, meta["BM"]), B * H), dqa))
    return launches


def _work_buffer(g: torch.Tensor, dp: int, fp32: bool = False) -> torch.Tensor:
    """``g`` when the kernel can add into it, else a zeroed buffer ``dp`` wide (in ``g``'s dtype,
    fp32 with ``fp32``) to add into ``g`` afterwards: rows off 16-byte boundaries (scalar atomic
    adds, an odd head dim in fp32, spilled dK/dV by 2.6 KB at d=111), or, with ``fp32``, a ``g``
    of another dtype (the fused kernel's dQ atomics add fp32; float64 is the CPU oracle's)."""
    if vector_width(g) == vector_elements(g.dtype) and not (fp32 and g.dtype != torch.float32):
        return g
    return g.new_zeros(*g.shape[:-1], dp, dtype=torch.float32 if fp32 else g.dtype)


def chunk_backward(
    do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, dq, dk, dv, spans=None, deterministic=True
):
    """Accumulate one block's gradients into the fp32 buffers ``dq``, ``dk``, ``dv``: by the split
    kernels, or without ``deterministic`` by the fused one (``flash_backward`` says which when)."""
    if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
        return
    from .triton_fwd import pad_inputs

    q, k, v, do = pad_inputs(q, k, v, do)
    D = dq.shape[-1]
    work = [_work_buffer(g, q.shape[-1], fp32=g is dq and not deterministic) for g in (dq, dk, dv)]
    launches = backward_launches(
        do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, *work, True, spans, fused=not deterministic
    )
    _run(launches, q)
    for g, w in zip((dq, dk, dv), work, strict=True):
        if w is not g:
            g.add_(w[..., :D])


def flash_backward(do, q, k, v, out, lse, q_start, causal, scale, spans=None, deterministic=True):
    """``flash_attention``'s backward: ``(dq, dk, dv)`` in the input dtype. ``q, k, v`` as
    ``pad_inputs`` left them; the gradients are written at that padded width and returned as
    views of the true one (per-element stores of a d=111 row spilled dK/dV by 0.3 KB on sm_90).

    ``deterministic=True`` (what the public API passes by default): the split backward, a dK/dV
    kernel and a dQ kernel that recomputes the scores (seven matmuls), each output written by one
    program; bit-reproducible for MHA (GQA dK/dV still add the query heads of a group with
    atomics, see the module docstring). ``False``: the fused backward, one kernel per KV block
    that computes the scores' five matmuls once and adds each query block's dQ part into an fp32
    buffer with atomics (FlashAttention-2's scheme), converted to the input dtype at the end;
    atomics add in whatever order the blocks finish, so dQ is not bit-reproducible. On an H200
    (bf16, S=16K) the fused one ran at 258-295 TFLOP/s against the split's 314-357: its
    programs sit at 255 registers with the extra dQ tile, so no wgmma overlaps and the query
    blocks are only 16-32 rows."""
    from .triton_fwd import pad_inputs

    (do,) = pad_inputs(do)
    B, Sq, H, D = out.shape
    Sk, Hkv, DP = k.shape[1], k.shape[2], k.shape[3]
    fused = not deterministic
    if fused:  # the atomics add into fp32 zeros
        dq = torch.zeros(B, Sq, H, DP, dtype=torch.float32, device=q.device)
    else:
        dq = torch.empty(B, Sq, H, DP, dtype=q.dtype, device=q.device)
    if H > Hkv:
        dk = torch.zeros(B, Sk, Hkv, DP, dtype=torch.float32, device=q.device)
        dv = torch.zeros(B, Sk, Hkv, DP, dtype=torch.float32, device=q.device)
    else:
        dk = torch.empty(B, Sk, Hkv, DP, dtype=q.dtype, device=q.device)
        dv = torch.empty(B, Sk, Hkv, DP, dtype=q.dtype, device=q.device)
    if B * Sq * Sk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
    else:
        launches = backward_launches(
            do, q, k, v, out, lse, None, q_start, 0, causal, scale, dq, dk, dv, False, spans, fused=fused
        )
        _run(launches, q)
    return dq[..., :D].to(q.dtype), dk[..., :D].to(q.dtype), dv[..., :D].to(q.dtype)


def _run(launches, q):
    # Launch on q's GPU even when it is not the current device.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        for launch in launches:
            run(launch)
