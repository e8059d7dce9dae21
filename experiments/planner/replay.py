"""FPDT schedules compiled once for the planner's time replays.

One planner estimate replays the same few schedules several times (the step time with and
without copy costs, for the saving and no-grad forwards and the backward), and the planning table
asks for estimates at many chunk counts. A schedule at hundreds of chunks has hundreds of
thousands of ops, so walking its op objects per replay made the planner take minutes.

A :class:`Program` is what the time replay needs from a schedule, with the costs left as
parameters: per op its stream, the ops it waits for and a cost key; one representative op per
key is priced by the caller. Its makespan is the one a walk over the ops gives, to the float: the
same sums and maxima in the same order. (Memory needs no replay of ops: see
:class:`parallel.schedule.Residency`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from parallel.schedule import Kind, Op, Schedule, Stream, buffer_family

_STREAMS = {stream: index for index, stream in enumerate(Stream)}
_FREE = -1  # stream index of a free: it occupies no stream
_MOVES = (Kind.FETCH, Kind.OFFLOAD)


@dataclass(frozen=True)
class Program:
    streams: tuple[int, ...]  # per op: its stream's index, or _FREE
    deps: tuple[tuple[int, ...], ...]  # per op: the ops it waits for
    keys: tuple[int, ...]  # per op: index of its cost in the caller's cost list
    waited: tuple[bool, ...]  # per op: whether the caller waits for it (see time())
    priced: tuple[Op, ...]  # one op per cost key, in key order
    moves: tuple[bool, ...]  # per cost key: a host-device copy

    @classmethod
    def of(cls, sched: Schedule) -> Program:
        streams, keys, waited = [], [], []
        key_of: dict[tuple, int] = {}
        priced: list[Op] = []
        for op in sched.ops:
            kind = op.kind
            if kind == Kind.FREE:
                streams.append(_FREE)
                keys.append(-1)
                waited.append(False)
                continue
            moves = kind in _MOVES
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
            waited.append(kind != Kind.OFFLOAD or op.reads[0] in sched.inputs)
        return cls(
            streams=tuple(streams),
            deps=tuple(op.deps for op in sched.ops),
            keys=tuple(keys),
            waited=tuple(waited),
            priced=tuple(priced),
            moves=tuple(op.kind in _MOVES for op in priced),
        )

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
