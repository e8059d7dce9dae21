"""PyTorch reference for the attention ops: same signatures as the public API, plain math.

It materialises the ``[B, H, Sq, Sk]`` score matrix, so it is for tests and small inputs only.
Scores and ``p @ v`` are computed in the input dtype (softmax in fp32, as flash-attn's own
reference does), so running it in fp16 measures what "PyTorch in the input dtype" gets wrong;
running it in float64 gives the oracle. The chunk backward uses the closed-form gradient in fp32
and accumulates, exactly like the kernels, so it also documents the math they implement.
"""

from __future__ import annotations

import torch

from .common import accumulator_dtype, default_scale

__all__ = [
    "attention_chunk_backward",
    "attention_chunk_forward",
    "document_mask",
    "flash_attention",
    "flash_attention_varlen",
    "merge_attention",
    "visibility_mask",
]


def visibility_mask(sq: int, sk: int, q_start: int, k_start: int, causal: bool, device=None) -> torch.Tensor | None:
    """``[Sq, Sk]`` bool mask, True where key ``k_start+n`` is visible to query ``q_start+m``.

    ``None`` means every key is visible (non-causal).
    """
    if not causal:
        return None
    m = torch.arange(sq, device=device)[:, None] + q_start
    n = torch.arange(sk, device=device)[None, :] + k_start
    return n <= m


