"""Public attention ops: input checks at the boundary, backend dispatch, autograd.

Every op takes the flash-attn layout ``[B, S, H, d]`` (``k, v`` may have ``Hkv`` heads with
``H % Hkv == 0``) and returns an LSE ``[B, H, Sq]`` in fp32 natural log where it returns one.
The chunk ops take packed documents as ``cu_seqlens`` (``documents.py``).
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch.autograd.function import once_differentiable

from ..backend import resolve_backend
from . import cudnn, documents, naive, torch_cpu
from .common import accumulator_dtype, default_scale

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _describe(value) -> str:
    """What a caller passed, for an error message (a tensor by its dtype, shape and device)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype}, shape {tuple(value.shape)} on {value.device}"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_operand(name: str, t, shape, device, dtypes, need: str, what: str = "") -> None:
    """``t`` is a tensor on q's ``device`` (so not meta: q is checked first), of a dtype in
    ``dtypes`` (``need`` says which in words) and of shape ``shape`` (``what`` names the layout)."""
    _check_tensor(name, t)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {need}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what}{tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; put it on {device}")


def _accumulator_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    # float64 accumulators only on the CPU (the oracle); the GPU kernels accumulate in fp32.
    return (torch.float32, torch.float64) if device.type == "cpu" else (torch.float32,)


def _check_qkv_tensors(q, k, v) -> None:
    """q, k, v are tensors with values (not meta), on one device (checked before a backend is picked)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.is_meta:
        raise ValueError(
            "q, k, v are on the meta device (shapes without values), which attention cannot compute on; "
            "pass tensors on the CPU or a GPU"
        )


def _check_qkv(q, k, v, backend: str) -> None:
    _check_qkv_tensors(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, d], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # The cudnn backend narrows this further in cudnn.check_inputs (with what to use instead).
    allowed = _FLOAT_DTYPES if backend == "triton" else (*_FLOAT_DTYPES, torch.float64)
    if q.dtype not in allowed:
        raise TypeError(f"dtype {q.dtype} is not supported by the {backend} backend; use one of {allowed}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, _, H, D), (Bk, _, Hkv, Dk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"batch sizes differ: q has {B}, k/v have {Bk}")
    if D != Dk:
        raise ValueError(f"head dims differ: q has d={D}, k/v have d={Dk}")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"head dim d={D} is not supported; use 1 <= d <= {MAX_HEAD_DIM}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv} (GQA/MQA); "
            f"use Hkv in {[g for g in range(1, H + 1) if H % g == 0]}"
        )


def _check_inputs(q, k, v, causal, softmax_scale) -> tuple[str, bool, float]:
    """The checks every entry point runs on ``q, k, v, causal, softmax_scale``, in this order: the
    tensors' types and device (before a backend is picked: picking one reads ``q.device``), then
    the backend's rules. Returns ``(backend, causal, scale)``."""
    _check_qkv_tensors(q, k, v)
    backend = resolve_backend(q.device)
    _check_qkv(q, k, v, backend)
    return backend, *_check_causal_and_scale(causal, softmax_scale, q.shape[-1])


def _check_causal_and_scale(causal, softmax_scale, head_dim: int) -> tuple[bool, float]:
    """``causal`` is a bool (a string or a number passed positionally is refused, not truthy);
    ``softmax_scale`` as ``_check_scale`` takes it. Returns ``(causal, scale)``."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (True or False), got {_describe(causal)}")
    return causal, _check_scale(softmax_scale, head_dim)


def _check_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale``: None (``1/sqrt(d)``) or a finite real number (a 0-d real tensor too)."""
    if softmax_scale is None:
        return default_scale(head_dim, None)
    if isinstance(softmax_scale, torch.Tensor):
        ok = softmax_scale.dim() == 0 and softmax_scale.dtype != torch.bool and not softmax_scale.is_complex()
    else:
        ok = isinstance(softmax_scale, numbers.Real) and not isinstance(softmax_scale, bool)
    need = "None (for 1/sqrt(d)) or a finite real number (int or float)"
    if not ok:
        raise TypeError(f"softmax_scale must be {need}, got {_describe(softmax_scale)}")
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be {need}, got {scale}")
    return default_scale(head_dim, scale)


def _check_offset(name: str, value) -> int:
    """A block's global start: a Python int (or an integer-valued 0-d integer tensor / numpy
    integer); negative positions are valid. Floats are not truncated, bools are refused."""
    if torch.compiler.is_compiling() and not isinstance(value, (bool, float, torch.Tensor)):
        return value  # e.g. a symbolic length: operator.index would fix the graph to one value
    bad = isinstance(value, bool) or (
        isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool)
    )
    if not bad:
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int (a global token position, negative allowed), got {_describe(value)}")


