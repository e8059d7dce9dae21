"""Ulysses all-to-alls on ``all_to_all_single`` (gloo and NCCL), as autograd functions.

``seq_to_head``: ``[B, S/P, H, d] -> [B, S, H/P, d]`` (scatter heads, gather the sequence in
rank order); ``head_to_seq`` is its inverse, and each is the other's backward.

GQA: with ``Hkv % P == 0`` the key/value heads are sharded like the query heads. With
``P % Hkv == 0`` (fewer KV heads than ranks) each KV head is replicated ``P/Hkv`` times so that
rank ``r`` receives the KV head its query heads use; the backward sums the replicas.

The ``*_into`` functions move the same bits through send/receive buffers the caller owns and
write into the caller's output, so an all-to-all on a side stream allocates nothing (see
:class:`parallel.executor.DeviceBuffers`). ``send`` and ``recv`` are flat, contiguous, of the
data's dtype, with at least as many elements as the tensor exchanged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .distributed import SPGroup, divisors


def check_heads(n_heads: int, n_kv_heads: int, world: int) -> None:
    """Raise ``ValueError`` unless ``H`` query and ``Hkv`` KV heads can be split over ``P`` ranks."""
    if world < 1:
        raise ValueError(f"P={world} sequence-parallel ranks must be >= 1")
    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"H={n_heads} query heads must be a positive multiple of Hkv={n_kv_heads} KV heads")
    if n_heads % world:
        raise ValueError(
            f"H={n_heads} query heads are not divisible by P={world} sequence-parallel ranks; "
            f"use P in {divisors(n_heads)}"
        )
    if n_kv_heads % world and world % n_kv_heads:
        ok = [p for p in divisors(n_heads) if n_kv_heads % p == 0 or p % n_kv_heads == 0]
        raise ValueError(
            f"Hkv={n_kv_heads} KV heads cannot be split over P={world} ranks: need Hkv % P == 0 "
            f"(shard) or P % Hkv == 0 (replicate); with H={n_heads}, Hkv={n_kv_heads} use P in {ok}"
        )


def kv_heads_per_rank(n_kv_heads: int, world: int) -> int:
    """KV heads each rank holds after the all-to-all (1 when KV heads are replicated)."""
    return n_kv_heads // world if n_kv_heads % world == 0 else 1


def _exchange(send: torch.Tensor, group: SPGroup) -> torch.Tensor:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)
    return recv


def _seq_to_head(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    P = group.size
    if P == 1:
        return x
    B, s, H, d = x.shape
    # [B, s, H, d] -> [P, B, s, H/P, d]: slot p carries head slice p to rank p.
    send = x.reshape(B, s, P, H // P, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = _exchange(send, group)  # slot p: rank p's tokens, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(B, P * s, H // P, d)  # [B, S, H/P, d]


def _head_to_seq(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    P = group.size
    if P == 1:
        return x
    B, S, h, d = x.shape
    s = S // P
    # [B, S, h, d] -> [P, B, s, h, d]: slot p carries rank p's tokens back to it.
    send = x.reshape(B, P, s, h, d).transpose(0, 1).contiguous()
    recv = _exchange(send, group)  # slot p: my tokens, rank p's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, s, P * h, d)  # [B, S/P, H, d]


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _head_to_seq(dy, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _seq_to_head(dy, ctx.group), None


def seq_to_head(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    """``[B, S/P, H, d] -> [B, S, H/P, d]``; differentiable. Needs ``H % P == 0``."""
    if x.shape[2] % group.size:
        raise ValueError(f"{x.shape[2]} heads are not divisible by P={group.size}")
    return _SeqToHead.apply(x, group)


def head_to_seq(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    """``[B, S, H/P, d] -> [B, S/P, H, d]``; differentiable. Needs ``S % P == 0``."""
    if x.shape[1] % group.size:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by P={group.size}")
    return _HeadToSeq.apply(x, group)


def kv_seq_to_head(x: torch.Tensor, group: SPGroup) -> torch.Tensor:
    """Keys/values ``[B, S/P, Hkv, d] -> [B, S, Hkv', d]``, replicating heads when ``P % Hkv == 0``.

    ``Hkv' = kv_heads_per_rank(Hkv, P)``. Differentiable: the backward sums the replicas.
    """
    P, n_kv = group.size, x.shape[2]
    if n_kv % P == 0:
        return seq_to_head(x, group)
    if P % n_kv:
        raise ValueError(f"Hkv={n_kv} KV heads: need Hkv % P == 0 or P % Hkv == 0 (P={P})")
    return seq_to_head(x.repeat_interleave(P // n_kv, dim=2), group)


def _flat(buf: torch.Tensor, shape) -> torch.Tensor:
    return buf[: math.prod(shape)].view(shape)


def seq_to_head_into(x: torch.Tensor, out: torch.Tensor, group: SPGroup, send, recv) -> None:
    """:func:`seq_to_head` without allocating: ``x [B, s, H, d]`` -> ``out [B, P*s, H/P, d]``."""
    P = group.size
    if P == 1:
        out.copy_(x)
        return
    B, s, H, d = x.shape
    shape = (P, B, s, H // P, d)
    snd, rcv = _flat(send, shape), _flat(recv, shape)
    snd.copy_(x.view(B, s, P, H // P, d).permute(2, 0, 1, 3, 4))  # slot p: head slice p, for rank p
    dist.all_to_all_single(rcv, snd, group=group.group)  # slot p: rank p's tokens, my heads
    out.view(B, P, s, H // P, d).copy_(rcv.transpose(0, 1))


def kv_seq_to_head_into(x: torch.Tensor, out: torch.Tensor, group: SPGroup, send, recv) -> None:
    """:func:`kv_seq_to_head` without allocating: ``out [B, P*s, Hkv', d]``."""
    P, n_kv = group.size, x.shape[2]
    if n_kv % P == 0:
        seq_to_head_into(x, out, group, send, recv)
        return
    B, s, _, d = x.shape
    r = P // n_kv  # replicas of each KV head: slot p carries head p // r
    snd = _flat(send, (n_kv, r, B, s, 1, d))
    snd.copy_(x.permute(2, 0, 1, 3)[:, None, :, :, None, :].expand(n_kv, r, B, s, 1, d))
    rcv = _flat(recv, (P, B, s, 1, d))
    dist.all_to_all_single(rcv, snd.view(P, B, s, 1, d), group=group.group)
    out.view(B, P, s, 1, d).copy_(rcv.transpose(0, 1))


def head_to_seq_into(x: torch.Tensor, out: torch.Tensor, group: SPGroup, send, recv) -> None:
    """:func:`head_to_seq` without allocating: ``x [B, S, h, d]`` -> ``out [B, S/P, P*h, d]``.

    ``send``/``recv`` have ``out``'s dtype; ``x`` may have another (an fp32 gradient): it is cast
    on its way into ``send``, as ``x.to(out.dtype)`` would.
    """
    P = group.size
    if P == 1:
        out.copy_(x)
        return
    B, S, h, d = x.shape
    shape = (P, B, S // P, h, d)
    snd, rcv = _flat(send, shape), _flat(recv, shape)
    snd.copy_(x.view(B, P, S // P, h, d).transpose(0, 1))  # slot p: rank p's tokens, my heads
    dist.all_to_all_single(rcv, snd, group=group.group)  # slot p: my tokens, rank p's heads
    out.view(B, S // P, P, h, d).copy_(rcv.permute(1, 2, 0, 3, 4))


def kv_head_to_seq_grad_into(
    dx: torch.Tensor, out: torch.Tensor, group: SPGroup, n_kv_heads: int, send, recv, gathered
) -> None:
    """:func:`kv_head_to_seq_grad` without allocating; ``gathered`` is flat, of ``out``'s dtype,
    with ``dx.numel()`` elements (the replicas before their sum; unused when heads are sharded)."""
    P = group.size
    if n_kv_heads % P == 0:
        head_to_seq_into(dx, out, group, send, recv)
        return
    B, S, _, d = dx.shape
    g = _flat(gathered, (B, S // P, P, d))  # contiguous, as head_to_seq returns it: same sum order
    head_to_seq_into(dx, g.view(B, S // P, P, d), group, send, recv)
    torch.sum(g.view(B, S // P, n_kv_heads, P // n_kv_heads, d), dim=3, out=out)


def kv_head_to_seq_grad(dx: torch.Tensor, group: SPGroup, n_kv_heads: int) -> torch.Tensor:
    """Backward of :func:`kv_seq_to_head` without autograd: ``[B, S, Hkv', d] -> [B, S/P, Hkv, d]``."""
    g = _head_to_seq(dx, group)
    P = group.size
    if n_kv_heads % P == 0:
        return g
    B, s, _, d = g.shape
    return g.reshape(B, s, n_kv_heads, P // n_kv_heads, d).sum(3)
