"""Triton forward: one query block against a range of keys, online softmax in fp32.

Writes the output (any float dtype) and the natural-log LSE, or merges the block's result into
running fp32 ``(out, lse)`` accumulators in place (``ACCUMULATE``), so an FPDT pipeline needs no
separate merge pass. Causal masking is at global offsets: key ``k_start+n`` is visible to query
``q_start+m`` iff ``n <= m + DELTA`` with ``DELTA = q_start - k_start``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRET,
    LOG2E,
    autotune_configs,
    dot_precision,
    head_dim_block,
    prune_configs,
    seq_bucket,
)

_CONFIGS = autotune_configs(
    [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3),
            (128, 64, 4, 3),
            (128, 128, 8, 3),
            (128, 32, 4, 4),
            (64, 64, 4, 3),
            (64, 32, 4, 4),
            (32, 32, 4, 1),  # the fallback that fits at d = 256
        ]
    ]
)


@triton.jit
def _fwd_inner(
    b_q, p_kn, p_vn, b_mi, b_li, b_acc, n0, o_mg, o_n, o_d, m_d, stride_ks, stride_vs,
    Sk, DELTA, qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax: returns the updated running (max, sum, acc).

    ``MASKED=False`` is the fast path for blocks every row sees in full; ``MASKED=True`` applies
    the bounds (``n < Sk``) and causal (``n <= m + DELTA``) masks; ``o_mg`` are the rows' indices.
    """
    if MASKED:
        m_n = (n0 + o_n) < Sk
        m_k = m_n[None, :] & m_d[:, None]
        m_v = m_n[:, None] & m_d[None, :]
    else:
        m_k = m_d[:, None]
        m_v = m_d[None, :]
    b_kt = tl.load(p_kn + o_n[None, :] * stride_ks + o_d[:, None], mask=m_k, other=0.0)
    b_v = tl.load(p_vn + o_n[:, None] * stride_vs + o_d[None, :], mask=m_v, other=0.0)
    if UPCAST:
        b_kt = b_kt.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
    if MASKED:
        m_vis = m_n[None, :]
        if CAUSAL:
            m_vis = m_vis & ((n0 + o_n)[None, :] <= o_mg[:, None] + DELTA)
        b_s = tl.where(m_vis, b_s, float("-inf"))
        b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
        # A row with no visible key so far keeps m = -inf; shift by 0 there to avoid inf - inf.
        b_msafe = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)
    else:
        b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
        b_msafe = b_mnew
    b_p = tl.exp2(b_s - b_msafe[:, None])
    b_alpha = tl.exp2(b_mi - b_msafe)
    b_li = b_li * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return b_mnew, b_li, b_acc


@triton.autotune(
    configs=_CONFIGS,
    key=["BD", "GROUPS", "CAUSAL", "ACCUMULATE", "SQ_BUCKET", "SK_BUCKET", "PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
    # Autotuning runs the kernel several times; accumulators must not see every run.
    restore_value=["Out", "Lse"],
)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    Sq, Sk, H, D, DELTA, qk_scale,
    SQ_BUCKET, SK_BUCKET,
    GROUPS: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
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
    m_d = o_d < D

    p_q = Q + i_b * stride_qb + i_h * stride_qh + m_start.to(tl.int64) * stride_qs
    b_q = tl.load(p_q + o_m[:, None] * stride_qs + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh

    # Keys [0, n_full) are visible to every row of the block and in bounds: no masks there.
    # Keys [n_full, n_end) need the bounds and (causal) diagonal masks. Beyond n_end: skipped.
    if CAUSAL:
        n_end = tl.minimum(Sk, tl.maximum(m_start + BM + DELTA, 0))
        n_full = tl.minimum(tl.maximum(m_start + DELTA + 1, 0), Sk) // BN * BN
    else:
        n_end = Sk
        n_full = Sk // BN * BN

    b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)

    # The K/V pointers advance by one block per step (64-bit pointer arithmetic, so offsets
    # never overflow int32 at millions of tokens).
    p_kn = p_k
    p_vn = p_v
    for n0 in range(0, n_full, BN):
        b_mi, b_li, b_acc = _fwd_inner(
            b_q, p_kn, p_vn, b_mi, b_li, b_acc, n0, m_start + o_m, o_n, o_d, m_d, stride_ks, stride_vs,
            Sk, DELTA, qk_scale, MASKED=False, CAUSAL=CAUSAL, UPCAST=UPCAST, PRECISION=PRECISION,
        )  # fmt: skip
        p_kn += BN * stride_ks
        p_vn += BN * stride_vs
    for n0 in range(n_full, n_end, BN):
        b_mi, b_li, b_acc = _fwd_inner(
            b_q, p_kn, p_vn, b_mi, b_li, b_acc, n0, m_start + o_m, o_n, o_d, m_d, stride_ks, stride_vs,
            Sk, DELTA, qk_scale, MASKED=True, CAUSAL=CAUSAL, UPCAST=UPCAST, PRECISION=PRECISION,
        )  # fmt: skip
        p_kn += BN * stride_ks
        p_vn += BN * stride_vs

    # Natural-log LSE of the block; rows that saw no key: out = 0, lse = -inf.
    m_seen = b_li > 0.0
    b_lse = tl.where(
        m_seen, (b_mi + tl.log2(tl.where(m_seen, b_li, 1.0))) / 1.4426950408889634, float("-inf")
    )  # LOG2E: jit code reads no globals
    b_out = b_acc / tl.where(m_seen, b_li, 1.0)[:, None]

    p_o = Out + i_b * stride_ob + i_h * stride_oh + m_start.to(tl.int64) * stride_os
    p_o = p_o + o_m[:, None] * stride_os + o_d[None, :]
    p_l = Lse + i_b * stride_lb + i_h * stride_lh + m_start + o_m
    m_o = m_m[:, None] & m_d[None, :]
    if ACCUMULATE:
        # Online-softmax merge with the running state; safe when either side is -inf.
        b_lprev = tl.load(p_l, mask=m_m, other=float("-inf"))
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
    tl.store(p_o, b_out.to(Out.dtype.element_ty), mask=m_o)
    tl.store(p_l, b_lse, mask=m_m)


def chunk_forward(q, k, v, q_start, k_start, causal, scale, out, lse, accumulate):
    """Launch the forward: write (or merge, ``accumulate=True``) one block into ``out``/``lse``."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if B == 0 or Sq == 0:
        return
    grid = lambda meta: (triton.cdiv(Sq, meta["BM"]), B * H)
    # Launch on q's GPU even when it is not the current device.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _fwd_kernel[grid](
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            Sq, Sk, H, D, q_start - k_start, scale * LOG2E,
            seq_bucket(Sq), seq_bucket(Sk),
            GROUPS=H // Hkv,
            CAUSAL=causal,
            ACCUMULATE=accumulate,
            UPCAST=INTERPRET,
            PRECISION=dot_precision(q.dtype),
            BD=head_dim_block(D),
        )  # fmt: skip