def _empty(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No (query, key) pair: ``Sq = 0``, ``Sk = 0`` or ``B = 0`` (or ``H = 0``). Every backend
    returns the block's math without a kernel call: no rows, or rows that saw no key (out 0, lse
    -inf), and zero gradients. (PyTorch's CPU flash kernel dies of SIGFPE on empty sequences.)"""
    return q.numel() == 0 or k.numel() == 0


def resolve_deterministic(deterministic: bool | None) -> bool:
    """Which Triton backward runs: True (and None, the default) the split kernels, False the fused
    one, whose dQ atomics are not bit-reproducible. The split kernels are the default because they
    were the faster on an H200 (bf16, S=16K: 314-357 TFLOP/s against the fused 258-295); the fused
    one stays selectable for tuning. Other backends ignore it (they are deterministic)."""
    return True if deterministic is None else bool(deterministic)


def _check_buffer(name, t, shape, device) -> None:
    """An fp32 accumulator the op writes into (float64 too on the CPU), unit stride along its last
    dim (where that dim has one element its stride is never used: ``delta`` of a one-row block)."""
    _check_operand(name, t, shape, device, _accumulator_dtypes(device), "a float32 accumulator")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {t.stride()}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take arbitrary batch/seq/head strides but need unit stride along d.
    return t if t.stride(-1) == 1 else t.contiguous()


def _spans(cu_seqlens, q, k, q_start, k_start, causal, keys=False):
    """The Triton kernels' document spans of a block (rows, or rows and keys), or None."""
    if cu_seqlens is None:
        return None
    (B, Sq), Sk = q.shape[:2], k.shape[1]
    rows = documents.chunk_spans(cu_seqlens, B, q_start, Sq, k_start, Sk, causal, q.device)
    return (rows, documents.key_spans(rows, Sk)) if keys else rows


def _pieces(offsets, q, k, q_start, k_start):
    (B, Sq), Sk = q.shape[:2], k.shape[1]
    return documents.chunk_pieces(offsets, B, q_start, Sq, k_start, Sk)


def _run_forward(
    backend, q, k, v, q_start, k_start, causal, scale, out, lse, accumulate, cu_seqlens=None, offsets=None
):
    """Write (accumulate=False) or merge (accumulate=True) one block into ``out``/``lse``.

    ``cu_seqlens``: packed documents (``offsets``: their values, for the torch backend)."""
    if backend == "cudnn":
        cudnn.check_inputs(q, cu_seqlens)
    if _empty(q, k):  # rows that see no key: (0, -inf), the running state as it was
        if not accumulate:
            out.zero_()
            lse.fill_(float("-inf"))
        return
    if backend == "triton":
        from . import triton_fwd

        spans = _spans(cu_seqlens, q, k, q_start, k_start, causal)
        triton_fwd.chunk_forward(q, k, v, q_start, k_start, causal, scale, out, lse, accumulate, spans)
        return
    if backend == "cudnn":
        cudnn.chunk_forward(q, k, v, q_start, k_start, causal, scale, out, lse, accumulate)
        return
    if not accumulate:
        out.zero_()
        lse.fill_(float("-inf"))
    if backend == "torch" and cu_seqlens is not None:
        torch_cpu.pieces_forward(q, k, v, _pieces(offsets, q, k, q_start, k_start), causal, scale, out, lse)
    elif backend == "torch":
        torch_cpu.chunk_forward(q, k, v, q_start, k_start, causal, scale, out, lse)
    else:
        naive.attention_chunk_forward(
            q,
            k,
            v,
            q_start=q_start,
            k_start=k_start,
            causal=causal,
            softmax_scale=scale,
            out=out,
            lse=lse,
            cu_seqlens=cu_seqlens,
        )


def _run_backward(
    backend, do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, dq, dk, dv, cu_seqlens=None, offsets=None,
    deterministic=False,
):  # fmt: skip
    if backend == "cudnn":
        cudnn.check_inputs(q, cu_seqlens)  # delta is recomputed inside cuDNN's backward
    if _empty(q, k):  # no (query, key) pair: the block adds nothing to the gradients
        return
    if backend == "triton":
        from . import triton_bwd

        spans = _spans(cu_seqlens, q, k, q_start, k_start, causal, keys=True)
        triton_bwd.chunk_backward(
            do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, dq, dk, dv, spans, deterministic
        )
    elif backend == "cudnn":
        cudnn.chunk_backward(do, q, k, v, out, lse, q_start, k_start, causal, scale, dq, dk, dv)
    elif backend == "torch" and cu_seqlens is not None:
        pieces = _pieces(offsets, q, k, q_start, k_start)
        torch_cpu.pieces_backward(do, q, k, v, out, lse, pieces, causal, scale, dq, dk, dv)
    elif backend == "torch":
        torch_cpu.chunk_backward(do, q, k, v, out, lse, q_start, k_start, causal, scale, dq, dk, dv)
    else:
        naive.attention_chunk_backward(
            do,
            q,
            k,
            v,
            out,
            lse,
            q_start=q_start,
            k_start=k_start,
            causal=causal,
            softmax_scale=scale,
            delta=delta,
            dq=dq,
            dk=dk,
            dv=dv,
            cu_seqlens=cu_seqlens,
        )


@torch.no_grad()
def attention_chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int,
    k_start: int,
    causal: bool,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend a query block to a key/value block at global offsets; merge into running state.

    Args:
        q: ``[B, Sq, H, d]`` queries at global positions ``q_start .. q_start+Sq-1``.
        k, v: ``[B, Sk, Hkv, d]`` keys/values at global positions ``k_start ..``.
        causal: key ``k_start+n`` is visible to query ``q_start+m`` iff ``k_start+n <= q_start+m``.
        out, lse: optional running fp32 accumulators ``[B, Sq, H, d]`` and ``[B, H, Sq]``
            (start them at 0 and ``-inf``); merged into in place (online softmax) and returned.
        cu_seqlens: packed documents: int32 offsets ``[n_docs + 1]`` over the flattened
            ``[B * S]`` tokens of the whole batch (flash-attn's convention; ``S = cu[-1] / B`` is the
            row the blocks sit in, every row boundary a document boundary). A key is then visible
            only inside its query's document (and causally, when ``causal``); tiles that share no
            document are skipped. Checked in full on the CPU; on q's GPU, trusted (no host sync).

    Returns:
        ``(out, lse)``, fp32. A row that has seen no key yet has ``out = 0, lse = -inf``.

    Example::

        out, lse = attention_chunk_forward(q0, k0, v0, q_start=0, k_start=0, causal=True)
        attention_chunk_forward(q1, k0, v0, q_start=C, k_start=0, causal=True, out=o1, lse=l1)
    """
    backend, causal, scale = _check_inputs(q, k, v, causal, softmax_scale)
    q_start, k_start = _check_offset("q_start", q_start), _check_offset("k_start", k_start)
    B, Sq, H, D = q.shape
    if (out is None) != (lse is None):
        raise ValueError("pass both out and lse (running accumulators) or neither")
    accumulate = out is not None
    if accumulate:
        _check_buffer("out", out, (B, Sq, H, D), q.device)
        _check_buffer("lse", lse, (B, H, Sq), q.device)
    else:
        acc = accumulator_dtype(q.dtype)
        out = torch.empty(B, Sq, H, D, dtype=acc, device=q.device)
        lse = torch.empty(B, H, Sq, dtype=acc, device=q.device)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    run = _chunk_forward_op if torch.compiler.is_compiling() else _chunk_forward
    run(q, k, v, out, lse, q_start, k_start, causal, scale, accumulate, cu_seqlens, backend)
    return out, lse


def _chunk_forward(q, k, v, out, lse, q_start, k_start, causal, scale, accumulate, cu_seqlens, backend) -> None:
    """``attention_chunk_forward`` after its checks: the documents' offsets, then the backend."""
    offsets = None
    if cu_seqlens is not None:
        offsets = documents.check_chunk(cu_seqlens, q.shape[0], q_start, q.shape[1], k_start, k.shape[1], q.device)
    _run_forward(backend, q, k, v, q_start, k_start, causal, scale, out, lse, accumulate, cu_seqlens, offsets)


# Under torch.compile the chunk ops run as two custom ops that write into their buffers (Dynamo
# cannot trace the Triton launches' host code; flash_attention's ops below say more). The
# document offsets are read and checked inside them, where Dynamo does not trace.
@torch.library.custom_op("fpdt_kernels::attention_chunk_forward_", mutates_args=("out", "lse"))
def _chunk_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_start: int,
    k_start: int,
    causal: bool,
    scale: float,
    accumulate: bool,
    cu_seqlens: torch.Tensor | None,
    backend: str,
) -> None:
    _chunk_forward(q, k, v, out, lse, q_start, k_start, causal, scale, accumulate, cu_seqlens, backend)


