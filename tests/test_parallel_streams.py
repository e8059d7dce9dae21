"""Stream ordering of the FPDT executor and the host checkpoint hooks, checked on CPU with a fake
CUDA: every stream is a list of what was issued on it (ops, event records, event waits), and
"a happens before b" is a path through stream order and record -> wait edges. The GPU tests
(tests/test_gpu_pipeline.py) run the same code on real streams."""

from __future__ import annotations

import contextlib

import pytest
import torch

import parallel.executor as executor
import parallel.host_store as host_store
from parallel import HostStore, Kind, Stream, backward_schedule, forward_schedule, run_schedule
from parallel.executor import DeviceBuffers


class _Stream:
    def __init__(self, name: str):
        self.name, self.items = name, []

    def wait_event(self, event) -> None:
        self.items.append(("wait", event))

    def __repr__(self) -> str:
        return self.name


class _Event:
    def __init__(self, cuda: _FakeCuda):
        self.cuda, self.at = cuda, None

    def record(self, stream=None) -> None:
        stream = stream or self.cuda.current
        stream.items.append(("record", self))
        self.at = (stream, len(stream.items) - 1)

    def synchronize(self) -> None:
        pass


class _FakeCuda:
    """The part of ``torch.cuda`` the executor calls."""

    def __init__(self):
        self.caller = self.current = _Stream("caller")
        self.sides: list[_Stream] = []

    def Stream(self, device=None):  # noqa: N802 - torch.cuda's name
        self.sides.append(_Stream(f"side{len(self.sides)}"))
        return self.sides[-1]

    def Event(self):  # noqa: N802
        return _Event(self)

    def current_stream(self, device=None):
        return self.current

    def current_device(self) -> int:
        return 0

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def mark(self, what) -> tuple:
        """Issue ``what`` on the current stream; its position."""
        self.current.items.append(("op", what))
        return self.current, len(self.current.items) - 1


def _before(a: tuple, b: tuple) -> bool:
    """Position ``a`` happens before (or is) position ``b``."""
    seen, todo = set(), [b]
    while todo:
        stream, k = todo.pop()
        if stream is a[0] and k >= a[1]:
            return True
        if (id(stream), k) in seen or k < 0:
            continue
        seen.add((id(stream), k))
        todo.append((stream, k - 1))
        item = stream.items[k]
        if item[0] == "wait":
            todo.append(item[1].at)
    return False


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(executor, "_cuda", fake)
    monkeypatch.setattr(executor, "_side_streams", {})
    return fake


def _run(fake, schedule, ready=None, buffers=None):
    """Run ``schedule`` with handlers that only mark where each op was issued."""
    at: dict[int, tuple] = {}

    def handler(op):
        at[op.index] = fake.mark((schedule.direction, op.index))
        if buffers is not None:
            buffers.op = op

    handlers = {kind: handler for kind in Kind}
    events = run_schedule(schedule, handlers, torch.device("cuda"), ready=ready, buffers=buffers)
    return at, events


def _check_deps(schedule, at):
    for op in schedule.ops:
        if op.kind == Kind.FREE:
            continue
        for d in op.deps:
            if schedule.ops[d].kind != Kind.FREE:
                assert _before(at[d], at[op.index]), f"{op} is not ordered after {schedule.ops[d]}"


@pytest.mark.parametrize("causal", [True, False])
def test_executor_orders_by_events_and_joins_no_stream(fake_cuda, causal):
    u = 3
    fwd, bwd = forward_schedule(u, causal=causal), backward_schedule(u, causal=causal)
    start_fwd = fake_cuda.mark("caller: before the forward")
    at_f, ready = _run(fake_cuda, fwd)
    after_fwd = fake_cuda.mark("caller: after the forward")
    at_b, _ = _run(fake_cuda, bwd, ready=ready)
    after_bwd = fake_cuda.mark("caller: after the backward")
    _check_deps(fwd, at_f)
    _check_deps(bwd, at_b)
    assert len(fake_cuda.sides) == 3  # H2D, D2H, COMM, made once
    ops_f, ops_b = fwd.ops, bwd.ops
    # Side-stream ops that touch the caller's buffers (x, out; dout, dx) come after its earlier work.
    for s, at, before, given in ((fwd, at_f, start_fwd, {}), (bwd, at_b, after_fwd, ready)):
        owned = {n for n in s.inputs | s.outputs if not n.startswith("host:") and n not in given}
        assert owned >= {"x[0]", "out[0]"} or owned >= {"dout[0]", "dx[0]", "dw"}
        for op in s.ops:
            if op.kind != Kind.FREE and {*op.reads, *op.writes} & owned:
                assert _before(before, at[op.index]), op
    # The caller waits for the outputs and for the side streams' reads of its inputs ...
    for op in ops_f:
        if op.kind == Kind.A2A_OUT or (op.kind == Kind.OFFLOAD and op.buffer.startswith("x[")):
            assert _before(at_f[op.index], after_fwd), op
    for op in ops_b:
        if op.kind in (Kind.PROJ_BWD_Q, Kind.PROJ_BWD_KV, Kind.A2A_DO):
            assert _before(at_b[op.index], after_bwd), op
    # ... but not for the forward's last offload, which overlaps what the caller does next.
    last_offload = [op for op in ops_f if op.kind == Kind.OFFLOAD][-1]
    assert last_offload.buffer == f"o[{u - 1}]"
    assert not _before(at_f[last_offload.index], after_fwd)
    # The backward's fetches wait for the forward's copies of what they read, not for the caller.
    offloaded = {op.writes[0]: op.index for op in ops_f if op.kind == Kind.OFFLOAD}
    fetches = [op for op in ops_b if op.kind == Kind.FETCH]
    for op in fetches:
        if op.reads[0] in offloaded:
            assert _before(at_f[offloaded[op.reads[0]]], at_b[op.index]), op
    assert not _before(after_fwd, at_b[fetches[0].index])


