"""Attention kernels for long sequences. Depends on torch (and triton for the GPU path) only.

Public API::

    from fpdt_kernels import flash_attention, attention_chunk_forward, attention_chunk_backward
    from fpdt_kernels import flash_attention_varlen, merge_attention, naive, set_backend, use_backend

Packed documents: ``flash_attention_varlen`` (flash-attn's ``flash_attn_varlen_func``) and the
chunk ops' ``cu_seqlens=`` keyword; the Triton kernels skip tiles that share no document.

Check that the Triton kernels compile for sm_90/sm_80 without spills, on a machine without a
GPU: ``python -m fpdt_kernels.compile_check --quick`` (the full matrix without ``--quick``). fp32
inputs use tensor cores in ``tf32x3`` on GPU; ``FPDT_FP32_PRECISION=tf32`` or ``ieee`` overrides.
"""

from .attention import (
    attention_chunk_backward,
    attention_chunk_forward,
    flash_attention,
    flash_attention_varlen,
    merge_attention,
    naive,
)
from .backend import BACKENDS, resolve_backend, set_backend, triton_interpreter_on, use_backend

__all__ = [
    "BACKENDS",
    "attention_chunk_backward",
    "attention_chunk_forward",
    "flash_attention",
    "flash_attention_varlen",
    "merge_attention",
    "naive",
    "resolve_backend",
    "set_backend",
    "triton_interpreter_on",
    "use_backend",
]
