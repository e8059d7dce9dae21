"""Runs a :class:`~parallel.schedule.Schedule`: CUDA streams ordered by events, or in order on CPU.

On CUDA each op is issued on its stream (compute = the caller's current stream, plus one
host-to-device, one device-to-host and one communication stream per device, created once)
after ``wait_event`` on the events of its dependencies on other streams; an event is recorded
after it. Nothing synchronises the host inside a run: at the start the side streams wait for
the caller's stream, at the end the caller's stream waits for them. Tensors that cross streams
are protected from early reuse by :class:`Env` (``record_stream``).

On CPU the ops run in schedule order, synchronously.

A :class:`Timeline` records every op's start/end (CUDA timing events, or ``perf_counter``) so
copy/compute overlap can be printed or plotted; reading a CUDA timeline synchronises once, after
the run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from .schedule import Kind, Op, Schedule, Stream

_side_streams: dict[int, dict[Stream, torch.cuda.Stream]] = {}


def _streams(device: torch.device) -> dict[Stream, object]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = {s: torch.cuda.Stream(device=index) for s in (Stream.H2D, Stream.D2H, Stream.COMM)}
    return {Stream.COMPUTE: torch.cuda.current_stream(index), **_side_streams[index]}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


class Env:
    """Named device buffers of one run. On CUDA every access from a stream records the
    tensors on that stream, so freeing them never lets the allocator hand their memory to
    another stream while this one still uses it."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._d: dict[str, object] = {}

    def _touch(self, value) -> None:
        if self.cuda:
            stream = torch.cuda.current_stream()
            for t in _tensors(value):
                if t.is_cuda:
                    t.record_stream(stream)

    def read(self, name: str):
        value = self._d[name]
        self._touch(value)
        return value

    def write(self, name: str, value) -> None:
        self._touch(value)
        self._d[name] = value

    def pop(self, name: str):
        return self._d.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._d

    def names(self) -> list[str]:
        return sorted(self._d)


class Timeline:
    """Per-op start/end times of one or more runs; ``rows()`` gives milliseconds from the start."""

    def __init__(self):
        self._entries: list[tuple[str, Op, object, object]] = []

    def _start(self, cuda: bool):
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    _end = _start

    def add(self, label: str, op: Op, start, end) -> None:
        self._entries.append((label, op, start, end))

    def rows(self) -> list[dict]:
        """One dict per executed op: label, index, kind, stream, chunk, start_ms, end_ms."""
        if not self._entries:
            return []
        first = self._entries[0][2]
        cuda = not isinstance(first, float)
        if cuda:
            torch.cuda.synchronize()
        rows = []
        for label, op, start, end in self._entries:
            if cuda:
                t0, t1 = first.elapsed_time(start), first.elapsed_time(end)
            else:
                t0, t1 = (start - first) * 1e3, (end - first) * 1e3
            rows.append(
                dict(
                    label=label,
                    index=op.index,
                    kind=op.kind.value,
                    stream=op.stream.value,
                    chunk=op.chunk,
                    start_ms=t0,
                    end_ms=t1,
                )
            )
        return rows

    def ops(self) -> list[tuple[str, Op]]:
        return [(label, op) for label, op, _, _ in self._entries]


def run_schedule(
    schedule: Schedule,
    handlers: dict[Kind, Callable[[Op], None]],
    device: torch.device,
    *,
    timeline: Timeline | None = None,
    label: str = "",
    max_blocks_ahead: int = 2,
) -> None:
    """Execute ``schedule`` by calling ``handlers[op.kind](op)`` on the op's stream."""
    label = label or schedule.direction
    if device.type != "cuda":
        for op in schedule.ops:
            start = timeline._start(False) if timeline else None
            handlers[op.kind](op)
            if timeline:
                timeline.add(label, op, start, timeline._end(False))
        return
    streams = _streams(device)
    caller = streams[Stream.COMPUTE]
    for s in (Stream.H2D, Stream.D2H, Stream.COMM):
        streams[s].wait_stream(caller)
    events: list[torch.cuda.Event | None] = [None] * len(schedule.ops)
    in_flight: deque[torch.cuda.Event] = deque()
    for op in schedule.ops:
        if op.kind == Kind.FREE:  # host-side drop of a reference; Env made it stream-safe
            handlers[op.kind](op)
            continue
        stream = streams[op.stream]
        for d in op.deps:
            if schedule.ops[d].stream != op.stream and events[d] is not None:
                stream.wait_event(events[d])
        with torch.cuda.stream(stream):
            start = timeline._start(True) if timeline else None
            handlers[op.kind](op)
            if timeline:
                timeline.add(label, op, start, timeline._end(True))
            events[op.index] = torch.cuda.Event()
            events[op.index].record(stream)
        if op.kind in (Kind.ATTN_FWD, Kind.ATTN_BWD):
            # Bounded run-ahead (like FSDP's rate limiter): the host waits for the block issued
            # `max_blocks_ahead` blocks ago, never for the whole device. Without it the host
            # could issue every fetch of the pass at once, and memory freed by the schedule
            # would not be reusable until the device caught up.
            in_flight.append(events[op.index])
            if len(in_flight) > max_blocks_ahead:
                in_flight.popleft().synchronize()
    for s in (Stream.H2D, Stream.D2H, Stream.COMM):
        caller.wait_stream(streams[s])