class _RecordingBuffers:
    """Stands in for DeviceBuffers: records the events each op's releases are settled with."""

    def __init__(self):
        self.op, self.settled = None, {}

    def settle(self, events) -> None:
        self.settled[self.op.index] = list(events)


def test_released_slots_wait_for_every_user(fake_cuda):
    # A buffer's slots are reusable once the events they are settled with complete: those must
    # follow every op that read or wrote the buffer since it was last written.
    s = backward_schedule(3)
    buffers = _RecordingBuffers()
    _, ready = _run(fake_cuda, forward_schedule(3))  # the backward reads what the forward wrote
    at, _ = _run(fake_cuda, s, ready=ready, buffers=buffers)
    users: dict[str, list[int]] = {}
    for op in s.ops:
        if op.kind == Kind.FREE:
            name = op.buffer
            events = buffers.settled[op.index]
            for u in users.pop(name, []):
                assert any(_before(at[u], e.at) for e in events), (op, s.ops[u])
            continue
        for name in op.writes:
            if name not in op.reads:
                users[name] = []
        for name in {*op.reads, *op.writes}:
            users.setdefault(name, []).append(op.index)


def test_device_buffers_bookkeeping():
    f32 = torch.float32
    bufs = DeviceBuffers(torch.device("cpu"), {(6, f32): 2}, {"send": 64})
    a, b = bufs.take((2, 3), f32), bufs.take((3, 2), f32)  # any shape of 6 elements
    assert a.shape == (2, 3) and b.shape == (3, 2)
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    bufs.release(a)
    bufs.release(torch.empty(6))  # not a slot: ignored
    with pytest.warns(RuntimeWarning, match="no free device slot"):
        c = bufs.take((6,), f32)  # a is released but not settled: the ring grows
    assert bufs.grown == 1
    bufs.settle([])
    assert bufs.take((1, 6), f32).untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert bufs.nbytes == 3 * 24 + 64 and c.numel() == 6
    assert bufs.scratch("send", (4, 4), f32).shape == (4, 4)
    with pytest.raises(ValueError, match="holds 64 bytes, 68 asked"):
        bufs.scratch("send", (17,), f32)


def test_parked_slots_go_to_the_next_run():
    f32, cpu = torch.float32, torch.device("cpu")

    def ptr(t):
        return t.untyped_storage().data_ptr()

    first = DeviceBuffers(cpu, {(6, f32): 2, (3, f32): 1}, {})
    a = first.take((6,), f32)
    b = first.take((6,), f32)
    first.release(b)
    first.settle([])
    first.park()  # b's slot and the (3,) slot; a stays with its buffer
    nxt = DeviceBuffers(cpu, {(6, f32): 2, (5, f32): 1}, {})
    got = nxt.take((2, 3), f32)
    assert ptr(got) == ptr(b)  # handed over, and taken first
    assert ptr(nxt.take((6,), f32)) not in {ptr(a), ptr(got)}
    assert nxt.nbytes == 2 * 24 + 20  # the (3,) slot it does not need is dropped
    assert ptr(DeviceBuffers(cpu, {(6, f32): 1}, {}).take((6,), f32)) != ptr(b)  # handed over once


# --- host checkpoints ------------------------------------------------------------------------
@pytest.fixture
def fake_copies(fake_cuda, monkeypatch):
    """Fake CUDA for the hooks: CPU tensors stand for device tensors; copies and record_stream
    calls are marked on the current stream."""
    copies, kept = [], []
    real_copy = host_store.copy_rows

    def copy_rows(dst, src, non_blocking):
        copies.append((fake_cuda.mark("copy"), dst, src))
        real_copy(dst, src, non_blocking)

    monkeypatch.setattr(host_store, "copy_rows", copy_rows)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: kept.append((t, s)))
    return fake_cuda, copies, kept


