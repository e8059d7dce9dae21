"""Exact (flash) attention: Triton kernels, a PyTorch CPU backend and the ``naive`` reference."""

from . import naive
from .api import attention_chunk_backward, attention_chunk_forward, flash_attention, merge_attention
from .varlen import flash_attention_varlen

__all__ = [
    "attention_chunk_backward",
    "attention_chunk_forward",
    "flash_attention",
    "flash_attention_varlen",
    "merge_attention",
    "naive",
]
