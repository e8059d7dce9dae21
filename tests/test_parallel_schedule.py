"""Invariants of the FPDT chunk-pipeline schedules for u up to 16."""

import pytest
import torch

from parallel import Kind, ScheduleError, Stream, backward_schedule, check_schedule, document_pairs, forward_schedule

U = [1, 2, 3, 4, 7, 8, 16]


@pytest.mark.parametrize("u", U)
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "on-device"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("save", [True, False], ids=["save", "nograd"])
def test_forward_invariants(u, offload, causal, save):
    s = forward_schedule(u, causal=causal, offload=offload, save=save)
    peak = check_schedule(s)
    blocks = s.blocks()
    assert len(blocks) == (u * (u + 1) // 2 if causal else u * u)
    assert len(set(blocks)) == len(blocks)
    counts = s.counts()
    assert counts[Kind.PROJECT] == counts[Kind.A2A_QKV] == counts[Kind.A2A_OUT] == u
    if offload:
        # Double buffering: resident KV/Q chunks do not grow with u.
        assert peak["kv"] <= 4 and peak["q"] <= 2 and peak["o"] <= 1
    else:
        assert counts[Kind.FETCH] == counts[Kind.OFFLOAD] == 0
    if causal and u > 1:
        # chunk i+1's all-to-all is issued before chunk i's first block (overlap).
        order = [(op.kind, op.chunk) for op in s.ops]
        for i in range(u - 1):
            assert order.index((Kind.A2A_QKV, (i + 1,))) < order.index((Kind.ATTN_FWD, (i, 0)))


@pytest.mark.parametrize("u", U)
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "on-device"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("order", ["kv", "query"])
def test_backward_invariants(u, offload, causal, order):
    s = backward_schedule(u, causal=causal, offload=offload, order=order)
    peak = check_schedule(s)
    assert len(s.blocks()) == (u * (u + 1) // 2 if causal else u * u)
    counts = s.counts()
    assert counts[Kind.A2A_DO] == counts[Kind.A2A_DQ] == counts[Kind.A2A_DKV] == u
    assert counts[Kind.PROJ_BWD_Q] == counts[Kind.PROJ_BWD_KV] == u
    # The side whose chunks change every block ("inner") and the side fixed for an outer step.
    inner, outer = (("q", "o", "do", "dq"), ("kv", "dkv")) if order == "kv" else (("kv", "dkv"), ("q", "o", "do", "dq"))
    if offload:
        for fam in inner:
            assert peak[fam] <= 2, (fam, peak)
        for fam in outer:
            assert peak[fam] == 1, (fam, peak)
        assert peak["dqloc"] <= 1 and peak["dkvloc"] <= 1
        # The inner accumulator goes back to the host after every outer step but its last, except
        # where the next outer step starts on the same inner chunk (causal: one such step).
        acc = "dq" if order == "kv" else "dkv"
        moved = sum(1 for op in s.ops if op.kind == Kind.OFFLOAD and op.buffer.startswith(acc + "["))
        stays = 1 if causal and u > 1 else 0
        assert moved == (u * (u - 1) // 2 if causal else u * (u - 1)) - stays
        # Only the KV-outer order reads an output gradient in several outer steps: only it offloads
        # one (causal at u = 2, the one it reads twice stays on the device between its two blocks).
        offloads_do = any(op.kind == Kind.OFFLOAD and op.buffer.startswith("do[") for op in s.ops)
        assert offloads_do == (order == "kv" and u > (2 if causal else 1))
    if causal:
        # The outer chunk's own gradient is complete at the end of its outer step: its all-to-all
        # comes before any block of the next outer step.
        first = Kind.A2A_DQ if order == "query" else Kind.A2A_DKV
        ops = [(op.kind, op.chunk) for op in s.ops]
        nxt = [ops.index((Kind.ATTN_BWD, b)) for b in s.blocks()]
        for i in range(u - 1):
            next_outer = (i + 1, i + 1) if order == "kv" else (0, i + 1)
            assert ops.index((first, (i,))) < ops.index((Kind.ATTN_BWD, next_outer)), nxt
        if order == "kv":  # dq[i] is complete after block (i, i)
            for i in range(u - 1):
                assert ops.index((Kind.A2A_DQ, (i,))) < ops.index((Kind.ATTN_BWD, (i + 1, i + 1)))


@pytest.mark.parametrize("u", [2, 3, 4, 8])
def test_backward_round_trip_of_the_shared_inner_chunk_is_skipped(u):
    # Causal: the last block of one outer step and the first of the next read the same inner
    # chunk once per pass; no block waits for a copy of what was on the device a block ago.
    for order, (acc, block_before, block_after) in {
        "kv": ("dq", (u - 2, u - 1), (u - 1, u - 1)),
        "query": ("dkv", (0, 0), (0, 1)),
    }.items():
        s = backward_schedule(u, order=order)
        ops = [(op.kind, op.chunk) for op in s.ops]
        lo, hi = ops.index((Kind.ATTN_BWD, block_before)), ops.index((Kind.ATTN_BWD, block_after))
        k = block_before[1] if order == "kv" else block_before[0]
        copies = [op for op in s.ops[lo:hi] if op.kind in (Kind.FETCH, Kind.OFFLOAD) and op.buffer == f"{acc}[{k}]"]
        assert not copies, (order, copies)


def test_query_outer_order_moves_fewer_bytes_for_gqa():
    # llama3.2-1b's shapes on one rank, C=16K, bf16 chunks: 32 query heads, 8 KV heads, d=64.
    from parallel import cheaper_backward_order, copy_counts

    q = 16384 * 32 * 64 * 2
    sizes = dict(x=16384 * 2048 * 2, q=q, o=q + 16384 * 32 * 4, do=q, dq=2 * q, kv=q // 2, dkv=q)
    for u, fewer in ((4, 1.75), (16, 2.45)):  # towards 14/5 = 2.8 per block as u grows
        moved = {}
        for order in ("kv", "query"):
            counts = copy_counts(backward_schedule(u, order=order))
            moved[order] = sum(n * sizes[f] for f, n in counts.items())
        assert moved["kv"] / moved["query"] > fewer, (u, moved)
    assert cheaper_backward_order(4, sizes) == "query"
    # Multi-head attention: the KV side is the larger one (two fp32 gradients), kv order wins.
    mha = dict(sizes, kv=2 * q, dkv=4 * q)
    assert cheaper_backward_order(4, mha) == "kv"
    with pytest.raises(ValueError, match="backward order 'q'"):
        backward_schedule(4, order="q")


def test_outputs_are_what_the_caller_reads():
    assert forward_schedule(3, save=False).outputs == {"out[0]", "out[1]", "out[2]"}
    assert backward_schedule(2).outputs == {"dx[0]", "dx[1]", "dw"}
    s = forward_schedule(2)
    s.outputs = s.outputs | {"out[2]"}
    with pytest.raises(ScheduleError, match=r"does not produce \['out\[2\]'\]"):
        check_schedule(s)


def test_nograd_forward_offloads_only_kv_that_later_chunks_need():
    for u in (1, 2, 5):
        s = forward_schedule(u, causal=True, offload=True, save=False)
        moved = [op.buffer for op in s.ops if op.kind == Kind.OFFLOAD]
        assert moved == [f"kv[{i}]" for i in range(u - 1)]
    assert not [op for op in forward_schedule(4, offload=False, save=False).ops if op.kind == Kind.OFFLOAD]


def test_streams_and_printing():
    s = forward_schedule(3)
    assert {op.stream for op in s.ops if op.kind == Kind.FETCH} == {Stream.H2D}
    assert {op.stream for op in s.ops if op.kind == Kind.OFFLOAD} == {Stream.D2H}
    assert {op.stream for op in s.ops if op.kind.value.startswith("a2a")} == {Stream.COMM}
    text = str(s)
    assert text.splitlines()[0].startswith("forward schedule: u=3 causal=True offload=True save=True")
    assert "attn_fwd[2, 1]" in text and "fetch kv[0]" in text


def _tamper(s, index, **changes):
    s.ops[index] = s.ops[index]._replace(**changes)
    return s


def test_checker_catches_broken_schedules():
    s = forward_schedule(3)
    fetch = next(op for op in s.ops if op.kind == Kind.FETCH)
    # A block that no longer waits for its fetch.
    user = next(op for op in s.ops if fetch.buffer in op.reads and op.index > fetch.index)
    deps = tuple(d for d in user.deps if d != fetch.index)
    with pytest.raises(ScheduleError, match="without waiting for its writer"):
        check_schedule(_tamper(forward_schedule(3), user.index, deps=deps))
    # A fetch removed: its chunk is read while not resident.
    s = forward_schedule(3)
    del s.ops[fetch.index]
    s.ops = [op._replace(index=k) for k, op in enumerate(s.ops)]
    with pytest.raises(ScheduleError):
        check_schedule(s)
    # A free moved before a reader: used after its buffer is released.
    s = forward_schedule(3)
    free = next(op for op in s.ops if op.kind == Kind.FREE and op.buffer.startswith("kv["))
    with pytest.raises(ScheduleError):
        check_schedule(_tamper(s, free.index, deps=()))
    # A duplicated block.
    s = backward_schedule(2)
    blk = next(op for op in s.ops if op.kind == Kind.ATTN_BWD and op.chunk == (0, 1))
    with pytest.raises(ScheduleError, match="blocks"):
        check_schedule(_tamper(s, blk.index, chunk=(0, 0)))
    # An op on the wrong stream.
    s = forward_schedule(2)
    with pytest.raises(ScheduleError, match="runs on"):
        check_schedule(_tamper(s, fetch.index, stream=Stream.COMPUTE))


def _random_documents(seed, batch, seq_len):
    g = torch.Generator().manual_seed(seed)
    starts = {0}
    for row in range(batch):
        starts.add(row * seq_len)
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
            starts.add(row * seq_len + int(torch.randint(1, seq_len, (1,), generator=g)))
    return torch.tensor(sorted(starts) + [batch * seq_len], dtype=torch.int32)


def test_document_pairs_of_a_known_packing():
    # S=16, u=4 (C=4): documents [0, 6), [6, 7), [7, 16): chunk 0 meets chunk 1; chunk 1 meets 2 and 3.
    pairs = document_pairs(torch.tensor([0, 6, 7, 16], dtype=torch.int32), 1, 16, 4)
    assert pairs == {(0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (1, 0), (1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)}
    # One document per chunk: only the diagonal; one document in all: every block.
    assert document_pairs(torch.tensor([0, 4, 8, 12, 16], dtype=torch.int32), 1, 16, 4) == {(i, i) for i in range(4)}
    assert len(document_pairs(torch.tensor([0, 16], dtype=torch.int32), 1, 16, 4)) == 16


@pytest.mark.parametrize("seed", range(12))
def test_document_schedules_keep_the_invariants_and_drop_the_rest(seed):
    batch, seq_len, u = 1 + seed % 2, 64, 4 + seed % 3
    seq_len = u * 16
    pairs = document_pairs(_random_documents(seed, batch, seq_len), batch, seq_len, u)
    for causal in (True, False):
        for offload in (True, False):
            full_fwd = forward_schedule(u, causal=causal, offload=offload)
            fwd = forward_schedule(u, causal=causal, offload=offload, pairs=pairs)
            check_schedule(fwd)
            check_schedule(forward_schedule(u, causal=causal, offload=offload, save=False, pairs=pairs))
            assert set(fwd.blocks()) == {(i, j) for i, j in pairs if j <= i or not causal}
            assert len(fwd.ops) <= len(full_fwd.ops)  # fewer blocks, and the copies only they needed
            fetches = lambda s: s.counts()[Kind.FETCH]  # noqa: E731
            if offload:
                assert fetches(fwd) <= fetches(full_fwd)
            for order in ("kv", "query"):
                bwd = backward_schedule(u, causal=causal, offload=offload, pairs=pairs, order=order)
                check_schedule(bwd)
                assert set(bwd.blocks()) == {(j, i) for i, j in pairs if j <= i or not causal}
                if offload:
                    assert fetches(bwd) <= fetches(backward_schedule(u, causal=causal, offload=True, order=order))


def test_pairs_must_include_every_chunk_with_itself():
    with pytest.raises(ValueError, match="shares a document with itself"):
        forward_schedule(3, pairs={(0, 0), (1, 1)})


@pytest.mark.parametrize("seed", range(6))
def test_the_copy_counter_counts_what_the_schedule_copies(seed):
    # cheaper_backward_order counts copies without building ops; it must see the schedule's own.
    from parallel.schedule import _backward_copies, copy_counts

    u = 1 + 2 * seed
    pairs = None if seed % 2 else document_pairs(_random_documents(seed, 1, u * 16), 1, u * 16, u)
    for causal in (True, False):
        for order in ("kv", "query"):
            built = backward_schedule(u, causal=causal, offload=True, pairs=pairs, order=order)
            assert _backward_copies(u, causal, None if pairs is None else frozenset(pairs), order) == copy_counts(built)