def test_host_checkpoints_copy_on_side_streams_and_prefetch(fake_copies):
    fake, copies, kept = fake_copies
    store = HostStore()
    hooks = host_store._HostCheckpoints(store, device_type="cpu")
    xs = [torch.randn(2, 5, 3) * (i + 1) for i in range(3)]
    caller_work = fake.mark("caller: the layer that saves")
    packed = [hooks.pack(x) for x in xs]
    sides = executor.side_streams(torch.device("cuda"))
    d2h, h2d = sides[Stream.D2H], sides[Stream.H2D]
    assert [c[0][0] for c in copies] == [d2h] * 3
    assert all(_before(caller_work, c[0]) for c in copies)  # after the tensor was made
    assert [(t is x, s) for (t, s), x in zip(kept, xs, strict=True)] == [(True, d2h)] * 3  # autograd may drop x
    assert store.bytes_in_use == sum(x.nbytes for x in xs)

    got = hooks.unpack(packed[2])  # the last layer first: copied back on the caller's stream
    assert torch.equal(got, xs[2])
    back, prefetch = copies[3], copies[4]
    assert back[0][0] is fake.caller and _before(copies[2][0], back[0])  # after its copy to the host
    assert prefetch[0][0] is h2d and _before(copies[1][0], prefetch[0])  # layer 1, on the H2D stream
    assert _before(back[0], prefetch[0])  # into memory the caller's stream has finished with
    assert packed[1].prefetched is not None and packed[0].prefetched is None  # one at a time
    recompute = fake.mark("caller: recompute and backward of layer 2")
    assert not _before(prefetch[0], recompute)  # the prefetch overlaps it

    got = hooks.unpack(packed[1])  # prefetched: no copy, the caller waits for the prefetch
    assert torch.equal(got, xs[1]) and _before(prefetch[0], fake.mark("caller: uses layer 1"))
    assert copies[5][0][0] is h2d and packed[0].prefetched is not None  # now layer 0's
    assert torch.equal(hooks.unpack(packed[0]), xs[0])
    assert len(copies) == 6
    assert hooks.unpack(packed[0]).data_ptr() != got.data_ptr()  # a second backward copies again
    del packed, got
    assert store.bytes_in_use == 0  # buffers go back when autograd drops the saved tensors
    assert all(isinstance(t, torch.Tensor) for t, _ in kept)


def test_host_checkpoints_prefetch_one_at_a_time(fake_copies):
    hooks = host_store._HostCheckpoints(HostStore(), device_type="cpu")
    xs = [torch.full((4,), float(i)) for i in range(4)]
    packed = [hooks.pack(x) for x in xs]
    hooks.unpack(packed[3])  # prefetches 2
    assert torch.equal(hooks.unpack(packed[1]), xs[1])  # out of order: copied back, 0 not prefetched
    assert [p.prefetched is not None for p in packed] == [False, False, True, False]
    assert torch.equal(hooks.unpack(packed[2]), xs[2])  # consumes the prefetch; 0 comes next
    assert [p.prefetched is not None for p in packed] == [True, False, False, False]


def test_host_checkpoints_round_trip_through_autograd(fake_copies):
    # A reentrant-checkpointed stack with the hooks around each layer: the same loss and
    # gradients, bit for bit, as without them.
    torch.manual_seed(0)
    ws = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    x0 = torch.randn(4, 8)

    def layer(w):
        return lambda h: torch.tanh(h @ w)

    def loss(hooks):
        h = x0.clone().requires_grad_(True)
        for w in ws:
            ctx = (
                torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack)
                if hooks
                else contextlib.nullcontext()
            )
            with ctx:
                h = torch.utils.checkpoint.checkpoint(layer(w), h, use_reentrant=True)
        h.square().sum().backward()
        return [w.grad.clone() for w in ws]

    want = loss(None)
    for w in ws:
        w.grad = None
    store = HostStore()
    got = loss(host_store._HostCheckpoints(store, device_type="cpu"))
    for g, r in zip(got, want, strict=True):
        assert torch.equal(g, r)
    _, copies, _ = fake_copies
    assert len(copies) == 6 and store.bytes_in_use == 0 and store.allocations == 3


def test_pinned_bytes_and_pageable_warning(monkeypatch):
    assert [host_store.pinned_reserved_bytes(n) for n in (0, 1, 3, 4096, 4097)] == [0, 1, 4, 4096, 8192]
    store = HostStore()
    buf = store.acquire((3, 7), torch.float32)
    assert store.bytes_allocated == buf.nbytes == 84  # pageable: what was asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match="pageable host memory are synchronous"):
        HostStore(pin_memory=False)


def test_copy_rows_copies_a_chunk_of_a_batch():
    x = torch.randn(3, 8, 5)
    chunk = x[:, 2:6]  # not contiguous: one copy per row
    dst = torch.empty(3, 4, 5)
    host_store.copy_rows(dst, chunk, non_blocking=False)
    assert torch.equal(dst, chunk)
    rows = torch.empty(8, 3, 5)
    host_store.copy_rows(rows, x.transpose(0, 1), non_blocking=False)  # rows not contiguous: one copy
    assert torch.equal(rows, x.transpose(0, 1))
