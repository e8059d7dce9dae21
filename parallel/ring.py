"""Ring attention and USP (Ulysses x ring) attention blocks, over the zigzag token layout.

Ring attention keeps every rank's queries in place and passes the key/value blocks around a
ring of ``R`` ranks: after ``R`` steps each rank has attended to every block. Unlike Ulysses the
head count does not bound ``R``, and no rank ever holds the whole sequence: at any time a rank
holds its own ``S/R`` tokens plus two received K/V blocks (the one it computes on and the one
arriving; one when ``R == 2``), and in the backward also one fp32 dK/dV block (two while it
hops to the next rank). Sending the next K/V block is posted before the current block's
compute, so that communication overlaps compute; the dK/dV hop does not (see
:class:`_RingAttention`).

Zigzag layout (:func:`ring_permutation`): the sequence is cut into ``2R`` pieces of
``c = S/(2R)`` tokens and ring position ``j`` holds pieces ``j`` and ``2R-1-j``, its "ring-local
sequence" of ``S/R`` tokens. Under a causal mask every rank then has the same work at every
step (a contiguous split would leave rank 0 idle for ``R-1`` of its ``R`` steps). Example,
``S=16, R=2``: ring rank 0 holds tokens ``0-3, 12-15``, ring rank 1 holds ``4-7, 8-11``.

USP (:func:`usp_attention`, "unified sequence parallelism"): ``P = U * R`` ranks, ``U``
consecutive ranks form a Ulysses group and the ``R`` ranks with the same Ulysses index form a
ring. Rank ``j*U + i`` holds slice ``i`` of ring position ``j``'s ring-local sequence; the
Ulysses all-to-all gives each rank of the group the whole ring-local sequence with ``H/U``
heads, and the ring runs over those heads. ``U`` is bounded by the heads, ``R`` is not.

    ulysses, ring = split_sp_group(group, ulysses=2)       # every rank calls it
    x_local = ring_shard(x, ring.size, ulysses.size, group.rank)
    y_local = usp_attention(x_local, weights, rope, ulysses=ulysses, ring=ring)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import fpdt_kernels

from .all_to_all import check_heads, head_to_seq, kv_seq_to_head, seq_to_head
from .amp import restore_autocast
from .distributed import SPGroup, check_ulysses_degree
from .layout import check_cu_seqlens, document_positions
from .rotary import RotaryEmbedding, apply_rotary
from .schedule import document_pairs
from .weights import AttentionWeights, check_block_input, project_out, project_qkv

# --------------------------------------------------------------------------------------------
# Zigzag layout


def check_ring_layout(seq_len: int, ring: int, ulysses: int = 1) -> None:
    """Raise ``ValueError`` unless ``seq_len`` tokens fit the zigzag layout of ``ring`` ring
    positions, each split over ``ulysses`` ranks: ``seq_len`` must be a multiple of
    ``2 * ring * ulysses`` (``2 * ring`` equal pieces, each rank's share equal)."""
    if ring < 1 or ulysses < 1:
        raise ValueError(f"ring={ring} and ulysses={ulysses} must both be >= 1")
    n = 2 * ring * ulysses
    if seq_len < 1 or seq_len % n:
        raise ValueError(
            f"seq_len={seq_len} does not fit the zigzag layout of ring={ring} x ulysses={ulysses}: it must be "
            f"divisible by 2*ring*ulysses={n}; use a multiple of {n}"
        )


def ring_permutation(seq_len: int, ring: int, ulysses: int = 1) -> torch.Tensor:
    """Global token index of every position in rank-major order (as :func:`parallel.layout.permutation`):
    ``x[:, perm]`` is the concatenation of the ranks' local sequences, rank 0 first. ``[S]`` int64.

    Ring position ``j`` holds pieces ``j`` and ``2R-1-j`` of ``S/(2R)`` tokens. ``ulysses`` only
    cuts each ring-local sequence into ``U`` contiguous slices (rank ``j*U + i`` holds slice
    ``i``), so the rank-major order itself does not depend on it; it is validated here all the
    same, so that ``S/P`` is what every rank holds.
    """
    check_ring_layout(seq_len, ring, ulysses)
    c = seq_len // (2 * ring)
    j = torch.arange(ring)
    pieces = torch.stack([j, 2 * ring - 1 - j], dim=1).reshape(-1)  # ring position j: pieces j, 2R-1-j
    return torch.arange(seq_len).view(2 * ring, c)[pieces].reshape(-1)


def ring_positions(seq_len: int, ring: int, ulysses: int, rank: int) -> torch.Tensor:
    """Global positions of sequence-parallel rank ``rank``'s ``S/(R*U)`` tokens, in local order."""
    world = ring * ulysses
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside 0..{world - 1} (ring={ring} x ulysses={ulysses})")
    n = seq_len // world
    return ring_permutation(seq_len, ring, ulysses)[rank * n : (rank + 1) * n]


def ring_shard(x: torch.Tensor, ring: int, ulysses: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s local part of a full-length tensor (tokens along ``dim``) in the zigzag layout."""
    pos = ring_positions(x.shape[dim], ring, ulysses, rank).to(x.device)
    return x.index_select(dim, pos)


# --------------------------------------------------------------------------------------------
# Ring attention core


def _step_blocks(rank: int, src: int, R: int, c: int, causal: bool, pairs, fold: bool = True):
    """The kernel calls of one ring step: this rank's query pieces against ring rank ``src``'s
    K/V pieces, as ``(query rows, q_start, key rows, k_start, causal)`` on the local tensors.

    With ``fold`` and without packed documents, the blocks of a step with another rank's K/V are
    wholly visible or wholly hidden under a causal mask, so they fold into one non-causal call:
    with ``src < rank`` both query pieces see key piece ``src`` (and not ``2R-1-src``), with
    ``src > rank`` query piece ``2R-1-rank`` sees both key pieces (and piece ``rank`` sees
    neither). Otherwise each visible one of the 2 x 2 piece pairs is a call at its global starts
    (what a kernel allocates per call is then bounded by one pair of pieces).
    """
    halves, whole = (slice(0, c), slice(c, 2 * c)), slice(0, 2 * c)
    if pairs is None and fold:
        if not causal:
            return [(whole, 0, whole, 0, False)]
        if src < rank:
            return [(whole, 0, halves[0], 0, False)]
        if src > rank:
            return [(halves[1], 0, whole, 0, False)]
    q_pieces, k_pieces = (rank, 2 * R - 1 - rank), (src, 2 * R - 1 - src)
    calls = []
    for a, i in enumerate(q_pieces):
        for b, j in enumerate(k_pieces):
            if causal and j > i:  # the whole key piece comes after the whole query piece
                continue
            if pairs is not None and (i, j) not in pairs:  # no row has a document in both pieces
                continue
            calls.append((halves[a], i * c, halves[b], j * c, causal))
    return calls


class _Ring:
    """Point-to-point shifts around the ring: send to ring rank ``rank+1``, receive from ``rank-1``."""

    def __init__(self, group: SPGroup):
        R, pg = group.size, group.group
        # P2POp takes peers as global ranks.
        self.pg = pg
        self.next = dist.get_global_rank(pg, (group.rank + 1) % R)
        self.prev = dist.get_global_rank(pg, (group.rank - 1) % R)

    def shift(self, sends, recvs, tags) -> list:
        """Post (not wait for) sending ``sends`` onward and receiving ``recvs``; tensors contiguous.
        Every rank posts its shifts in the same order, which is how NCCL (which has no tags)
        matches them; the tags keep gloo's matching explicit."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.pg, tag) for t, tag in zip(sends, tags, strict=True)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.pg, tag) for t, tag in zip(recvs, tags, strict=True)]
        return dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    """Wait for posted shifts and empty ``works``: a finished work still holds its tensors, so
    a buffer dropped after the wait would otherwise stay allocated."""
    for w in works:
        w.wait()
    works.clear()


_K, _V, _DKV = 0, 1, 2  # message tags


class _RingAttention(torch.autograd.Function):
    """Ring attention of one rank's zigzag pieces; see :func:`ring_attention_core`.

    Saved for the backward: the local ``q, k, v``, the merged output in the input dtype (the
    very tensor returned, so saving it costs no memory; the backward's ``delta = rowsum(do*out)``
    then uses the output the loss saw, as flash-attn does) and the fp32 LSE. Received K/V blocks
    are never saved: the backward passes them around the ring again.

    Beside those and the incoming dO, the backward holds dQ (fp32), at most two K/V blocks (the
    one computed on and the one arriving) and one fp32 dK/dV block, two while it hops.
    """

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, cu_seqlens, seq_len):
        R, rank = group.size, group.rank
        B, n, H, d = q.shape
        c = n // 2
        pairs = None if cu_seqlens is None else document_pairs(cu_seqlens, B, seq_len, 2 * R)
        # The kernels compute in the inputs' dtype with fp32 accumulators: autocast must not
        # recast anything in between (the bf16 q/k/v came from autocast's projection).
        with restore_autocast(None, q.device):
            out = torch.zeros(B, n, H, d, dtype=torch.float32, device=q.device)
            lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32, device=q.device)
            ring = _Ring(group) if R > 1 else None
            cur, spare = (k, v), []
            for t in range(R):
                src = (rank - t) % R  # ring rank whose K/V this rank holds at step t
                works, nxt = [], None
                if t < R - 1:  # post the shift first: it runs while this block is computed
                    nxt = spare.pop() if spare else (torch.empty_like(k), torch.empty_like(v))
                    works = ring.shift(cur, nxt, (_K, _V))
                for qs, q0, ks, k0, blk_causal in _step_blocks(rank, src, R, c, causal, pairs):
                    fpdt_kernels.attention_chunk_forward(
                        q[:, qs], cur[0][:, ks], cur[1][:, ks], q_start=q0, k_start=k0, causal=blk_causal,
                        softmax_scale=scale, out=out[:, qs], lse=lse[:, :, qs], cu_seqlens=cu_seqlens,
                    )  # fmt: skip
                _wait(works)  # the send of `cur` is done too: its buffer may be received into again
                if nxt is not None:
                    if cur[0] is not k:  # never receive into this rank's own k, v (saved below)
                        spare.append(cur)
                    cur = nxt
            o = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.cu_seqlens, ctx.pairs = group, causal, scale, cu_seqlens, pairs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        group, causal, scale, cu, pairs = ctx.group, ctx.causal, ctx.scale, ctx.cu_seqlens, ctx.pairs
        R, rank = group.size, group.rank
        B, n, H, d = q.shape
        c = n // 2
        f32 = dict(dtype=torch.float32, device=q.device)
        with restore_autocast(None, q.device):
            do = do.to(q.dtype)
            delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, n], once for all steps
            dq = torch.zeros(q.shape, **f32)
            ring = _Ring(group) if R > 1 else None
            # dK/dV of the held block travel with it: the partial sums of the ranks that held it
            # before arrive in `dkv`, this rank's kernels add its part in place, and the total is
            # sent on; after step R-1 that hop brings each block's finished dK/dV home. The hop is
            # awaited before the step's kernels run, so it is not overlapped with compute: that
            # would take a third fp32 block (one accumulating while one leaves and one arrives).
            # Buffers are allocated when needed and dropped when done, so a received K/V block
            # is gone before the last hop's buffer exists (a caching allocator reuses the bytes).
            kv, dkv, sent, dkv_works = (k, v), torch.zeros(2, *k.shape, **f32), None, []
            for t in range(R):
                src = (rank - t) % R
                _wait(dkv_works)  # the held block's partial dK/dV is in `dkv`; `sent` has left
                sent = None  # freed before the next K/V block's buffers are allocated
                kv_works, kv_next = [], None
                if t < R - 1:  # post the shift before the compute: it runs while this block is computed
                    kv_next = (torch.empty_like(k), torch.empty_like(v))
                    kv_works = ring.shift(kv, kv_next, (_K, _V))
                # One call per pair of pieces: a backend that returns a call's dQ/dK/dV before adding
                # them (the CPU one) then holds one pair's, not a whole block's, beside `dkv`.
                for qs, q0, ks, k0, blk_causal in _step_blocks(rank, src, R, c, causal, pairs, fold=False):
                    fpdt_kernels.attention_chunk_backward(
                        do[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], o[:, qs], lse[:, :, qs], q_start=q0,
                        k_start=k0, causal=blk_causal, softmax_scale=scale, delta=delta[:, :, qs], dq=dq[:, qs],
                        dk=dkv[0][:, ks], dv=dkv[1][:, ks], cu_seqlens=cu,
                    )  # fmt: skip
                _wait(kv_works)  # the send of `kv` is done too: dropping it below frees a received block
                kv = kv_next
                if R > 1:
                    sent, dkv = dkv, torch.empty_like(dkv)
                    dkv_works = ring.shift((sent,), (dkv,), (_DKV,))
            _wait(dkv_works)  # this rank's finished dK/dV arrived
            sent = None  # freed before a low-precision cast below allocates
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: SPGroup,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seq_len: int,
) -> torch.Tensor:
    """Ring attention over ``group`` (``R`` ranks): this rank's ``q [B, S/R, H, d]``, ``k, v
    [B, S/R, Hkv, d]`` (projected, RoPE applied) in the zigzag ring-local order -> ``[B, S/R, H, d]``
    in the input dtype. Differentiable w.r.t. ``q, k, v``.

    ``seq_len``: the global ``S``; ``cu_seqlens``: packed documents of the whole ``[B, S]``
    sequence (int32 offsets, checked by the blocks); piece pairs sharing no document are skipped.
    GQA (``H % Hkv == 0``) is handled by the kernels. bf16/fp16 inputs are accumulated in fp32.
    Every rank of ``group`` must call it with the same shapes and settings.
    """
    R = group.size
    check_ring_layout(seq_len, R)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q must be [B, S/R, H, d] and k, v [B, S/R, Hkv, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if q.shape[1] * R != seq_len or k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"each of the R={R} ring ranks holds S/R={seq_len // R} tokens of q, k and v; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    if R == 1:
        # No ring (usp with U = sp, or ring on one rank): the zigzag of one position is the
        # sequence in order, so this is whole-sequence flash attention, as ulysses runs it: the
        # output in the input dtype, no fp32 merge buffers or dK/dV accumulators.
        from .strategies.common import attend  # the strategies sit above this module

        return attend(q, k, v, causal, softmax_scale, cu_seqlens)
    # Contiguous copies: the blocks are sent as they are (isend needs contiguous tensors), and a
    # q that is a view of the fused QKV projection would keep all of it alive once saved.
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _RingAttention.apply(q, k, v, group, bool(causal), softmax_scale, cu_seqlens, int(seq_len))


# --------------------------------------------------------------------------------------------
# Blocks


def _rotate_at(q, k, rope: RotaryEmbedding | None, positions: torch.Tensor, cu_seqlens, batch: int, seq_len: int):
    """RoPE on ``[B, n, heads, d]`` at global ``positions [n]`` or, for packed documents, at
    those tokens' positions inside their documents."""
    if rope is None:
        return q, k
    if cu_seqlens is not None:
        positions = document_positions(cu_seqlens, batch, seq_len)[:, positions.to(cu_seqlens.device)]
    cos, sin = rope.tables(positions.to(q.device))
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def ring_attention(
    x: torch.Tensor,
    w: AttentionWeights,
    rope: RotaryEmbedding | None = None,
    *,
    group: SPGroup,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ring attention block: ``[B, S/R, h]`` (this rank's zigzag pieces, :func:`ring_shard`) ->
    ``[B, S/R, h]``.

    ``cu_seqlens``: the packed documents of the whole ``[B, S]`` sequence (see
    :func:`parallel.attention.local_attention`).
    """
    check_block_input(x, w, rope)
    R = group.size
    B, n, _ = x.shape
    S = n * R
    check_ring_layout(S, R)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, S)
    q, k, v = project_qkv(x, w)  # [B, S/R, H, d], [B, S/R, Hkv, d]: views of the fused projection
    q, k = _rotate_at(q, k, rope, ring_positions(S, R, 1, group.rank), cu_seqlens, B, S)
    # The core's contiguous copies, made here: a view left in this frame would keep the whole
    # fused projection ([B, S/R, (H + 2Hkv) d]) alive while the ring runs.
    q, k, v = (t.contiguous() for t in (q, k, v))
    o = ring_attention_core(q, k, v, group, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                            seq_len=S)  # fmt: skip
    return project_out(o, w)


def _split_ranks(members: list[int], ulysses: int) -> tuple[list[list[int]], list[list[int]]]:
    """The global ranks of the Ulysses groups (``U`` consecutive members) and of the ring groups
    (the members with the same Ulysses index, in ring order) of one sequence-parallel group."""
    U = ulysses
    R = len(members) // U
    uly = [[members[j * U + i] for i in range(U)] for j in range(R)]
    rings = [[members[j * U + i] for j in range(R)] for i in range(U)]
    return uly, rings


def _all_sp_groups(members: list[int]) -> list[list[int]]:
    """Every sequence-parallel group of the world (each rank passes its own), in a fixed order.

    ``dist.new_group`` must be entered by every process of the world for every group, in the
    same order, even by processes outside it: with data parallelism each replica only knows its
    own group, so the groups are gathered first."""
    world = dist.get_world_size()
    if len(members) == world:
        return [members]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, members)
    groups = sorted({tuple(g) for g in gathered})
    covered = sorted(r for g in groups for r in g)
    if covered != list(range(world)) or any(len(g) != len(members) for g in groups):
        raise ValueError(f"the sequence-parallel groups {groups} do not split the {world} ranks into equal groups")
    return [list(g) for g in groups]


def split_sp_group(group: SPGroup, ulysses: int) -> tuple[SPGroup, SPGroup]:
    """Split a sequence-parallel group of ``P`` ranks into ``(ulysses, ring)`` groups for
    :func:`usp_attention`: the Ulysses group is ``U = ulysses`` consecutive ranks (its
    all-to-alls are the heavier traffic, so they stay within neighbours, e.g. a node), the ring
    group the ``R = P/U`` ranks with the same Ulysses index; rank ``j*U + i`` is Ulysses rank
    ``i`` and ring rank ``j``. A part of size 1 is :meth:`SPGroup.single`; a part that is the
    whole group reuses ``group``.

    Every rank of the world must call it at the same point (it creates process groups), each
    with its own sequence-parallel group; the groups' ranks must increase with their group rank,
    as :class:`~parallel.distributed.Mesh` makes them.
    """
    P = group.size
    check_ulysses_degree(P, ulysses)
    U, R = ulysses, P // ulysses
    if U == P:
        return group, SPGroup.single()
    if R == P:
        return SPGroup.single(), group
    members = [dist.get_global_rank(group.group, i) for i in range(P)]
    if members != sorted(members):
        # new_group orders a group's ranks by global rank: the ring order would not be the layout's.
        raise ValueError(f"the sequence-parallel group's global ranks {members} must increase with the group rank")
    me = members[group.rank]
    uly = ring = None
    for sp in _all_sp_groups(members):  # the same groups, in the same order, on every rank
        uly_ranks, ring_ranks = _split_ranks(sp, U)
        for is_uly, lists in ((True, uly_ranks), (False, ring_ranks)):
            for ranks in lists:
                pg = dist.new_group(ranks=ranks)
                if me in ranks:
                    part = SPGroup(pg, ranks.index(me), len(ranks))
                    uly, ring = (part, ring) if is_uly else (uly, part)
    return uly, ring


def usp_attention(
    x: torch.Tensor,
    w: AttentionWeights,
    rope: RotaryEmbedding | None = None,
    *,
    ulysses: SPGroup,
    ring: SPGroup,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """USP block (Ulysses inside, ring outside): ``[B, S/(U*R), h]`` in the
    ``ring_permutation(S, R, U)`` layout -> ``[B, S/(U*R), h]``.

    ``ulysses``, ``ring``: this rank's groups from :func:`split_sp_group`. The Ulysses
    all-to-all turns the ``U`` slices of ring position ``ring.rank`` into its whole ring-local
    sequence with ``H/U`` query heads (KV heads replicated when ``U > Hkv``, as Ulysses does),
    which then runs ring attention over ``ring``. ``cu_seqlens``: the packed documents of the
    whole ``[B, S]`` sequence.
    """
    U, R = ulysses.size, ring.size
    check_heads(w.n_heads, w.n_kv_heads, U)
    B, s, _ = x.shape
    S = s * U * R
    check_ring_layout(S, R, U)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, S)
    q, k, v = project_qkv(x, w)  # [B, S/P, H, d]
    q = seq_to_head(q, ulysses)  # -> [B, S/R, H/U, d]: the ring-local sequence, in order
    k, v = kv_seq_to_head(k, ulysses), kv_seq_to_head(v, ulysses)  # -> [B, S/R, Hkv', d]
    q, k = _rotate_at(q, k, rope, ring_positions(S, R, 1, ring.rank), cu_seqlens, B, S)
    o = ring_attention_core(q, k, v, ring, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                            seq_len=S)  # fmt: skip
    return project_out(head_to_seq(o, ulysses), w)  # [B, S/R, H/U, d] -> [B, S/P, H, d] -> [B, S/P, h]