def document_mask(cu_seqlens: torch.Tensor, batch: int, sq: int, sk: int, q_start: int, k_start: int) -> torch.Tensor:
    """``[B, Sq, Sk]`` bool, True where query ``q_start+m`` and key ``k_start+n`` of a row share a
    document; ``cu_seqlens`` are offsets over the flattened ``[B * S]`` tokens, ``S = cu[-1] / B``."""
    cu = cu_seqlens.long()
    row0 = torch.arange(batch, device=cu.device)[:, None] * (cu[-1] // batch)

    def doc(start, n):  # [B, n]: the document of each flattened position
        return torch.searchsorted(cu, row0 + start + torch.arange(n, device=cu.device), right=True)

    return doc(q_start, sq)[:, :, None] == doc(k_start, sk)[:, None, :]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # [B, S, Hkv, d] -> [B, S, Hkv*groups, d]; query head h uses KV head h // groups.
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _scores(q, k, q_start, k_start, causal, scale, cu_seqlens=None):
    """Masked scores ``[B, H, Sq, Sk]`` in the input dtype (masked entries are -inf)."""
    k = _repeat_kv(k, q.shape[2] // k.shape[2])
    s = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
    mask = visibility_mask(q.shape[1], k.shape[1], q_start, k_start, causal, q.device)
    if cu_seqlens is not None:
        docs = document_mask(cu_seqlens.to(q.device), q.shape[0], q.shape[1], k.shape[1], q_start, k_start)
        mask = docs[:, None] if mask is None else docs[:, None] & mask
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _block_forward(q, k, v, q_start, k_start, causal, scale, cu_seqlens=None):
    """One block: (out fp32 ``[B, Sq, H, d]``, lse fp32 ``[B, H, Sq]``); unseen rows give (0, -inf)."""
    acc = accumulator_dtype(q.dtype)
    s = _scores(q, k, q_start, k_start, causal, scale, cu_seqlens).to(acc)
    lse = torch.logsumexp(s, dim=-1)
    # exp(-inf - (-inf)) is NaN for rows that see no key: their probabilities are 0.
    p = torch.exp(s - lse[..., None]).nan_to_num(nan=0.0)
    v = _repeat_kv(v, q.shape[2] // v.shape[2])
    out = torch.einsum("bhmn,bnhd->bmhd", p.to(v.dtype), v).to(acc)
    return out, lse


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets (online softmax, fp32).

    ``out_*``: ``[B, S, H, d]``; ``lse_*``: ``[B, H, S]``. Safe when either side is ``-inf``
    (a row that saw no key in that part). Returns ``(out, lse)`` in fp32 (float64 for a float64
    ``out_a``).
    """
    acc = accumulator_dtype(out_a.dtype)
    out, lse = out_a.to(acc, copy=True), lse_a.to(acc, copy=True)
    merge_into(out, lse, out_b, lse_b)
    return out, lse


def merge_into(out, lse, out_b, lse_b):
    """``merge_attention`` into the running fp32 accumulators ``out``/``lse`` in place (views
    included), holding one ``[B, H, S]`` weight at a time and no ``[B, S, H, d]`` temporary."""
    lse_b = lse_b.to(lse.dtype)
    new_lse = torch.logaddexp(lse, lse_b)
    # Rows that saw no key on either side stay (0, -inf): exp(-inf - (-inf)) would be NaN.
    seen = torch.isfinite(new_lse)

    def weight(part):  # [B, H, S] -> [B, S, H, 1], to scale the bshd outputs
        return torch.where(seen, torch.exp(part - new_lse), 0.0).transpose(1, 2)[..., None]

    out.mul_(weight(lse)).addcmul_(out_b, weight(lse_b))
    lse.copy_(new_lse)


def attention_chunk_forward(
    q, k, v, *, q_start, k_start, causal, softmax_scale=None, out=None, lse=None, cu_seqlens=None
):
    """Attend ``q`` (global rows ``q_start..``) to ``k, v`` (global keys ``k_start..``).

    Returns fp32 ``(out [B, Sq, H, d], lse [B, H, Sq])``; when ``out``/``lse`` are given they are
    running accumulators, merged into in place and returned. ``cu_seqlens``: packed documents
    (see ``document_mask``); a key is then visible only inside its query's document.
    """
    scale = default_scale(q.shape[-1], softmax_scale)
    blk_out, blk_lse = _block_forward(q, k, v, q_start, k_start, causal, scale, cu_seqlens)
    if out is None:
        return blk_out, blk_lse
    merge_into(out, lse, blk_out, blk_lse)
    return out, lse


def attention_chunk_backward(
    do,
    q,
    k,
    v,
    out,
    lse,
    *,
    q_start,
    k_start,
    causal,
    softmax_scale=None,
    delta=None,
    dq=None,
    dk=None,
    dv=None,
    cu_seqlens=None,
    deterministic=None,
):
    """Gradient of one block given the MERGED ``out``/``lse`` of the full attention row.

    ``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - delta)``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q`` with ``delta = rowsum(dO * out)``. Accumulates into fp32 ``dq, dk, dv``
    (allocated as zeros when not given; float64 for float64 inputs) and returns them; GQA
    gradients are summed per KV head. ``deterministic`` is taken for the public op's signature
    and ignored: this math has no atomics.
    """
    scale = default_scale(q.shape[-1], softmax_scale)
    B, Sq, H, D = q.shape
    Hkv = k.shape[2]
    groups = H // Hkv
    acc = accumulator_dtype(q.dtype)
    if delta is None:
        delta = (do.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, Sq]
    s = _scores(q.to(acc), k.to(acc), q_start, k_start, causal, scale, cu_seqlens)
    # Rows that saw no key anywhere have lse = -inf: their probabilities are 0, not NaN.
    lse = lse.to(acc)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    p = torch.exp(s - lse_safe[..., None])  # [B, H, Sq, Sk]
    do32, q32 = do.to(acc), q.to(acc)
    k32, v32 = _repeat_kv(k.to(acc), groups), _repeat_kv(v.to(acc), groups)
    dv_full = torch.einsum("bhmn,bmhd->bnhd", p, do32)
    dp = torch.einsum("bmhd,bnhd->bhmn", do32, v32)
    ds = p * (dp - delta.to(acc)[..., None])
    dq_blk = torch.einsum("bhmn,bnhd->bmhd", ds, k32) * scale
    dk_full = torch.einsum("bhmn,bmhd->bnhd", ds, q32) * scale
    Sk = k.shape[1]
    dk_blk = dk_full.view(B, Sk, Hkv, groups, D).sum(3)
    dv_blk = dv_full.view(B, Sk, Hkv, groups, D).sum(3)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if dq is None else dq
    dk = torch.zeros(k.shape, dtype=acc, device=k.device) if dk is None else dk
    dv = torch.zeros(v.shape, dtype=acc, device=v.device) if dv is None else dv
    dq.add_(dq_blk)
    dk.add_(dk_blk)
    dv.add_(dv_blk)
    return dq, dk, dv


def flash_attention(q, k, v, causal=False, softmax_scale=None, deterministic=None):
    """Differentiable reference with flash-attn semantics (bottom-right causal, zero unseen rows).

    Math in the input dtype; autograd gives the gradients. ``deterministic``: ignored, as in
    ``attention_chunk_backward``.
    """
    scale = default_scale(q.shape[-1], softmax_scale)
    Sq, Sk = q.shape[1], k.shape[1]
    s = _scores(q, k, Sk - Sq, 0, causal, scale)
    p = torch.softmax(s.to(accumulator_dtype(q.dtype)), dim=-1).nan_to_num(nan=0.0).to(v.dtype)
    v = _repeat_kv(v, q.shape[2] // v.shape[2])
    return torch.einsum("bhmn,bnhd->bmhd", p, v)


def flash_attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, softmax_scale=None,
    deterministic=None,
):  # fmt: skip
    """Differentiable reference for ``flash_attn_varlen_func``: ``flash_attention`` on each
    document (``q [total_q, H, d]``, ``k, v [total_k, Hkv, d]``), outputs concatenated.
    ``deterministic``: ignored, as in ``attention_chunk_backward``."""
    scale = default_scale(q.shape[-1], softmax_scale)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        a, b, c, e = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if e == c:  # a document without keys: its rows see nothing
            outs.append(q[a:b] * 0)
        else:
            outs.append(flash_attention(q[None, a:b], k[None, c:e], v[None, c:e], causal, scale)[0])
    return torch.cat(outs)
