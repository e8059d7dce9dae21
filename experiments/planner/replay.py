"""FPDT schedules compiled once for the planner's replays.

One planner estimate replays the same few schedules many times (device peak, host peak, step
time with and without copy costs), and a ``max_seq_len`` search or the planning table asks for
many estimates at the same chunk count. A schedule at hundreds of chunks has hundreds of
thousands of ops, so walking its op objects per replay made the planner take minutes.

A :class:`Program` is what the replays need from a schedule, with the sizes and costs left as
parameters:

- memory: the per-family counts of live device buffers after each op (and of held host copies
  at each offload), kept once per distinct count vector. Sizes are non-negative, so the largest
  byte sum over those vectors is the largest over the ops;
- time: per op its stream, the ops it waits for and a cost key; one representative op per key
  is priced by the caller.

The answers are the ones a walk over the ops gives, to the byte and to the float: the same sums
and maxima in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from parallel.schedule import HOST, Kind, Op, Schedule, Stream, buffer_family

_STREAMS = {stream: index for index, stream in enumerate(Stream)}
_FREE = -1  # stream index of a free: it occupies no stream
_MOVES = (Kind.FETCH, Kind.OFFLOAD)
_SLOTS = 32  # count-vector length while compiling: more than the buffer families of any schedule


@dataclass(frozen=True)
class Program:
    families: tuple[str, ...]  # the device buffer families the count vectors count
    live: tuple[tuple[int, ...], ...]  # distinct counts of live device buffers after an op
    held: tuple[tuple[int, ...], ...]  # distinct counts of host copies held, with the one being made
    streams: tuple[int, ...]  # per op: its stream's index, or _FREE
    deps: tuple[tuple[int, ...], ...]  # per op: the ops it waits for
    keys: tuple[int, ...]  # per op: index of its cost in the caller's cost list
    waited: tuple[bool, ...]  # per op: whether the caller waits for it (see time())
    priced: tuple[Op, ...]  # one op per cost key, in key order
    moves: tuple[bool, ...]  # per cost key: a host-device copy

    @classmethod
    def of(cls, sched: Schedule) -> Program:
        slots: dict[str, int] = {}  # family -> index in the count vectors
        slot_of: dict[str, int] = {}  # buffer name -> its family's index (host copies: -1)

        def slot(name: str) -> int:
            k = slot_of.get(name)
            if k is None:
                k = -1 if name.startswith(HOST) else slots.setdefault(buffer_family(name), len(slots))
                if k >= _SLOTS:
                    raise ValueError(f"a schedule with more than {_SLOTS} buffer families: raise _SLOTS")
                slot_of[name] = k
            return k

        inputs = sched.inputs
        live_names: set[str] = set()
        held_names: set[str] = set()
        live, held = [0] * _SLOTS, [0] * _SLOTS  # trimmed to the families seen below
        live_seen: dict[tuple[int, ...], None] = {}
        held_seen: dict[tuple[int, ...], None] = {}
        streams, deps, keys, waited = [], [], [], []
        key_of: dict[tuple, int] = {}
        priced: list[Op] = []
        for op in sched.ops:
            kind = op.kind
            # memory: live device buffers (inputs excluded, host copies apart)
            for name in op.writes:
                k = slot(name)
                if k < 0:
                    continue
                if kind == Kind.FREE:
                    if name in live_names:
                        live_names.remove(name)
                        live[k] -= 1
                elif name not in inputs and name not in live_names:
                    live_names.add(name)
                    live[k] += 1
            live_seen[tuple(live)] = None
            deps.append(op.deps)
            if kind == Kind.FREE:
                streams.append(_FREE)
                keys.append(-1)
                waited.append(False)
                continue
            moves = kind in _MOVES
            given = False
            if kind == Kind.OFFLOAD:
                name = op.reads[0]
                given = name in inputs
                if not given:  # a copy the pass makes of its own buffer, held until it ends
                    k = slot(name)
                    held[k] += 1  # the new host buffer is taken before an older copy is given back
                    held_seen[tuple(held)] = None
                    if name in held_names:
                        held[k] -= 1
                    else:
                        held_names.add(name)
            # time
            what = (kind, op.chunk, buffer_family(op.buffer) if moves else None)
            key = key_of.get(what)
            if key is None:
                key = key_of[what] = len(priced)
                priced.append(op)
            streams.append(_STREAMS[op.stream])
            keys.append(key)
            # The caller waits for every op but an offload of what it did not give (the
            # executor's run_schedule): such an offload is waited for only by the fetch that
            # reads it back.
            waited.append(kind != Kind.OFFLOAD or given)
        n = len(slots)
        return cls(
            families=tuple(slots),
            live=tuple(v[:n] for v in live_seen),
            held=tuple(v[:n] for v in held_seen),
            streams=tuple(streams),
            deps=tuple(deps),
            keys=tuple(keys),
            waited=tuple(waited),
            priced=tuple(priced),
            moves=tuple(op.kind in _MOVES for op in priced),
        )

    def _largest(self, vectors, nbytes: Callable[[str], int]) -> int:
        sizes = [nbytes(fam) for fam in self.families]
        return max((sum(n * size for n, size in zip(v, sizes, strict=True)) for v in vectors), default=0)

    def peak_bytes(self, nbytes: Callable[[str], int]) -> int:
        """Largest sum of live device buffer bytes over the ops (inputs excluded), a buffer of
        family ``f`` being ``nbytes(f)`` bytes."""
        return max(0, self._largest(self.live, nbytes))

    def host_bytes(self, nbytes: Callable[[str], int]) -> int:
        """Most host-store bytes the pass holds at once in the copies it makes itself."""
        return self._largest(self.held, nbytes)

    def costs(self, price: Callable[[Op], float]) -> list[float]:
        """The cost of each key, ``price`` called once per key."""
        return [price(op) for op in self.priced]

    def time(self, costs: Sequence[float], *, copies: bool = True) -> float:
        """Makespan on four streams: each op starts when its stream is free and the ops it waits
        for have finished, in issue order per stream; ``copies=False`` makes copies free."""
        if not copies:
            costs = [0.0 if moves else cost for cost, moves in zip(costs, self.moves, strict=True)]
        end = [0.0] * len(self.streams)
        free = [0.0] * len(_STREAMS)
        done = 0.0
        for index, (stream, deps, key, waited) in enumerate(
            zip(self.streams, self.deps, self.keys, self.waited, strict=True)
        ):
            start = 0.0
            for dep in deps:
                if end[dep] > start:
                    start = end[dep]
            if stream == _FREE:
                end[index] = start
                continue
            if free[stream] > start:
                start = free[stream]
            finish = end[index] = free[stream] = start + costs[key]
            if waited and finish > done:
                done = finish
        return done