@torch.no_grad()
def attention_chunk_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    q_start: int,
    k_start: int,
    causal: bool,
    softmax_scale: float | None = None,
    delta: torch.Tensor | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of one block, accumulating into fp32 ``dq [B,Sq,H,d]``, ``dk, dv [B,Sk,Hkv,d]``.

    ``out``/``lse`` are the MERGED output and LSE of the whole attention row (over every KV
    block), as the forward left them; ``delta = rowsum(do * out)`` (``[B, H, Sq]`` fp32) may be
    passed to skip recomputing it for each KV block. Missing gradient buffers are allocated as
    zeros. GQA gradients are summed over the query heads that share a KV head. ``cu_seqlens``:
    packed documents, as in ``attention_chunk_forward``. ``deterministic``: as in
    ``flash_attention`` (the fused Triton backward adds dQ with atomics unless it is set).
    """
    backend, causal, scale = _check_inputs(q, k, v, causal, softmax_scale)
    q_start, k_start = _check_offset("q_start", q_start), _check_offset("k_start", k_start)
    B, Sq, H, D = q.shape
    _check_operand("do", do, q.shape, q.device, (q.dtype,), f"in q's dtype {q.dtype}", "[B, Sq, H, d] = ")
    # out: in q's dtype, or the running accumulator as attention_chunk_forward left it.
    out_dtypes = (q.dtype, *_accumulator_dtypes(q.device))
    need = f"in q's dtype {q.dtype} or a float32 accumulator (as attention_chunk_forward returns it)"
    _check_operand("out", out, q.shape, q.device, out_dtypes, need, "[B, Sq, H, d] = ")
    need = "the float32 LSE that attention_chunk_forward returns"
    _check_operand("lse", lse, (B, H, Sq), q.device, _accumulator_dtypes(q.device), need, "[B, H, Sq] = ")
    if delta is not None:
        _check_buffer("delta", delta, (B, H, Sq), q.device)
    acc = accumulator_dtype(q.dtype)
    grads = []
    for name, g, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g is None:
            g = torch.zeros(ref.shape, dtype=acc, device=ref.device)
        else:
            _check_buffer(name, g, ref.shape, q.device)
        grads.append(g)
    dq, dk, dv = grads
    q, k, v, do, out = (_last_dim_contiguous(t) for t in (q, k, v, do, out))
    deterministic = resolve_deterministic(deterministic)
    run = _chunk_backward_op if torch.compiler.is_compiling() else _chunk_backward
    run(do, q, k, v, out, lse, delta, dq, dk, dv, q_start, k_start, causal, scale, cu_seqlens, backend, deterministic)
    return dq, dk, dv


def _chunk_backward(
    do, q, k, v, out, lse, delta, dq, dk, dv, q_start, k_start, causal, scale, cu_seqlens, backend, deterministic
) -> None:
    """``attention_chunk_backward`` after its checks: the documents' offsets, then the backend."""
    offsets = None
    if cu_seqlens is not None:
        offsets = documents.check_chunk(cu_seqlens, q.shape[0], q_start, q.shape[1], k_start, k.shape[1], q.device)
    _run_backward(
        backend, do, q, k, v, out, lse, delta, q_start, k_start, causal, scale, dq, dk, dv, cu_seqlens, offsets,
        deterministic,
    )  # fmt: skip


