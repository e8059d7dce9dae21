"""``flash_attention_varlen``: packed documents with flash-attn's ``flash_attn_varlen_func`` semantics.

Triton runs one launch over the whole packed batch (one batch row of ``total`` tokens), with the
document spans of ``documents.varlen_spans``, so tiles that share no document are never visited.
torch runs PyTorch's CPU flash kernel on each document; naive is the per-document reference.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..backend import resolve_backend
from . import documents, naive, torch_cpu
from .api import (
    _check_causal_and_scale,
    _check_qkv,
    _last_dim_contiguous,
    empty_contiguous,
    fake_outputs,
    resolve_deterministic,
)
from .common import accumulator_dtype


def _checked_pieces(q, k, cu_q, cu_k, max_q, max_k, backend: str):
    """Check the offsets and maxima against ``q, k`` (reading the offsets on the host); return
    the documents' pieces for the torch backend, else None."""
    offsets_q, offsets_k = documents.check_varlen(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k, q.device)
    return documents.varlen_pieces(offsets_q, offsets_k) if backend == "torch" else None


def _varlen_forward(q, k, v, cu_q, cu_k, pieces, causal: bool, scale: float, backend: str):
    """``flash_attention_varlen``'s forward (triton or torch): ``(out, lse, (q, k, v))`` with
    ``out [total_q, H, d]``, ``lse [1, H, total_q]`` and q, k, v as the backward takes them (one
    batch row, padded for Triton). ``pieces``: the documents' pieces
    (``documents.varlen_pieces``) for torch, else None. The backward makes the Triton document
    spans again from the offsets rather than keeping them."""
    (Tq, H, D), Tk = q.shape, k.shape[0]
    if backend == "triton":
        from . import triton_fwd

        rows = documents.varlen_spans(cu_q, cu_k, Tq, Tk, causal, q.device)
        q, k, v = triton_fwd.pad_inputs(q[None], k[None], v[None])
        out = torch.empty(1, Tq, H, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(1, H, Tq, dtype=torch.float32, device=q.device)
        triton_fwd.chunk_forward(q, k, v, 0, 0, causal, scale, out, lse, False, rows)
        return out[0], lse, (q, k, v)
    acc = accumulator_dtype(q.dtype)
    q, k, v = q[None], k[None], v[None]
    out = torch.zeros(1, Tq, H, D, dtype=acc, device=q.device)
    lse = torch.full((1, H, Tq), float("-inf"), dtype=acc, device=q.device)
    torch_cpu.pieces_forward(q, k, v, pieces, causal, scale, out, lse)
    return out.to(q.dtype)[0], lse, (q, k, v)


def _varlen_backward(do, q, k, v, out, lse, cu_q, cu_k, pieces, causal, scale, backend, deterministic):
    """``flash_attention_varlen``'s backward: ``(dq, dk, dv)`` as ``[total, heads, d]`` in the
    input dtype; ``q, k, v, out`` as one batch row (``_varlen_forward``'s)."""
    do = _last_dim_contiguous(do)[None]
    if backend == "triton":
        from . import triton_bwd

        rows = documents.varlen_spans(cu_q, cu_k, q.shape[1], k.shape[1], causal, q.device)
        spans = (rows, documents.key_spans(rows, k.shape[1]))
        dq, dk, dv = triton_bwd.flash_backward(
            do, q, k, v, out, lse, 0, causal, scale, spans, deterministic=deterministic
        )
    else:
        acc = accumulator_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
        torch_cpu.pieces_backward(do, q, k, v, out, lse, pieces, causal, scale, dq, dk, dv)
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    return dq[0], dk[0], dv[0]


class _FlashAttentionVarlen(torch.autograd.Function):
    """``flash_attention_varlen`` in eager mode (triton or torch): gradients in the input dtype.
    Tensors are handled as one batch row: ``[total, H, d] -> [1, total, H, d]``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, pieces, causal, scale, backend, deterministic):
        out, lse, saved = _varlen_forward(q, k, v, cu_q, cu_k, pieces, causal, scale, backend)
        ctx.save_for_backward(*saved, out[None], lse, cu_q, cu_k)
        ctx.causal, ctx.scale, ctx.backend, ctx.pieces = causal, scale, backend, pieces
        ctx.deterministic = deterministic
        return out

    @staticmethod
    @once_differentiable  # first-order only, as flash_attention's
    def backward(ctx, do):
        grads = _varlen_backward(
            do, *ctx.saved_tensors, ctx.pieces, ctx.causal, ctx.scale, ctx.backend, ctx.deterministic
        )
        return (*grads, None, None, None, None, None, None, None)


# Under torch.compile: two opaque custom ops, as for flash_attention (api.py says why). The
# offsets are read and checked inside the forward op, where Dynamo does not trace.
@torch.library.custom_op("fpdt_kernels::flash_attention_varlen_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    causal: bool,
    scale: float,
    backend: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    del deterministic  # the backward's choice, kept with the forward's inputs for it
    pieces = _checked_pieces(q, k, cu_q, cu_k, max_q, max_k, backend)
    out, lse, _ = _varlen_forward(q, k, v, cu_q, cu_k, pieces, causal, scale, backend)
    return out.contiguous(), lse.contiguous()


@_forward_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, deterministic):
    Tq, H, _ = q.shape
    return fake_outputs(q, (1, H, Tq))


@torch.library.custom_op("fpdt_kernels::flash_attention_varlen_backward", mutates_args=())
def _backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    causal: bool,
    scale: float,
    backend: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out = q[None], k[None], v[None], out[None]
    pieces = None
    if backend == "triton":  # the forward's padding, made again
        from . import triton_fwd

        q, k, v = triton_fwd.pad_inputs(q, k, v)
    else:
        pieces = documents.varlen_pieces(cu_q.tolist(), cu_k.tolist())
    grads = _varlen_backward(do, q, k, v, out, lse, cu_q, cu_k, pieces, causal, scale, backend, deterministic)
    return tuple(g.contiguous() for g in grads)


@_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_q, cu_k, causal, scale, backend, deterministic):
    return empty_contiguous(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, _, _, causal, scale, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.causal, ctx.scale, ctx.backend, ctx.deterministic = causal, scale, backend, deterministic
    ctx.mark_non_differentiable(lse)


def _backward_of_op(ctx, do, _dlse):
    grads = _backward_op(do, *ctx.saved_tensors, ctx.causal, ctx.scale, ctx.backend, ctx.deterministic)
    return (*grads, *[None] * 8)


_forward_op.register_autograd(_backward_of_op, setup_context=_setup_context)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Exact attention inside packed documents, with flash-attn's ``flash_attn_varlen_func``
    semantics; differentiable.

    Args:
        q: ``[total_q, H, d]``; k, v: ``[total_k, Hkv, d]`` with ``H % Hkv == 0``; ``d <= 256``;
            fp16, bf16 or fp32 (float64 too on the torch/naive backends).
        cu_seqlens_q, cu_seqlens_k: int32 ``[n_docs + 1]`` cumulative offsets from 0 to
            ``total_q`` / ``total_k`` (never decreasing; a document may be empty on either side).
            Document ``i`` is queries ``cu_seqlens_q[i]..cu_seqlens_q[i+1]`` and keys
            ``cu_seqlens_k[i]..cu_seqlens_k[i+1]``. On the CPU or on q's device.
        max_seqlen_q, max_seqlen_k: at least the longest document on each side.
        causal: bottom-right aligned in each document (its query ``m`` sees its keys
            ``n <= m + len_k - len_q``); a query row that sees no key outputs 0.
        softmax_scale: defaults to ``1/sqrt(d)``.
        deterministic: which Triton backward, as in ``flash_attention``.

    Returns:
        ``[total_q, H, d]`` in the input dtype.

    Example::

        cu = torch.tensor([0, 300, 1000], dtype=torch.int32, device="cuda")
        q = torch.randn(1000, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = v = torch.randn(1000, 2, 64, device="cuda", dtype=torch.bfloat16)
        flash_attention_varlen(q, k, v, cu, cu, 700, 700, causal=True).sum().backward()
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [total, H, d] (documents packed along dim 0), got {tuple(t.shape)}")
    backend = resolve_backend(q.device)
    if backend == "cudnn":
        raise ValueError("the cudnn backend does not take packed documents; use the triton backend (or torch on CPU)")
    _check_qkv(q[None], k[None], v[None], backend)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    causal, scale = _check_causal_and_scale(causal, softmax_scale, q.shape[-1])
    deterministic = resolve_deterministic(deterministic)
    if torch.compiler.is_compiling() and backend != "naive":  # naive's per-document loop is traced
        return _forward_op(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, backend, deterministic
        )[0]
    pieces = _checked_pieces(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend)
    if backend == "naive":
        return naive.flash_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
        )
    return _FlashAttentionVarlen.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, pieces, causal, scale, backend, deterministic
    )
