"""The one-block harness of the FPDT benchmarks: an attention block (QKV projection, RoPE,
attention, output projection) forward + backward on one device (``P = 1``)."""

from __future__ import annotations

import torch

from parallel import (
    AttentionStrategy,
    AttentionWeights,
    HostStore,
    RotaryEmbedding,
    SPGroup,
    Timeline,
    fpdt_attention,
    get_strategy,
)
from parallel.host_store import allocating_on_host

from ..core.memory import MemoryTracker

ROPE_BASE = 500000.0  # Llama 3's


class Block:
    """Weights, input ``x [B, S, H*d]`` and output gradient of one block, the host store its FPDT
    offload uses (:meth:`new_store` gives one configuration its own), and, with ``doc_len``, the
    packed documents' offsets every step attends within; ``n_kv_heads``: GQA's KV heads (default ``H``)."""

    def __init__(self, S: int, H: int, d: int, dtype: torch.dtype, device, batch: int = 1, seed: int = 0,
                 doc_len: int | None = None, n_kv_heads: int | None = None):  # fmt: skip
        torch.manual_seed(seed)
        # Packed documents of doc_len tokens (the last one shorter), the same in every row.
        self.cu_seqlens = None
        if doc_len is not None:
            row = list(range(0, S, doc_len))
            flat = [b * S + s for b in range(batch) for s in row] + [batch * S]
            self.cu_seqlens = torch.tensor(flat, dtype=torch.int32, device=device)
        h = H * d
        self.w = AttentionWeights.random(h, H, n_kv_heads or H, d, dtype=dtype, device=device)
        self.rope = RotaryEmbedding(d, ROPE_BASE)
        self.x = torch.randn(batch, S, h, dtype=dtype, device=device, requires_grad=True)
        self.dy = torch.randn(batch, S, h, dtype=dtype, device=device)
        self.store = HostStore()

    def new_store(self) -> HostStore:
        self.store = HostStore()
        return self.store

    def step(self, strategy: str, chunks: int = 1, offload: bool = True, timeline: Timeline | None = None,
             backward_order: str = "auto") -> None:  # fmt: skip
        """One forward + backward of a registered strategy's block on one rank (``ulysses``: the
        whole-sequence block; ``fpdt``: its chunk pipeline, whose ops ``timeline`` records, with
        its backward's outer loop ``backward_order``)."""
        spec = get_strategy(strategy)
        if spec.takes_chunks:
            y = fpdt_attention(self.x, self.w, self.rope, group=SPGroup.single(), chunks=chunks, offload=offload,
                               store=self.store, timeline=timeline, cu_seqlens=self.cu_seqlens,
                               backward_order=backward_order)  # fmt: skip
        else:
            degree = 1 if spec.uses_ulysses_degree else None
            y = AttentionStrategy(spec.name, ulysses_degree=degree)(self.x, self.w, self.rope, self.cu_seqlens)
        y.backward(self.dy)
        self.x.grad = None
        for p in self.w.parameters():
            p.grad = None

    def tracker(self, cap_bytes: int | None = None) -> MemoryTracker:
        """Live tensor bytes of the steps run inside it, on the simulated device (CPU): the block's
        input, output gradient and weights, which exist before the step, and the host store's
        buffers (host memory) are not counted."""
        return MemoryTracker(on_host=allocating_on_host, exclude=self.store.owns, cap_bytes=cap_bytes,
                             ignore=[self.x, self.dy, *self.w.parameters()])  # fmt: skip
