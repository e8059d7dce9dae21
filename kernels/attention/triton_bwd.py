"""Triton backward: ``delta`` preprocess, a dK/dV kernel and a dQ kernel (FlashAttention-2 style).

They take the MERGED ``out``/``lse`` of the whole attention row, so a pipeline can run them block
by block, and they ACCUMULATE into fp32 ``dq, dk, dv`` buffers owned by the caller. The dK/dV
kernel keeps one KV block resident and streams the query blocks of every query head in its GQA
group (so the group sum needs no atomics); the dQ kernel keeps a query block resident and streams
the KV blocks. Both recompute ``P = exp(S - lse)``; rows whose lse is -inf (saw no key) get P = 0.
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


@triton.jit
def _delta_kernel(
    Out, dO, Delta,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    Sq, H, D,
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


_CONFIGS = autotune_configs(
    [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (32, 128, 8, 2),
            (64, 128, 8, 2),
            (64, 64, 4, 2),
            (32, 64, 4, 3),
            (128, 64, 8, 2),
            (32, 32, 4, 1),  # the fallback that fits at d = 256
        ]
    ]
)

_KEY = ["BD", "GROUPS", "CAUSAL", "SQ_BUCKET", "SK_BUCKET", "PRECISION"]


@triton.autotune(
    configs=_CONFIGS,
    key=_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    restore_value=["dK", "dV"],
)
@triton.jit
def _dkdv_kernel(
    Q, K, V, dO, Lse, Delta, dK, dV,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    Sq, Sk, H, Hkv, D, DELTA, sm_scale, qk_scale,
    SQ_BUCKET, SK_BUCKET,
    GROUPS: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // Hkv).to(tl.int64)
    i_hk = (i_bh % Hkv).to(tl.int64)
    n_start = i_n * BN

    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_n = (n_start + o_n) < Sk
    m_d = o_d < D
    m_nd = m_n[:, None] & m_d[None, :]

    p_k = K + i_b * stride_kb + i_hk * stride_kh + n_start.to(tl.int64) * stride_ks
    p_v = V + i_b * stride_vb + i_hk * stride_vh + n_start.to(tl.int64) * stride_vs
    b_k = tl.load(p_k + o_n[:, None] * stride_ks + o_d[None, :], mask=m_nd, other=0.0)
    b_v = tl.load(p_v + o_n[:, None] * stride_vs + o_d[None, :], mask=m_nd, other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)

    # Query rows before m_lo see none of this block's keys (causal): start there.
    if CAUSAL:
        m_lo = tl.minimum(tl.maximum(n_start - DELTA, 0), Sq) // BM * BM
    else:
        # A tensor, not the literal 0: compiled Triton turns literals into constexprs, which
        # have no .to() for the 64-bit offset below (the interpreter would not notice).
        m_lo = n_start * 0

    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    for g in range(GROUPS):
        i_h = i_hk * GROUPS + g
        p_q = Q + i_b * stride_qb + i_h * stride_qh + m_lo.to(tl.int64) * stride_qs
        p_do = dO + i_b * stride_db + i_h * stride_dh + m_lo.to(tl.int64) * stride_ds
        p_l = Lse + i_b * stride_lb + i_h * stride_lh
        p_dl = Delta + i_b * stride_lb + i_h * stride_lh
        for m0 in range(m_lo, Sq, BM):
            m_m = (m0 + o_m) < Sq
            b_qt = tl.load(p_q + o_m[None, :] * stride_qs + o_d[:, None], mask=m_m[None, :] & m_d[:, None], other=0.0)
            b_do = tl.load(p_do + o_m[:, None] * stride_ds + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
            if UPCAST:
                b_qt = b_qt.to(tl.float32)
                b_do = b_do.to(tl.float32)
            b_lse = tl.load(p_l + m0 + o_m, mask=m_m, other=float("inf"))
            # lse = -inf: the row saw no key anywhere; +inf makes its probabilities 0.
            b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
            b_delta = tl.load(p_dl + m0 + o_m, mask=m_m, other=0.0)
            b_st = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale  # [BN, BM]
            b_pt = tl.exp2(b_st - b_lse[None, :])
            if CAUSAL:
                m_vis = (n_start + o_n)[:, None] <= (m0 + o_m)[None, :] + DELTA
                b_pt = tl.where(m_vis & m_n[:, None], b_pt, 0.0)
            else:
                b_pt = tl.where(m_n[:, None], b_pt, 0.0)
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=PRECISION)
            p_q += BM * stride_qs
            p_do += BM * stride_ds

    p_dk = dK + i_b * stride_dkb + i_hk * stride_dkh + n_start.to(tl.int64) * stride_dks
    p_dk = p_dk + o_n[:, None] * stride_dks + o_d[None, :]
    p_dv = dV + i_b * stride_dvb + i_hk * stride_dvh + n_start.to(tl.int64) * stride_dvs
    p_dv = p_dv + o_n[:, None] * stride_dvs + o_d[None, :]
    # Accumulate: the caller's buffers carry the other blocks' contributions.
    tl.store(p_dk, tl.load(p_dk, mask=m_nd, other=0.0) + b_dk * sm_scale, mask=m_nd)
    tl.store(p_dv, tl.load(p_dv, mask=m_nd, other=0.0) + b_dv, mask=m_nd)


@triton.autotune(
    configs=_CONFIGS,
    key=_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    restore_value=["dQ"],
)
@triton.jit
def _dq_kernel(
    Q, K, V, dO, Lse, Delta, dQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    stride_dqb, stride_dqs, stride_dqh,
    Sq, Sk, H, D, DELTA, sm_scale, qk_scale,
    SQ_BUCKET, SK_BUCKET,
    GROUPS: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
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
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]

    p_q = Q + i_b * stride_qb + i_h * stride_qh + m_start.to(tl.int64) * stride_qs
    p_do = dO + i_b * stride_db + i_h * stride_dh + m_start.to(tl.int64) * stride_ds
    b_q = tl.load(p_q + o_m[:, None] * stride_qs + o_d[None, :], mask=m_md, other=0.0)
    b_do = tl.load(p_do + o_m[:, None] * stride_ds + o_d[None, :], mask=m_md, other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    p_l = Lse + i_b * stride_lb + i_h * stride_lh + m_start + o_m
    b_lse = tl.load(p_l, mask=m_m, other=float("inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
    b_delta = tl.load(Delta + i_b * stride_lb + i_h * stride_lh + m_start + o_m, mask=m_m, other=0.0)

    if CAUSAL:
        n_end = tl.minimum(Sk, tl.maximum(m_start + BM + DELTA, 0))
    else:
        n_end = Sk

    p_kn = K + i_b * stride_kb + i_hk * stride_kh
    p_vn = V + i_b * stride_vb + i_hk * stride_vh
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range(0, n_end, BN):
        m_n = (n0 + o_n) < Sk
        b_kt = tl.load(p_kn + o_n[None, :] * stride_ks + o_d[:, None], mask=m_n[None, :] & m_d[:, None], other=0.0)
        b_vt = tl.load(p_vn + o_n[None, :] * stride_vs + o_d[:, None], mask=m_n[None, :] & m_d[:, None], other=0.0)
        if UPCAST:
            b_kt = b_kt.to(tl.float32)
            b_vt = b_vt.to(tl.float32)
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
        b_p = tl.exp2(b_s - b_lse[:, None])
        if CAUSAL:
            m_vis = m_n[None, :] & ((n0 + o_n)[None, :] <= (m_start + o_m)[:, None] + DELTA)
            b_p = tl.where(m_vis, b_p, 0.0)
        else:
            b_p = tl.where(m_n[None, :], b_p, 0.0)
        b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PRECISION)
        p_kn += BN * stride_ks
        p_vn += BN * stride_vs

    p_dq = dQ + i_b * stride_dqb + i_h * stride_dqh + m_start.to(tl.int64) * stride_dqs
    p_dq = p_dq + o_m[:, None] * stride_dqs + o_d[None, :]
    tl.store(p_dq, tl.load(p_dq, mask=m_md, other=0.0) + b_dq * sm_scale, mask=m_md)


def compute_delta(out, do):
    """``delta = rowsum(do * out)`` as fp32 ``[B, H, Sq]``."""
    B, Sq, H, D = out.shape
    delta = torch.empty(B, H, Sq, dtype=torch.float32, device=out.device)
    if B * Sq * H == 0:
        return delta
    BD = head_dim_block(D)
    BM = 64 if BD <= 128 else 32
    _delta_kernel[(triton.cdiv(Sq, BM), B * H)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        delta.stride(0), delta.stride(1),
        Sq, H, D, BD=BD, BM=BM,
    )  # fmt: skip
    return delta


def chunk_backward(do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, dq, dk, dv):
    """Accumulate one block's gradients into the fp32 buffers ``dq``, ``dk``, ``dv``."""
    if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
        return
    # Launch on q's GPU even when it is not the current device.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _launch_backward(do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, dq, dk, dv)


def _launch_backward(do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, dq, dk, dv):
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if delta is None:
        delta = compute_delta(out, do)
    if lse.stride(-1) != 1 or lse.stride() != delta.stride():
        lse = lse.contiguous()
        delta = delta.contiguous()
    common = dict(
        GROUPS=H // Hkv,
        CAUSAL=causal,
        UPCAST=INTERPRET,
        PRECISION=dot_precision(q.dtype),
        BD=head_dim_block(D),
    )
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
    )  # fmt: skip
    buckets = (seq_bucket(Sq), seq_bucket(Sk))
    _dkdv_kernel[lambda meta: (triton.cdiv(Sk, meta["BN"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv,
        *strides,
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        Sq, Sk, H, Hkv, D, q_start - k_start, scale, scale * LOG2E,
        *buckets,
        **common,
    )  # fmt: skip
    _dq_kernel[lambda meta: (triton.cdiv(Sq, meta["BM"]), B * H)](
        q, k, v, do, lse, delta, dq,
        *strides,
        dq.stride(0), dq.stride(1), dq.stride(2),
        Sq, Sk, H, D, q_start - k_start, scale, scale * LOG2E,
        *buckets,
        **common,
    )  # fmt: skip
