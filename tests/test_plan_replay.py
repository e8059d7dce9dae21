"""The planner's compiled time replays (experiments/planner/replay.py) and the schedules'
residency tallies (parallel.schedule.Residency, backward_residency) give what a plain walk over a
schedule's ops gives, and the memory-only fit check answers as the full estimate does."""

import random

import pytest

from experiments.plan import estimate
from experiments.planner.estimate import fits
from experiments.planner.replay import Program
from parallel.schedule import (
    HOST,
    Kind,
    Residency,
    Stream,
    backward_residency,
    backward_schedule,
    buffer_family,
    document_pairs,
    forward_schedule,
)


def walk_peak(sched, nbytes):
    live, total, peak = set(), 0, 0
    for op in sched.ops:
        for name in op.writes:
            if name.startswith(HOST):
                continue
            if op.kind == Kind.FREE:
                if name in live:
                    live.remove(name)
                    total -= nbytes(buffer_family(name))
            elif name not in sched.inputs and name not in live:
                live.add(name)
                total += nbytes(buffer_family(name))
        peak = max(peak, total)
    return peak


def walk_host(sched, nbytes):
    held, total, peak = set(), 0, 0
    for op in sched.ops:
        if op.kind != Kind.OFFLOAD or op.reads[0] in sched.inputs:
            continue
        size = nbytes(buffer_family(op.reads[0]))
        peak = max(peak, total + size)
        if op.reads[0] not in held:
            held.add(op.reads[0])
            total += size
    return peak


def walk_time(sched, cost, copies=True):
    end, free, done = [], dict.fromkeys(Stream, 0.0), 0.0
    for op in sched.ops:
        ready = max((end[k] for k in op.deps), default=0.0)
        if op.kind == Kind.FREE:
            end.append(ready)
            continue
        c = 0.0 if not copies and op.kind in (Kind.FETCH, Kind.OFFLOAD) else cost(op)
        end.append(max(free[op.stream], ready) + c)
        free[op.stream] = end[-1]
        if op.kind != Kind.OFFLOAD or sched.inputs.intersection(op.reads):
            done = max(done, end[-1])
    return done


def schedules():
    """(schedule, the arguments of a backward one or None)."""
    for u in (1, 2, 5, 9):
        for causal in (True, False):
            for offload in (True, False):
                yield forward_schedule(u, causal=causal, offload=offload, save=True), None
                yield forward_schedule(u, causal=causal, offload=offload, save=False), None
                for order in ("kv", "query"):
                    args = dict(chunks=u, causal=causal, offload=offload, order=order)
                    yield backward_schedule(**args), args
    docs = document_pairs([0, 700, 1500, 2048], 1, 2048, 8)
    yield forward_schedule(8, causal=True, offload=True, save=True, pairs=docs), None
    for order in ("kv", "query"):
        args = dict(chunks=8, causal=True, offload=True, pairs=docs, order=order)
        yield backward_schedule(**args), args


def random_prices(rng):
    """A random cost per op that depends on its kind, chunk and buffer family, as the planner's does."""
    prices = {}

    def cost(op):
        fam = buffer_family(op.buffer) if op.kind in (Kind.FETCH, Kind.OFFLOAD) else None
        return prices.setdefault((op.kind, op.chunk, fam), rng.random() * 1e-3)

    return cost


@pytest.mark.parametrize("seed", [0, 1])
def test_the_compiled_replays_equal_a_walk_over_the_ops(seed):
    rng = random.Random(seed)
    checked = 0
    for sched, backward in schedules():
        tallies = [Residency.of(sched)]
        if backward is not None:  # the same tally from a builder that makes no ops
            counted = backward_residency(**backward)
            assert counted == tallies[0], str(sched)[:80]
            tallies.append(counted)
        for residency in tallies:
            sizes = {fam: rng.randrange(0, 1 << 30) for fam in residency.families}
            assert residency.peak_bytes(sizes.__getitem__) == walk_peak(sched, sizes.__getitem__), str(sched)[:80]
            assert residency.host_bytes(sizes.__getitem__) == walk_host(sched, sizes.__getitem__), str(sched)[:80]
        program = Program.of(sched)
        cost = random_prices(rng)
        costs = program.costs(cost)
        for copies in (True, False):
            assert program.time(costs, copies=copies) == walk_time(sched, cost, copies), str(sched)[:80]
        checked += 1
    assert checked == 4 * 2 * 2 * 4 + 3


def test_the_count_vectors_are_few():
    # Memory replays visit distinct resident-count vectors, not ops: at u=40 a backward has about
    # 5,000 ops and far fewer distinct vectors.
    sched = backward_schedule(40, causal=True, offload=True, order="query")
    residency = Residency.of(sched)
    assert len(sched.ops) > 4000
    assert len(residency.resident) < len(sched.ops) / 4


H200_BOX = {"name": "h200", "host_memory_gib": 128}
ONE_GPU = {"fsdp": False, "chunk_tokens": 65536}
CASES = [
    ("llama3-8b", "fpdt", 4, "a100-80g", 1 << 21, {}),
    ("llama3-8b", "fpdt", 4, "a100-80g", 1 << 23, {}),
    (
        "llama3.2-1b",
        "fpdt",
        1,
        {"name": "h200", "host_memory_gib": 128},
        1 << 21,
        {"fsdp": False, "chunk_tokens": 65536},
    ),
    (
        "llama3.2-1b",
        "fpdt",
        1,
        {"name": "h200", "host_memory_gib": 16},
        1 << 20,
        {"fsdp": False, "chunk_tokens": 65536},
    ),
    ("llama3-8b", "ulysses", 4, "a100-80g", 1 << 15, {}),
    ("llama3-8b", "ulysses", 4, "a100-80g", 1 << 20, {}),
    ("llama-tiny", "fpdt", 2, "cpu", 8192, {"max_device_memory": 0.01, "fsdp": False, "chunks": 4}),
    ("llama-tiny", "fpdt", 1, "cpu", 1 << 16, {"max_device_memory": 0.01, "fsdp": False, "chunks": 8, "doc_len": 5000}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
def test_the_memory_only_fit_answers_as_the_estimate(case):
    model, strategy, gpus, hardware, seq_len, kw = case
    assert (
        fits(model, strategy, gpus, hardware, seq_len, **kw)
        == estimate(model, strategy, gpus, hardware, seq_len, **kw).fits
    )


def test_the_memory_only_fit_checks_its_arguments_as_the_estimate():
    with pytest.raises(TypeError, match="chunk_size"):
        fits("llama3-8b", "fpdt", 4, "a100-80g", 1 << 20, chunk_size=4096)
    with pytest.raises(ValueError, match="does not divide"):
        fits("llama3-8b", "fpdt", 4, "a100-80g", 1000 * 1024, chunk_tokens=65536)
    with pytest.warns(DeprecationWarning, match="checkpoint_on_host"):
        fits("llama3-8b", "fpdt", 4, "a100-80g", 1 << 20, checkpoint_offload=True)