@torch.library.custom_op("fpdt_kernels::attention_chunk_backward_", mutates_args=("dq", "dk", "dv"))
def _chunk_backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor | None,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    q_start: int,
    k_start: int,
    causal: bool,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    backend: str,
    deterministic: bool,
) -> None:
    _chunk_backward(
        do, q, k, v, out, lse, delta, dq, dk, dv, q_start, k_start, causal, scale, cu_seqlens, backend, deterministic
    )


def _check_partials(out_a, lse_a, out_b, lse_b) -> None:
    """``merge_attention``'s contract: two outputs ``[B, S, H, d]`` of one float dtype each and two
    LSEs ``[B, H, S]`` in fp32 (float64 too, the oracle's), all on one device."""
    named = (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b))
    for name, t in named:
        _check_tensor(name, t)  # elementwise: meta tensors merge too
    devices = [t.device for _, t in named]
    if len(set(devices)) != 1:
        raise ValueError(f"out_a, lse_a, out_b, lse_b must be on one device, got {', '.join(map(str, devices))}")
    for name, t in named:
        is_out = name.startswith("out")
        rank, layout = (4, "[B, S, H, d]") if is_out else (3, "[B, H, S]")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
        dtypes = (*_FLOAT_DTYPES, torch.float64) if is_out else (torch.float32, torch.float64)
        if t.dtype not in dtypes:
            need = "a floating-point output" if is_out else "a float32 LSE (natural log)"
            raise TypeError(f"{name} must be {need} of dtype in {dtypes}, got {t.dtype}")
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            f"shapes differ: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
            f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}"
        )
    B, S, H, _ = out_a.shape
    if tuple(lse_a.shape) != (B, H, S):
        raise ValueError(f"lse must have shape [B, H, S] = {(B, H, S)}, got {tuple(lse_a.shape)}")


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Combine partial attentions over disjoint key sets: fp32 ``(out [B,S,H,d], lse [B,H,S])``
    (float64 where ``out_a`` is float64, the oracle's accumulator dtype).

    Safe when either LSE is ``-inf`` (that side saw no key). Elementwise, so plain PyTorch ops
    run it on any device. ``out_*``: fp16, bf16, fp32 or float64; ``lse_*``: fp32 (or float64);
    all four on one device.
    """
    _check_partials(out_a, lse_a, out_b, lse_b)
    return naive.merge_attention(out_a, lse_a, out_b, lse_b)


def _whole_path(q, k, causal: bool, backend: str) -> str:
    """Which implementation runs ``flash_attention`` on these shapes: ``empty`` (no (query, key)
    pair), ``torch_whole`` (one call of PyTorch's CPU flash kernel covers the block), or the backend."""
    if _empty(q, k):
        return "empty"
    if backend == "torch" and torch_cpu.covers_whole_block(q.shape[1], k.shape[1], k.shape[1] - q.shape[1], causal):
        return "torch_whole"
    return backend


def _whole_forward(q, k, v, causal: bool, scale: float, backend: str):
    """``flash_attention``'s forward: ``(out, lse, (q, k, v) as the backward takes them)``.

    Triton: the kernels write the output in the input dtype (fp32 only inside the kernels); q, k,
    v come back zero-padded where the head dim is off 16 bytes. torch: when one call of PyTorch's
    CPU flash kernel covers the whole block, it runs alone, holding what SDPA would; otherwise
    (causal with ``Sq != Sk``) the chunk path with fp32 accumulators. naive: the chunk path.
    """
    B, Sq, H, D = q.shape
    # Bottom-right causal alignment (flash-attn): query m sees keys n <= m + Sk - Sq.
    q_start = k.shape[1] - Sq
    path = _whole_path(q, k, causal, backend)
    if backend == "cudnn":
        cudnn.check_inputs(q)
    if path == "empty":  # no rows, or rows that see no key: out 0 (lse -inf), zero gradients
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((B, H, Sq), float("-inf"), dtype=accumulator_dtype(q.dtype), device=q.device)
    elif path == "triton":
        from . import triton_fwd

        q, k, v = triton_fwd.pad_inputs(q, k, v)  # copies only for head dims off 16 bytes
        out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        triton_fwd.chunk_forward(q, k, v, q_start, 0, causal, scale, out, lse, False)
    elif path == "cudnn":
        out, lse = cudnn.flash_forward(q, k, v, causal, scale)
    elif path == "torch_whole":
        out, lse = torch_cpu.flash_forward(q, k, v, causal, scale)
    else:
        acc = accumulator_dtype(q.dtype)
        out = torch.empty(B, Sq, H, D, dtype=acc, device=q.device)
        lse = torch.empty(B, H, Sq, dtype=acc, device=q.device)
        _run_forward(backend, q, k, v, q_start, 0, causal, scale, out, lse, False)
        out = out.to(q.dtype)
    return out, lse, (q, k, v)


def _whole_backward(do, q, k, v, out, lse, causal: bool, scale: float, backend: str, deterministic: bool):
    """``flash_attention``'s backward: ``(dq, dk, dv)`` in the input dtype; ``q, k, v`` as
    ``_whole_forward`` returned them."""
    path = _whole_path(q, k, causal, backend)
    q_start = k.shape[1] - q.shape[1]
    do = _last_dim_contiguous(do)
    if path == "empty":
        return tuple(torch.zeros_like(t) for t in (q, k, v))
    if path == "triton":
        from . import triton_bwd

        return triton_bwd.flash_backward(do, q, k, v, out, lse, q_start, causal, scale, deterministic=deterministic)
    if path == "cudnn":
        return cudnn.flash_backward(do, q, k, v, out, lse, causal, scale)
    if path == "torch_whole":
        return torch_cpu.flash_backward(do, q, k, v, out, lse, causal, scale)
    acc = accumulator_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    _run_backward(backend, do, q, k, v, out, lse, None, q_start, 0, causal, scale, dq, dk, dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FlashAttention(torch.autograd.Function):
    """``flash_attention`` in eager mode: gradients come back in the input dtype, and the forward's
    padded copies (Triton, odd head dims) are saved for the backward instead of made again. The
    backward is first-order: differentiating it (``create_graph=True``, a gradient penalty) raises
    on every backend rather than silently dropping the second-order terms."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend, deterministic):
        out, lse, saved = _whole_forward(q, k, v, causal, scale, backend)
        ctx.save_for_backward(*saved, out, lse)
        ctx.causal, ctx.scale, ctx.backend, ctx.deterministic = causal, scale, backend, deterministic
        return out

    @staticmethod
    @once_differentiable  # first-order only: a double backward raises instead of dropping terms
    def backward(ctx, do):
        grads = _whole_backward(do, *ctx.saved_tensors, ctx.causal, ctx.scale, ctx.backend, ctx.deterministic)
        return (*grads, None, None, None, None)


# Under torch.compile the same forward and backward run as two opaque custom ops: Dynamo cannot
# trace the Triton launches' host code (autotuning, document spans), and an op keeps the whole
# call one node of the graph (no graph break, fullgraph=True works). Their outputs are
# contiguous, as the fake (shape-only) versions below say; eager calls keep _FlashAttention, so
# eager steps (and the fake-tensor memory counts, which see every tensor the kernels allocate)
# are unchanged.
@torch.library.custom_op("fpdt_kernels::flash_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, backend: str, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    del deterministic  # the backward's choice, kept with the forward's inputs for it
    out, lse, _ = _whole_forward(q, k, v, causal, scale, backend)
    return out.contiguous(), lse.contiguous()


def fake_outputs(q: torch.Tensor, lse_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """What a forward op returns, as shapes only: ``out`` like ``q`` and the LSE in the
    accumulator dtype, both contiguous (the ops make their outputs so)."""
    return empty_contiguous(q)[0], q.new_empty(lse_shape, dtype=accumulator_dtype(q.dtype))


def empty_contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contiguous empty tensors shaped like ``tensors``: a backward op's gradients, shapes only."""
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors)


@_forward_op.register_fake
def _(q, k, v, causal, scale, backend, deterministic):
    B, Sq, H, _ = q.shape
    return fake_outputs(q, (B, H, Sq))


@torch.library.custom_op("fpdt_kernels::flash_attention_backward", mutates_args=())
def _backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    backend: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _whole_path(q, k, causal, backend) == "triton":  # the forward's padding, made again
        from . import triton_fwd

        q, k, v = triton_fwd.pad_inputs(q, k, v)
    grads = _whole_backward(do, q, k, v, out, lse, causal, scale, backend, deterministic)
    return tuple(g.contiguous() for g in grads)


@_backward_op.register_fake
def _(do, q, k, v, out, lse, causal, scale, backend, deterministic):
    return empty_contiguous(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend, ctx.deterministic = causal, scale, backend, deterministic
    ctx.mark_non_differentiable(lse)


def _backward_of_op(ctx, do, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    grads = _backward_op(do, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend, ctx.deterministic)
    return (*grads, None, None, None, None)


_forward_op.register_autograd(_backward_of_op, setup_context=_setup_context)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Exact attention with flash-attn's ``flash_attn_func`` semantics; differentiable.

    Args:
        q: ``[B, Sq, H, d]``; k, v: ``[B, Sk, Hkv, d]`` with ``H % Hkv == 0``; ``d <= 256``;
            fp16, bf16 or fp32 (float64 too on the torch/naive backends).
        causal: bottom-right aligned when ``Sq != Sk`` (query ``m`` sees keys
            ``n <= m + Sk - Sq``); a query row that sees no key outputs 0.
        softmax_scale: defaults to ``1/sqrt(d)``.
        deterministic: the Triton backward. None (default) or True: split (a dK/dV kernel and a
            dQ kernel, seven matmuls, bit-reproducible for MHA), the faster one on an H200
            today. False: fused (one kernel per KV block computes the five matmuls once and adds
            dQ with fp32 atomics, so dQ is not bit-reproducible); measured slower so far
            (``experiments/results/gpu_landscape_nvidia_h200``), kept for tuning.

    Returns:
        ``[B, Sq, H, d]`` in the input dtype.

    Example::

        q = torch.randn(2, 1000, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = v = torch.randn(2, 1000, 2, 64, device="cuda", dtype=torch.bfloat16)
        flash_attention(q, k, v, causal=True).sum().backward()
    """
    backend, causal, scale = _check_inputs(q, k, v, causal, softmax_scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    deterministic = resolve_deterministic(deterministic)
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, causal, scale, backend, deterministic)[0]
    return _FlashAttention.apply(q, k, v, causal, scale, backend, deterministic)
