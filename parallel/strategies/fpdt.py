"""``fpdt``: the Fully Pipelined Distributed Transformer. Ulysses done chunk by chunk (``u``
chunks), each chunk's Q/K/V projected, exchanged and attended just in time, the saved chunks kept
in host memory (``offload``); the pipeline itself is :mod:`parallel.fpdt`."""

from __future__ import annotations

import contextlib

import torch

from ..all_to_all import check_heads
from ..distributed import SPGroup
from ..executor import Timeline
from ..fpdt import FPDTSpec, fpdt_attention_core
from ..host_store import HostStore, default_host_store, saved_tensors_on_host
from ..layout import check_cu_seqlens, check_layout, permutation
from ..rotary import RotaryEmbedding
from ..tensors import eager_under_compile
from ..weights import AttentionWeights, check_block_input, project_out
from .base import Strategy, register


# torch.compile leaves the pipeline to run as it is (a graph break around it): its streams, host
# copies and schedules are Python that Dynamo cannot capture; the rest of a block still compiles.
@eager_under_compile
def fpdt_attention(
    x: torch.Tensor,
    w: AttentionWeights,
    rope: RotaryEmbedding | None = None,
    *,
    group: SPGroup,
    chunks: int,
    causal: bool = True,
    offload: bool = True,
    softmax_scale: float | None = None,
    store: HostStore | None = None,
    timeline: Timeline | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backward_order: str = "auto",
) -> torch.Tensor:
    """FPDT block: ``[B, S/P, h]`` in the FPDT layout (``chunks`` chunks) -> ``[B, S/P, h]``.

    ``offload``: keep saved chunks in the host store (``store``, default the process-wide one);
    ``timeline``: record every op's start/end; ``cu_seqlens``: the packed documents of the whole
    ``[B, S]`` sequence (see ``local_attention``): the schedules then omit every chunk block
    whose chunks share no document. ``backward_order``: the backward's outer loop, ``"kv"`` (the
    paper's), ``"query"``, or ``"auto"``, the one that moves fewer bytes between host and device
    (with offload and GQA usually ``"query"``, whose KV chunks and their gradients are the smaller
    side; ``"kv"`` at two causal chunks, where the query order fetches one more ``x`` chunk).
    """
    check_block_input(x, w, rope)
    if not isinstance(group, SPGroup):
        got = type(group).__name__
        raise TypeError(f"group must be a parallel.SPGroup (SPGroup.single() for one process), got {got}")
    if store is not None and not isinstance(store, HostStore):
        got = type(store).__name__
        raise TypeError(f"store must be a parallel.HostStore or None (the process-wide one), got {got}")
    check_heads(w.n_heads, w.n_kv_heads, group.size)
    check_layout(x.shape[1] * group.size, group.size, chunks)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1] * group.size)
    if offload and store is None:
        store = default_host_store()
    spec = FPDTSpec(
        group=group,
        chunks=chunks,
        n_heads=w.n_heads,
        n_kv_heads=w.n_kv_heads,
        head_dim=w.head_dim,
        causal=causal,
        offload=offload,
        rope=rope,
        softmax_scale=softmax_scale,
        store=store,
        timeline=timeline,
        cu_seqlens=cu_seqlens,
        backward_order=backward_order,
    )
    o = fpdt_attention_core(x, w.wqkv, w.bqkv, spec)  # [B, S/P, H, d]
    # With offload, what the output projection saves for its weight gradient (the sequence-long
    # attention output) waits in host memory too, as the chunks do: the device keeps no
    # sequence-long tensor of the block.
    with saved_tensors_on_host(store, only=o) if offload else contextlib.nullcontext():
        return project_out(o, w)


@register
class FPDT(Strategy):
    name = "fpdt"
    summary = "Ulysses chunk by chunk (u chunks) with the saved chunks in host memory"
    use_when = "the sequence's attention state does not fit the GPU under ulysses; P <= the KV heads"
    color = "#d62728"
    takes_chunks = True
    offloads = True

    def permutation(self, seq_len, sp, chunks, ulysses_degree=None) -> torch.Tensor:
        return permutation(seq_len, sp, chunks)

    def attend(self, strategy, x, w, rope, cu_seqlens):
        return fpdt_attention(
            x,
            w,
            rope,
            group=strategy.group,
            chunks=strategy.chunks,
            causal=strategy.causal,
            offload=strategy.offload,
            softmax_scale=strategy.softmax_scale,
            store=strategy.store,
            cu_seqlens=cu_seqlens,
            backward_order=strategy.backward_order,
        )
