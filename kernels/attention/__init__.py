"""Exact (flash) attention: Triton kernels, a PyTorch CPU backend and the ``naive`` reference."""

from . import naive
from .api import attention_chunk_backward, attention_chunk_forward, flash_attention, merge_attention

__all__ = [
    "attention_chunk_backward",
    "attention_chunk_forward",
    "flash_attention",
    "merge_attention",
    "naive",
]
