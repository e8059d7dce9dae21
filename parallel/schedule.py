"""The FPDT chunk-pipeline scheduler: the order of work as data.

A :class:`Schedule` is a list of coarse :class:`Op` s (one per chunk or per chunk block), each
with the stream it runs on, the named buffers it reads and writes, and the ops it waits for
(derived from the buffers: read-after-write, write-after-read, write-after-write). Device
buffers are ``"q[3]"``, ``"kv[1]"``, ...; their host-store copies are ``"host:q[3]"``. ``free``
drops a device buffer. One executor runs a schedule (CUDA streams + events, or in order on CPU);
tests check it with :func:`check_schedule`; a cost model can replay it; ``print(schedule)``
shows it.

Forward: outer loop over query chunks ``i``; chunk ``i+1`` is projected and sent
through its all-to-all before the blocks of chunk ``i`` (so the all-to-all overlaps them);
inner loop over KV chunks ``j <= i`` (all ``j`` when non-causal), the next KV chunk fetched
before the current block. Backward (``order="kv"``, the paper's): outer loop over KV chunks
``i``, inner loop over query chunks ``j >= i``; the output gradient of chunk ``j`` goes through its
all-to-all on first use, ``dq[j]`` round-trips through the host, and each chunk's gradient
all-to-all + projection backward run once its gradient is complete. ``order="query"`` swaps the
loops: ``dkv[i]`` round-trips instead, which moves fewer bytes under GQA.

Packed documents (``pairs``): a block ``(i, j)`` whose query and KV chunks share no document does
no work, so the schedules omit it, and with it every fetch, offload and all-to-all only it needed
(:func:`document_pairs` finds the blocks from the documents' offsets).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple


class Stream(str, enum.Enum):
    COMPUTE = "compute"
    H2D = "h2d"
    D2H = "d2h"
    COMM = "comm"


class Kind(str, enum.Enum):
    """Operation types. ``ATTN_FWD`` merges its block into the running fp32 (out, lse). With
    packed documents RoPE and its backward run in ``PROJECT`` and the ``PROJ_BWD`` ops instead of
    the all-to-alls (at each token's position inside its document)."""

    PROJECT = "project"  # x[i] -> qkv[i]: local QKV projection of chunk i
    A2A_QKV = "a2a_qkv"  # qkv[i] -> q[i], kv[i]: all-to-all + RoPE at global positions
    ATTN_FWD = "attn_fwd"  # (i, j): block q[i] x kv[j], merged into o[i]
    A2A_OUT = "a2a_out"  # o[i] -> out[i], o[i]: inverse all-to-all into the output
    A2A_DO = "a2a_do"  # dout[j] -> do[j]: all-to-all of the output gradient (first use)
    ATTN_BWD = "attn_bwd"  # (i, j): block backward, accumulates dq[j], dkv[i]
    A2A_DQ = "a2a_dq"  # dq[j] -> dqloc[j]: RoPE backward + inverse all-to-all
    A2A_DKV = "a2a_dkv"  # dkv[i] -> dkvloc[i]: RoPE backward + inverse all-to-all (+ replica sum)
    PROJ_BWD_Q = "proj_bwd_q"  # dqloc[j], x[j] -> dx[j], dw: projection backward, query part
    PROJ_BWD_KV = "proj_bwd_kv"  # dkvloc[i], x[i] -> dx[i], dw: projection backward, KV part
    OFFLOAD = "offload"  # device -> host store
    FETCH = "fetch"  # host store -> device
    FREE = "free"  # drop a device buffer


HOST = "host:"
_STREAM_OF = {Kind.OFFLOAD: Stream.D2H, Kind.FETCH: Stream.H2D}
_COMM = {Kind.A2A_QKV, Kind.A2A_OUT, Kind.A2A_DO, Kind.A2A_DQ, Kind.A2A_DKV}


class Op(NamedTuple):
    """One coarse operation. A named tuple, not a dataclass: a schedule at hundreds of chunks has
    hundreds of thousands of ops, and building a frozen dataclass costs about three times as
    much."""

    index: int
    kind: Kind
    stream: Stream
    chunk: tuple[int, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    deps: tuple[int, ...]

    @property
    def buffer(self) -> str:
        """The device buffer an OFFLOAD/FETCH/FREE moves or drops."""
        if self.kind == Kind.OFFLOAD:
            return self.reads[0]
        return self.writes[0]

    def __str__(self) -> str:
        what = f"{self.kind.value}{list(self.chunk) if self.chunk else ''}"
        if self.kind in (Kind.OFFLOAD, Kind.FETCH, Kind.FREE):
            what = f"{self.kind.value} {self.buffer}"
        deps = ",".join(map(str, self.deps))
        return f"{self.index:4d} {self.stream.value:<7} {what:<24} after [{deps}]"


@dataclass
class Schedule:
    direction: str  # "forward" | "backward"
    chunks: int
    causal: bool
    offload: bool
    save: bool
    inputs: frozenset[str]
    outputs: frozenset[str] = frozenset()  # what the caller reads after the run
    ops: list[Op] = field(default_factory=list)
    # Packed documents: the (query chunk, KV chunk) blocks that share a document; None = all.
    pairs: frozenset[tuple[int, int]] | None = None
    order: str = "kv"  # the backward's outer loop: over KV chunks ("kv") or query chunks ("query")

    def visible(self, i: int, j: int) -> bool:
        """Whether query chunk ``i`` attends to KV chunk ``j`` at all (causal and documents)."""
        if self.causal and j > i:
            return False
        return self.pairs is None or (i, j) in self.pairs

    def __str__(self) -> str:
        head = (
            f"{self.direction} schedule: u={self.chunks} causal={self.causal} "
            f"offload={self.offload} save={self.save}, {len(self.ops)} ops"
        )
        return "\n".join([head, *map(str, self.ops)])

    def counts(self) -> Counter:
        return Counter(op.kind for op in self.ops)

    def blocks(self) -> list[tuple[int, int]]:
        """The attention blocks ``(i, j)`` in execution order."""
        kind = Kind.ATTN_FWD if self.direction == "forward" else Kind.ATTN_BWD
        return [op.chunk for op in self.ops if op.kind == kind]


class _Builder:
    def __init__(self, schedule: Schedule):
        self.s = schedule
        self.last_write: dict[str, int] = {}
        self.readers: dict[str, set[int]] = {}
        self.live: set[str] = set(schedule.inputs)

    def add(self, kind: Kind, chunk=(), reads=(), writes=()) -> None:
        stream = _STREAM_OF.get(kind) or (Stream.COMM if kind in _COMM else Stream.COMPUTE)
        last_write, readers, index = self.last_write, self.readers, len(self.s.ops)
        deps = {last_write[b] for b in reads if b in last_write}
        for b in writes:
            deps.update(readers.get(b, ()))
            if b in last_write:
                deps.add(last_write[b])
        self.s.ops.append(Op(index, kind, stream, tuple(chunk), tuple(reads), tuple(writes), tuple(sorted(deps))))
        for b in reads:
            if b in readers:
                readers[b].add(index)
            else:
                readers[b] = {index}
        for b in writes:
            last_write[b] = index
            readers[b] = set()
        self.live.update(writes)

    def has(self, name: str) -> bool:
        return name in self.live

    def offload(self, name: str) -> None:
        self.add(Kind.OFFLOAD, reads=(name,), writes=(HOST + name,))

    def fetch(self, name: str) -> None:
        self.add(Kind.FETCH, reads=(HOST + name,), writes=(name,))

    def ensure(self, name: str) -> None:
        """Fetch ``name`` unless it is already on the device."""
        if name not in self.live:
            self.fetch(name)

    def free(self, *names: str) -> None:
        for name in names:
            if name in self.live:
                self.add(Kind.FREE, writes=(name,))
                self.live.discard(name)
                del self.last_write[name]


# Count vectors are this long while a tally runs: more than the buffer families of any schedule.
_FAMILY_SLOTS = 32


@dataclass(frozen=True)
class Residency:
    """What a schedule holds, per buffer family (``families``), without its ops.

    ``resident``: each distinct count of the device buffers resident after an op (what ops wrote,
    less what was freed; the schedule's inputs and host copies apart). ``held``: each distinct
    count of the host copies the schedule made of its own buffers, at the moment it makes one
    (a copy that replaces an older one of the same buffer is taken before the old one is given
    back). ``copies``: host-device copies (fetches and offloads) per family. Sizes are not
    negative, so the largest byte sum over the distinct counts is the largest over the ops.
    """

    families: tuple[str, ...]
    resident: tuple[tuple[int, ...], ...]
    held: tuple[tuple[int, ...], ...]
    copies: Counter

    @classmethod
    def of(cls, s: Schedule) -> Residency:
        """The residency of a built schedule."""
        tally = _Tally(s.inputs)
        for op in s.ops:
            tally.observe(op.kind, op.reads, op.writes)
        return tally.residency()

    def _largest(self, counts, nbytes) -> int:
        sizes = [nbytes(fam) for fam in self.families]
        return max((sum(n * size for n, size in zip(c, sizes, strict=True)) for c in counts), default=0)

    def peak_bytes(self, nbytes) -> int:
        """Most device bytes resident after any op, a buffer of family ``f`` being ``nbytes(f)``."""
        return self._largest(self.resident, nbytes)

    def host_bytes(self, nbytes) -> int:
        """Most host bytes the schedule's own copies hold at once (what a replacing copy needs)."""
        return self._largest(self.held, nbytes)


class _Tally:
    """Counts what :class:`Residency` reports, one op at a time: the one rule for a schedule's
    ops (:meth:`Residency.of`) and for a builder that makes none (:class:`_ResidencyCounter`)."""

    def __init__(self, inputs: frozenset[str]):
        self.inputs = inputs
        self.slots: dict[str, int] = {}  # family -> index in the count vectors
        self.slot_of: dict[str, int] = {}  # buffer name -> its family's index, -1 for host copies
        self.resident_names: set[str] = set()
        self.held_names: set[str] = set()
        self.resident = [0] * _FAMILY_SLOTS
        self.held = [0] * _FAMILY_SLOTS
        self.resident_seen: dict[tuple[int, ...], None] = {}
        self.held_seen: dict[tuple[int, ...], None] = {}
        self.copies: Counter = Counter()

    def slot(self, name: str) -> int:
        k = self.slot_of.get(name)
        if k is None:
            k = -1 if name.startswith(HOST) else self.slots.setdefault(buffer_family(name), len(self.slots))
            if k >= _FAMILY_SLOTS:
                raise ValueError(f"a schedule with more than {_FAMILY_SLOTS} buffer families: raise _FAMILY_SLOTS")
            self.slot_of[name] = k
        return k

    def observe(self, kind: Kind, reads, writes) -> None:
        for name in writes:
            k = self.slot(name)
            if k < 0:
                continue
            if kind == Kind.FREE:
                if name in self.resident_names:
                    self.resident_names.remove(name)
                    self.resident[k] -= 1
            elif name not in self.inputs and name not in self.resident_names:
                self.resident_names.add(name)
                self.resident[k] += 1
        self.resident_seen[tuple(self.resident)] = None
        if kind == Kind.FETCH:
            self.copies[buffer_family(writes[0])] += 1
        elif kind == Kind.OFFLOAD:
            name = reads[0]
            self.copies[buffer_family(name)] += 1
            if name not in self.inputs:
                k = self.slot(name)
                self.held[k] += 1
                self.held_seen[tuple(self.held)] = None
                if name in self.held_names:
                    self.held[k] -= 1
                else:
                    self.held_names.add(name)

    def residency(self) -> Residency:
        n = len(self.slots)
        return Residency(
            tuple(self.slots),
            tuple(c[:n] for c in self.resident_seen),
            tuple(c[:n] for c in self.held_seen),
            self.copies,
        )


class _ResidencyCounter(_Builder):
    """A builder that keeps no ops and only tallies the :class:`Residency` of the schedule its
    construction makes: built by the same code at a fraction of the cost (a schedule at hundreds
    of chunks has ~10^6 ops), for :func:`cheaper_backward_order` and memory models."""

    def __init__(self, schedule: Schedule):
        self.s = schedule
        self.live: set[str] = set(schedule.inputs)
        self.tally = _Tally(schedule.inputs)

    def add(self, kind: Kind, chunk=(), reads=(), writes=()) -> None:
        self.tally.observe(kind, reads, writes)
        self.live.update(writes)

    def free(self, *names: str) -> None:
        for name in names:  # as _Builder.free: one free op per resident name
            if name in self.live:
                self.add(Kind.FREE, writes=(name,))
                self.live.discard(name)


def _n(name: str, i: int) -> str:
    return f"{name}[{i}]"


def _built_once(build):
    """Build each schedule once per process and hand every caller its own copy of the op list.

    A schedule is a pure function of its arguments and has O(u^2) ops: at u=170 (a planner
    search past 5M tokens) one takes seconds to build, and a run builds the same few per layer
    and step. Ops are frozen, so a shallow copy of the list is a schedule the caller may edit."""
    cached = functools.lru_cache(maxsize=8)(build)

    @functools.wraps(build)
    def schedule(chunks: int, **kwargs) -> Schedule:
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks={chunks!r} must be an int >= 1")
        if kwargs.get("pairs") is not None:  # any iterable of pairs, as a hashable key
            kwargs["pairs"] = _checked_pairs(kwargs["pairs"], chunks)
        built = cached(chunks, **kwargs)
        return dataclasses.replace(built, ops=list(built.ops))

    return schedule


@_built_once
def forward_schedule(
    chunks: int,
    *,
    causal: bool = True,
    offload: bool = True,
    save: bool = True,
    pairs: frozenset[tuple[int, int]] | None = None,
) -> Schedule:
    """Forward of the FPDT attention block over ``chunks`` chunks.

    ``save``: keep what the backward needs (in the host store when ``offload``). A no-grad
    forward (``save=False``) offloads only KV chunks a later query chunk still needs (non-causal
    with several chunks, every chunk is prepared before the first block: each q, and each KV
    chunk another query chunk reads). ``pairs``: the blocks that share a document
    (:func:`document_pairs`); the others are left out.
    """
    u = chunks
    inputs, outputs = frozenset(_n("x", i) for i in range(u)), frozenset(_n("out", i) for i in range(u))
    s = Schedule("forward", u, causal, offload, save, inputs, outputs, pairs=_checked_pairs(pairs, u))
    b = _Builder(s)

    def kv_reused(j: int) -> bool:  # a query chunk other than the one prepared with it reads it
        return any(s.visible(i, j) for i in range(u) if i != j and (i > j or not causal))

    def prepare(i: int) -> None:
        b.add(Kind.PROJECT, (i,), reads=[_n("x", i)], writes=[_n("qkv", i)])
        if save and offload:
            b.offload(_n("x", i))
        b.add(Kind.A2A_QKV, (i,), reads=[_n("qkv", i)], writes=[_n("q", i), _n("kv", i)])
        b.free(_n("qkv", i))
        if offload:
            ahead = not causal and u > 1  # every chunk is prepared before the first block
            if save or ahead:
                b.offload(_n("q", i))
            if save or kv_reused(i):
                b.offload(_n("kv", i))
            if ahead:
                b.free(_n("q", i), _n("kv", i))

    if not causal:
        for i in range(u):
            prepare(i)
    else:
        prepare(0)
    for i in range(u):
        js = [j for j in range(u) if s.visible(i, j)]
        if offload:
            b.ensure(_n("q", i))
            b.ensure(_n("kv", js[0]))
        if causal and i + 1 < u:
            prepare(i + 1)  # its all-to-all overlaps the blocks of chunk i
        for n, j in enumerate(js):
            if offload and n + 1 < len(js):
                b.ensure(_n("kv", js[n + 1]))  # prefetch while block (i, j) computes
            reads = [_n("q", i), _n("kv", j)] + ([_n("o", i)] if n else [])
            b.add(Kind.ATTN_FWD, (i, j), reads=reads, writes=[_n("o", i)])
            if offload:
                b.free(_n("kv", j))
        # It also replaces o[i] by its input-dtype copy, the one saved for the backward.
        b.add(Kind.A2A_OUT, (i,), reads=[_n("o", i)], writes=[_n("out", i), _n("o", i)])
        if offload:
            b.free(_n("q", i))
            if save:
                b.offload(_n("o", i))
            b.free(_n("o", i))
        elif not save:
            b.free(_n("q", i), _n("o", i))
            # KV chunks no later query chunk reads (with documents, some go early).
            b.free(*(_n("kv", j) for j in range(i + 1) if not any(s.visible(k, j) for k in range(i + 1, u))))
    return s


def saved_buffers(chunks: int, offload: bool) -> frozenset[str]:
    """What a saving forward leaves for the backward (host copies when ``offload``)."""
    pre = HOST if offload else ""
    return frozenset(pre + _n(name, i) for i in range(chunks) for name in ("x", "q", "kv", "o"))


BACKWARD_ORDERS = ("kv", "query")


@_built_once
def backward_schedule(
    chunks: int,
    *,
    causal: bool = True,
    offload: bool = True,
    pairs: frozenset[tuple[int, int]] | None = None,
    order: str = "kv",
) -> Schedule:
    """Backward of the FPDT attention block (what :func:`forward_schedule` saved is the input);
    ``pairs`` as for the forward (block ``(i, j)`` here is KV chunk ``i``, query chunk ``j``).

    ``order="kv"``: outer loop over KV chunks, as in the paper: ``dkv[i]`` stays on the device for
    its outer step and each query chunk's q, o, do and fp32 ``dq`` come back for every block.
    ``order="query"``: outer loop over query chunks: ``dq[j]``, q, o and do stay for the outer
    step and each KV chunk and its fp32 ``dkv`` come back for every block. The second moves
    fewer bytes when the KV chunks are smaller than the query side (GQA), and needs no host copy
    of the output gradient; :func:`cheaper_backward_order` picks between them.
    """
    return _build_backward(_Builder, chunks, causal, offload, pairs, order).s


def _build_backward(builder: type[_Builder], chunks: int, causal: bool, offload: bool, pairs, order: str) -> _Builder:
    """:func:`backward_schedule`'s construction, into ``builder`` (the schedule, or only its copy counts)."""
    if order not in BACKWARD_ORDERS:
        raise ValueError(f"backward order {order!r}: use one of {BACKWARD_ORDERS}")
    u = chunks
    inputs = saved_buffers(u, offload) | {_n("dout", j) for j in range(u)}
    outputs = frozenset({_n("dx", i) for i in range(u)} | {"dw"})
    s = Schedule(
        "backward", u, causal, offload, True, frozenset(inputs), outputs, pairs=_checked_pairs(pairs, u), order=order
    )
    b = builder(s)
    kv_outer = order == "kv"

    # The chunks of the other side each outer chunk meets, and the outer steps each inner chunk meets.
    inners = [[k for k in range(u) if (s.visible(k, o) if kv_outer else s.visible(o, k))] for o in range(u)]
    outers: list[list[int]] = [[] for _ in range(u)]  # ascending: [0] is the first, [-1] the last
    for o in range(u):
        for k in inners[o]:
            outers[k].append(o)

    def block(outer: int, k: int) -> tuple[int, int]:  # (KV chunk, query chunk)
        return (outer, k) if kv_outer else (k, outer)

    # The inner side's accumulator and the inputs it needs per block; the outer side's.
    acc_in, acc_out = ("dq", "dkv") if kv_outer else ("dkv", "dq")
    per_block = ("q", "o", "do") if kv_outer else ("kv",)
    per_outer = ("kv",) if kv_outer else ("q", "o")  # fetched at the start of the outer step
    outer_freed = per_outer if kv_outer else ("q", "o", "do")
    # The outer step in which each projection backward is queued: once its gradient is complete.
    queued = {}
    for k in range(u):
        queued[(acc_in, k)] = outers[k][-1]
        queued[(acc_out, k)] = k
    proj = {"dq": Kind.PROJ_BWD_Q, "dkv": Kind.PROJ_BWD_KV}
    a2a = {"dq": Kind.A2A_DQ, "dkv": Kind.A2A_DKV}
    loc = {"dq": "dqloc", "dkv": "dkvloc"}
    pending: list[tuple[str, int]] = []  # projection backwards waiting for their all-to-all
    done: set[tuple[str, int]] = set()

    def output_grad(j: int, first_use: bool) -> None:
        if not first_use:
            return
        b.add(Kind.A2A_DO, (j,), reads=[_n("dout", j)], writes=[_n("do", j)])
        if offload and kv_outer and refetched[j]:
            b.offload(_n("do", j))  # later outer steps read it again

    def load(outer: int, k: int) -> None:
        if kv_outer:
            output_grad(k, outer == outers[k][0])
        if offload:
            names = per_block + ((acc_in,) if outer > outers[k][0] else ())
            for name in names:
                b.ensure(_n(name, k))

    def flush() -> None:
        for acc, k in pending:
            if offload:
                b.ensure(_n("x", k))
            b.add(proj[acc], (k,), reads=[_n(loc[acc], k), _n("x", k)], writes=[_n("dx", k), "dw"])
            b.free(_n(loc[acc], k))
            done.add((acc, k))
            other = acc_out if acc == acc_in else acc_in
            # x[k] stays only for k's other projection when that one is queued in the same outer step.
            keep = (other, k) not in done and queued[(other, k)] == queued[(acc, k)]
            if offload and not keep:
                b.free(_n("x", k))
        pending.clear()

    def finish(acc: str, k: int) -> None:
        b.add(a2a[acc], (k,), reads=[_n(acc, k)], writes=[_n(loc[acc], k)])
        b.free(_n(acc, k))
        pending.append((acc, k))

    # The inner chunk of the block after each (outer, inner) block, in execution order, and
    # whether an inner chunk leaves the device between two of its blocks (see ``stays`` below).
    flat = [(outer, k) for outer in range(u) for k in inners[outer]]
    next_inner = {block_: after[1] for block_, after in zip(flat, flat[1:], strict=False)}
    at: list[list[int]] = [[] for _ in range(u)]
    for n, (_, k) in enumerate(flat):
        at[k].append(n)
    refetched = [any(b_ - a_ > 1 for a_, b_ in zip(pos, pos[1:], strict=False)) for pos in at]
    for outer in range(u):
        if not kv_outer:
            output_grad(outer, True)
        if offload:
            for name in per_outer:
                b.ensure(_n(name, outer))
        ks = inners[outer]
        load(outer, ks[0])
        for n, k in enumerate(ks):
            if n + 1 < len(ks):
                load(outer, ks[n + 1])  # prefetch / all-to-all of the next inner chunk
            i, j = block(outer, k)
            reads = [_n("q", j), _n("kv", i), _n("o", j), _n("do", j)]
            reads += [name for name in (_n("dq", j), _n("dkv", i)) if b.has(name)]
            b.add(Kind.ATTN_BWD, (i, j), reads=reads, writes=[_n("dq", j), _n("dkv", i)])
            flush()  # projection backwards queued before this block: their all-to-all overlapped it
            last = outer == outers[k][-1]
            # The next outer step's first block reads the same inner chunk (the last query chunk
            # in "kv" order, the first KV chunk in "query" order): its accumulator and inputs stay
            # on the device rather than make a host round trip the block would wait for.
            stays = next_inner.get((outer, k)) == k
            if last:  # the inner chunk's gradient is complete
                finish(acc_in, k)
            elif offload and not stays:
                b.offload(_n(acc_in, k))
                b.free(_n(acc_in, k))
            if (offload and not stays) or last:
                b.free(*(_n(name, k) for name in per_block))
        finish(acc_out, outer)
        b.free(*(_n(name, outer) for name in outer_freed))
    flush()
    return b


def copy_counts(s: Schedule) -> Counter:
    """Host-device copies (fetches and offloads) a schedule makes, per buffer family."""
    return Counter(buffer_family(op.buffer) for op in s.ops if op.kind in (Kind.FETCH, Kind.OFFLOAD))


@functools.lru_cache(maxsize=64)
def backward_residency(
    chunks: int,
    *,
    causal: bool = True,
    offload: bool = True,
    pairs: frozenset[tuple[int, int]] | None = None,
    order: str = "kv",
) -> Residency:
    """The :class:`Residency` of :func:`backward_schedule` with these arguments, without building
    its ops (``Residency.of(backward_schedule(...))``, at a fraction of the cost)."""
    return _build_backward(
        _ResidencyCounter, chunks, causal, offload, _checked_pairs(pairs, chunks), order
    ).tally.residency()


def _backward_copies(chunks: int, causal: bool, pairs, order: str) -> Counter:
    """``copy_counts`` of the offloading backward schedule, without building its ops."""
    return backward_residency(chunks, causal=causal, offload=True, pairs=pairs, order=order).copies


def check_backward_order(order: str) -> str:
    """``order`` if it names a backward loop or ``"auto"``; else ``ValueError`` listing them."""
    if order not in ("auto", *BACKWARD_ORDERS):
        raise ValueError(f"backward_order={order!r}: use one of {('auto', *BACKWARD_ORDERS)}")
    return order


def resolve_backward_order(
    order: str,
    chunks: int,
    sizes: dict[str, int],
    *,
    offload: bool,
    causal: bool = True,
    pairs: frozenset[tuple[int, int]] | None = None,
) -> str:
    """The backward loop a run uses: ``order`` itself, or for ``"auto"`` the one whose copies move
    fewer bytes (:func:`cheaper_backward_order`; ``"kv"`` without offload, which copies nothing)."""
    if check_backward_order(order) != "auto":
        return order
    if not offload:
        return "kv"
    return cheaper_backward_order(chunks, sizes, causal=causal, pairs=pairs)


def cheaper_backward_order(
    chunks: int, sizes: dict[str, int], *, causal: bool = True, pairs: frozenset[tuple[int, int]] | None = None
) -> str:
    """The backward order (``"kv"`` or ``"query"``) whose offloading schedule moves fewer bytes
    between host and device, for chunks of ``sizes`` bytes per buffer family (``x, q, kv, o, do,
    dq, dkv``: what one copy moves); ``"kv"`` on a tie."""
    pairs = _checked_pairs(pairs, chunks)
    moved = {
        order: sum(n * sizes[fam] for fam, n in _backward_copies(chunks, causal, pairs, order).items())
        for order in BACKWARD_ORDERS
    }
    return min(BACKWARD_ORDERS, key=lambda order: (moved[order], order != "kv"))


class ScheduleError(AssertionError):
    """A schedule breaks one of the pipeline invariants."""


def _expected_blocks(s: Schedule) -> list[tuple[int, int]]:
    u = s.chunks
    if s.direction == "forward":
        return [(i, j) for i in range(u) for j in range(u) if s.visible(i, j)]
    if s.order == "query":
        return [(i, j) for j in range(u) for i in range(u) if s.visible(j, i)]
    return [(i, j) for i in range(u) for j in range(u) if s.visible(j, i)]


def _checked_pairs(pairs, u: int) -> frozenset[tuple[int, int]] | None:
    if pairs is None:
        return None
    pairs = frozenset((int(i), int(j)) for i, j in pairs)
    missing = [i for i in range(u) if (i, i) not in pairs]
    if missing:
        raise ValueError(f"every chunk shares a document with itself; pairs lack {[(i, i) for i in missing]}")
    if any(not (0 <= i < u and 0 <= j < u) for i, j in pairs):
        raise ValueError(f"pairs must name chunks 0..{u - 1}")
    return pairs


def document_pairs(cu_seqlens, batch: int, seq_len: int, chunks: int) -> frozenset[tuple[int, int]]:
    """The chunk blocks ``(i, j)`` in which some row's query chunk ``i`` and KV chunk ``j`` (each
    ``seq_len / chunks`` tokens of the global sequence) share a document, from the documents'
    offsets over the flattened ``[batch * seq_len]`` tokens (flash-attn's ``cu_seqlens``)."""
    starts = [int(c) for c in cu_seqlens[:-1]]
    C = seq_len // chunks

    def doc(pos: int) -> int:  # index of the document holding flattened position pos
        return bisect.bisect_right(starts, pos) - 1

    pairs = set()
    for row in range(batch):
        spans = [(doc(row * seq_len + i * C), doc(row * seq_len + (i + 1) * C - 1)) for i in range(chunks)]
        for i, (lo_i, hi_i) in enumerate(spans):
            for j, (lo_j, hi_j) in enumerate(spans):
                if max(lo_i, lo_j) <= min(hi_i, hi_j):
                    pairs.add((i, j))
    return frozenset(pairs)


def buffer_family(name: str) -> str:
    """The family of a buffer name made by ``_n``: ``"q[3]"`` -> ``"q"``."""
    return name.split("[")[0]


def check_schedule(s: Schedule) -> dict[str, int]:
    """Check the invariants of a schedule; return the peak number of resident device chunks
    per buffer family (``{"kv": 4, "q": 2, ...}``). Raises :class:`ScheduleError`.

    Checked: every block of the causal triangle (or the full square; with ``pairs`` only those
    that share a document) exactly once, outer loop
    over query chunks forward and, backward, over the chunks its ``order`` names; every buffer is produced or fetched
    before it is read and never read after it is freed; every op waits for the last writer of
    what it reads and for every reader of what it overwrites or frees (so no chunk is used
    after its buffer is reused); ops run on their stream; the outputs are all produced.
    """
    blocks = s.blocks()
    if blocks != _expected_blocks(s):
        raise ScheduleError(f"blocks {blocks} are not {_expected_blocks(s)} in loop order")
    live = set(s.inputs)
    last_write: dict[str, int] = {}
    readers: dict[str, set[int]] = {}
    peak: Counter = Counter()
    written: Counter = Counter()
    for op in s.ops:
        expect = _STREAM_OF.get(op.kind, Stream.COMM if op.kind in _COMM else Stream.COMPUTE)
        if op.stream != expect:
            raise ScheduleError(f"op {op} runs on {op.stream.value}, expected {expect.value}")
        deps = set(op.deps)
        if any(d >= op.index for d in deps):
            raise ScheduleError(f"op {op} waits for a later op")
        for b in op.reads:
            if b not in live:
                raise ScheduleError(f"op {op} reads {b}, which is not resident (never made, not fetched, or freed)")
            if b in last_write and last_write[b] not in deps:
                raise ScheduleError(f"op {op} reads {b} without waiting for its writer {last_write[b]}")
        for b in op.writes:
            if not readers.get(b, set()) <= deps:
                raise ScheduleError(f"op {op} overwrites {b} before its readers {sorted(readers[b])} are done")
            if op.kind == Kind.FREE:
                if b not in live:
                    raise ScheduleError(f"op {op} frees {b}, which is not resident")
                live.discard(b)
                last_write.pop(b, None)
                readers[b] = set()
                continue
            live.add(b)
            last_write[b] = op.index
            readers[b] = set()
            written[b] += 1
        for b in op.reads:
            readers.setdefault(b, set()).add(op.index)
        now = Counter(buffer_family(b) for b in live if not b.startswith(HOST) and b not in s.inputs)
        for fam, n in now.items():
            peak[fam] = max(peak[fam], n)
    u = s.chunks
    if s.direction == "forward":
        missing = [_n("out", i) for i in range(u) if written[_n("out", i)] != 1]
        if s.save:
            missing += sorted(saved_buffers(u, s.offload) - live - s.inputs)
    else:
        missing = [_n("dx", i) for i in range(u) if written[_n("dx", i)] != 2]
        done = Counter(op.chunk[0] for op in s.ops if op.kind == Kind.A2A_DO)
        missing += [_n("do", j) for j in range(u) if done[j] != 1]
    missing += sorted(n for n in s.outputs if not written[n])
    if missing:
        raise ScheduleError(f"{s.direction} schedule does not produce {missing}")
    return dict(peak)
