"""The ``cudnn`` backend: PyTorch's cuDNN attention ops behind the chunk API (CUDA only).

``torch.ops.aten._scaled_dot_product_cudnn_attention`` returns the output and the natural-log
LSE (``[B, H, Sq, 1]``, fp32) of one block, which merge with other blocks' partials as ours do;
its ``_backward`` takes an ``out`` and ``lse`` as arguments, so it can run on the MERGED output
and LSE of a whole row, block by block, as FPDT's backward needs (PyTorch's own context
parallelism calls them per ring step the same way). Inputs go in ``[B, H, S, d]`` views of our
``[B, S, H, d]`` tensors (no copies; cuDNN needs unit stride only along ``d``).

What cuDNN's SDPA cannot express is refused with the reason and the backend that can: a causal
mask other than top-left aligned (``n <= m``, ``Sq == Sk``) or none, packed documents, head dims
that are not a multiple of 8 (or above 256), fp32 inputs. Blocks a chunked causal pipeline
produces are all expressible: a diagonal block (equal offsets), or one every query sees in full,
or one no query sees (skipped). GQA/MQA: K/V heads are repeated for the call and their
gradients summed over each group (a copy of K/V per call, which our kernels avoid).
"""

from __future__ import annotations

import torch

from .naive import merge_into

DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256

# What a block's mask becomes for cuDNN: no mask, top-left causal, or nothing visible.
NONE, CAUSAL, SKIP = "none", "causal", "skip"


def mask_mode(sq: int, sk: int, q_start: int, k_start: int, causal: bool) -> str:
    """How cuDNN runs the block whose key ``k_start+n`` is visible to query ``q_start+m`` iff
    ``k_start+n <= q_start+m`` (when ``causal``); ``ValueError`` if it cannot."""
    if not causal:
        return NONE
    delta = q_start - k_start
    if delta >= sk - 1:  # even the first query sees the last key
        return NONE
    if delta + sq - 1 < 0:  # even the last query sees no key
        return SKIP
    if delta == 0 and sq == sk:
        return CAUSAL
    raise ValueError(
        f"the cudnn backend cannot mask this causal block (Sq={sq}, Sk={sk}, q_start - k_start = {delta}): "
        "cuDNN's SDPA takes a top-left causal mask with Sq == Sk, or none; use the triton backend, which masks "
        "at any offsets (flash_attention's bottom-right causal with Sq != Sk is such a block)"
    )


def check_inputs(q: torch.Tensor, cu_seqlens=None) -> None:
    """The dtype, head-dim and document checks the ops cannot pass (masks: :func:`mask_mode`)."""
    if cu_seqlens is not None:
        raise ValueError("the cudnn backend does not take packed documents (cu_seqlens); use the triton backend")
    if q.dtype not in DTYPES:
        raise TypeError(f"the cudnn backend takes fp16 or bf16 inputs, got {q.dtype}; use the triton backend for fp32")
    d = q.shape[-1]
    if d % 8 or d > MAX_HEAD_DIM:
        raise ValueError(
            f"the cudnn backend needs a head dim that is a multiple of 8 and at most {MAX_HEAD_DIM}, got d={d}; "
            "use the triton backend (any d <= 256)"
        )


def _bhsd(t: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``[B, S, H, d]`` as the ``[B, H*groups, S, d]`` view (or, for GQA, copy) cuDNN takes."""
    t = t.transpose(1, 2)
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _per_kv_head(g: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H, S, d]`` gradient of repeated K/V heads -> ``[B, S, Hkv, d]`` summed over each group."""
    g = g.transpose(1, 2)
    return g if groups == 1 else g.unflatten(2, (-1, groups)).sum(3)


def block_forward(q, k, v, q_start, k_start, causal, scale):
    """``(out [B, Sq, H, d] in q's dtype, lse [B, H, Sq] fp32)`` of one block, or ``None`` when no
    query sees any key of it."""
    B, Sq, H, _ = q.shape
    mode = mask_mode(Sq, k.shape[1], q_start, k_start, causal)
    if mode == SKIP:
        return None
    groups = H // k.shape[2]
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhsd(q), _bhsd(k, groups), _bhsd(v, groups), None, True, 0.0, mode == CAUSAL, False, scale=scale
    )[:2]
    return out.transpose(1, 2), lse.reshape(B, H, Sq)


def chunk_forward(q, k, v, q_start, k_start, causal, scale, out, lse, accumulate) -> None:
    """Write (or with ``accumulate`` merge) one block into the fp32 ``out``/``lse``."""
    res = block_forward(q, k, v, q_start, k_start, causal, scale)
    if res is None:
        if not accumulate:
            out.zero_()
            lse.fill_(float("-inf"))
        return
    o, block_lse = res
    if accumulate:
        merge_into(out, lse, o, block_lse)
    else:
        out.copy_(o)
        lse.copy_(block_lse)


def block_backward(do, q, k, v, out, lse, q_start, k_start, causal, scale):
    """``(dq, dk, dv)`` of one block given the MERGED ``out``/``lse`` of its rows (``None`` when the
    block is masked out): ``dq [B, Sq, H, d]``, ``dk, dv [B, Sk, Hkv, d]``, in q's dtype."""
    B, Sq, H, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    mode = mask_mode(Sq, Sk, q_start, k_start, causal)
    if mode == SKIP:
        return None
    groups = H // Hkv
    seed = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout is 0: never read
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd(do),  # the API made it contiguous along d, as cuDNN needs
        _bhsd(q),
        _bhsd(k, groups),
        _bhsd(v, groups),
        _bhsd(out.to(q.dtype)),
        lse.reshape(B, H, Sq, 1).contiguous(),
        seed,
        seed,
        None,
        None,
        None,
        Sq,
        Sk,
        0.0,
        mode == CAUSAL,
        scale=scale,
    )
    return dq.transpose(1, 2), _per_kv_head(dk, groups), _per_kv_head(dv, groups)


def chunk_backward(do, q, k, v, out, lse, q_start, k_start, causal, scale, dq, dk, dv) -> None:
    """Add one block's gradients into the fp32 buffers ``dq``, ``dk``, ``dv``."""
    grads = block_backward(do, q, k, v, out, lse, q_start, k_start, causal, scale)
    if grads is None:
        return
    for acc, g in zip((dq, dk, dv), grads, strict=True):
        acc.add_(g.to(acc.dtype))


def flash_forward(q, k, v, causal, scale):
    """``flash_attention``'s forward: ``(out in q's dtype, lse fp32)``; bottom-right causal."""
    B, Sq, H, D = q.shape
    res = block_forward(q, k, v, k.shape[1] - Sq, 0, causal, scale)
    if res is None:
        return q.new_zeros(B, Sq, H, D), torch.full((B, H, Sq), float("-inf"), device=q.device)
    return res


def flash_backward(do, q, k, v, out, lse, causal, scale):
    """``flash_attention``'s backward: ``(dq, dk, dv)`` in the input dtype."""
    grads = block_backward(do, q, k, v, out, lse, k.shape[1] - q.shape[1], 0, causal, scale)
    if grads is None:
        return tuple(torch.zeros_like(t) for t in (q, k, v))
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True))
