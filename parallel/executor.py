"""Runs a :class:`~parallel.schedule.Schedule`: CUDA streams ordered by events, or in order on CPU.

On CUDA each op is issued on its stream (compute = the caller's current stream, plus one
host-to-device, one device-to-host and one communication stream per device, created once:
:func:`side_streams`) after ``wait_event`` on the events of its dependencies on other streams;
an event is recorded after it. The host waits for the device only to bound how far it runs
ahead (after each attention block, for the one issued ``max_blocks_ahead`` blocks before it,
see :func:`run_schedule`), and nothing joins whole streams: a side-stream op that touches one
of the caller's buffers (the schedule's inputs and outputs) first waits for an event recorded on
the caller's stream when the run starts, and at the end the caller's stream waits only for the
ops that wrote the outputs or read the caller's inputs on other streams. A buffer an earlier
run wrote (the forward's offloads, read by the backward) is waited for through that run's
events, which :func:`run_schedule` returns. So the last offload of a forward overlaps what the
caller does next, and the first fetches of a backward wait for the forward's copies, not for
the caller's stream. Tensors that cross streams are protected from early reuse by :class:`Env`
(``record_stream``); device memory for the side streams comes from :class:`DeviceBuffers`.

On CPU the ops run in schedule order, synchronously.

A :class:`Timeline` records every op's start/end (CUDA timing events, or ``perf_counter``; on
CUDA the frees, host-side drops of a reference, are left out) so copy/compute overlap can be
printed or plotted; reading a CUDA timeline synchronises once, after the run.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable

import torch

from .schedule import HOST, Kind, Op, Schedule, Stream
from .tensors import storage_key

# The CUDA calls of this module go through this name, so a CPU test can put a fake in its place
# and check the ordering the executor sets up.
_cuda = torch.cuda

_side_streams: dict[int, dict[Stream, object]] = {}


def side_streams(device: torch.device) -> dict[Stream, torch.cuda.Stream]:
    """The ``H2D``, ``D2H`` and ``COMM`` streams of a CUDA ``device``, created once per process.

    The FPDT pipeline and the host checkpoint hooks (:mod:`parallel.host_store`) share them, so
    their copies are ordered with each other.
    """
    index = device.index if device.index is not None else _cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = {s: _cuda.Stream(device=index) for s in (Stream.H2D, Stream.D2H, Stream.COMM)}
    return _side_streams[index]


def current_stream(device=None):
    """The current CUDA stream (of ``device``)."""
    return _cuda.current_stream(device)


def use_stream(stream):
    """Context manager: make ``stream`` the current stream."""
    return _cuda.stream(stream)


def record_event(stream=None):
    """A CUDA event recorded now on ``stream`` (default: the current stream)."""
    event = _cuda.Event()
    event.record(stream)
    return event


def wait_events(stream, events: Iterable) -> None:
    """Make ``stream`` wait for each event (no host synchronisation)."""
    for event in events:
        stream.wait_event(event)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


class Env:
    """Named device buffers of one run. On CUDA every access from a stream records the
    tensors on that stream, so freeing them never lets the allocator hand their memory to
    another stream while this one still uses it. A buffer dropped or replaced gives its
    :class:`DeviceBuffers` slots back (``buffers``, set for the duration of a run)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.buffers: DeviceBuffers | None = None
        self._d: dict[str, object] = {}

    def _touch(self, value) -> None:
        if self.cuda:
            stream = current_stream()
            for t in _tensors(value):
                if t.is_cuda:
                    t.record_stream(stream)

    def _drop(self, value, keep=()) -> None:
        if self.buffers is None or value is None:
            return
        kept = {id(t) for t in _tensors(keep)}
        for t in _tensors(value):
            if id(t) not in kept:
                self.buffers.release(t)

    def read(self, name: str):
        value = self._d[name]
        self._touch(value)
        return value

    def write(self, name: str, value) -> None:
        self._touch(value)
        self._drop(self._d.get(name), keep=value)
        self._d[name] = value

    def pop(self, name: str):
        value = self._d.pop(name)
        self._drop(value)
        return value

    def __contains__(self, name: str) -> bool:
        return name in self._d

    def names(self) -> list[str]:
        return sorted(self._d)


def _device_key(device: torch.device) -> tuple:
    index = device.index if device.index is not None or device.type != "cuda" else _cuda.current_device()
    return device.type, index


# Free slots a run handed over to the next run on the device (DeviceBuffers.park).
_parked: dict[tuple, dict[tuple[int, torch.dtype], list]] = {}


class DeviceBuffers:
    """One run's device memory for the work on side streams, allocated when the run starts on
    the caller's stream.

    Why: the CUDA caching allocator reuses a freed block only on the stream that allocated it.
    Buffers allocated on side streams (fetch destinations, all-to-all and RoPE outputs and
    temporaries) would stay reserved in per-stream pools the compute stream cannot use, so
    reserved memory would be the sum of the pools, not their maximum. Here every block comes from
    the caller's pool, once per run, and side streams allocate nothing (FSDP2 reuses its
    all-gather buffers the same way: a ring reused after an event wait).

    Slots (fetch destinations, all-to-all outputs): ``slots`` maps ``(numel, dtype)`` to how many
    the run holds at once; :meth:`take` views one as any shape with that many elements. A taken
    slot is given back by :class:`Env` when its buffer is freed or replaced (:meth:`release`)
    and is free again, with the events of the ops that used it, after :meth:`settle` (called by
    the executor after each op); the next stream to take it first waits for those events (the
    first user: for the allocation on the caller's stream). A slot is never freed during the run,
    so its reuse is ordered by events alone. Should the ring run dry (it is sized from the
    schedule, so it does not), a slot is added on the caller's stream and counted in ``grown``.

    Handing over: :meth:`park` keeps the free slots, with their events, for the next run on the
    device, which takes them instead of allocating (one parked set per device; the next run
    drops the ones it does not need). A saving forward parks its slots; when the next run is its
    backward (the last block's, or a block recomputed under activation checkpointing), the
    backward's first fetches wait for the forward's last uses of them, not for the caller's
    stream at the backward's start (as slots fresh from the caller's pool must).

    Scratch regions: ``scratch`` maps a name to a byte count; :meth:`scratch` views the bytes of a
    region from an offset as any shape and dtype that fits. A region serves one stream (the
    communication stream), whose ops run in order, so consecutive ops reuse it without events,
    and one op may lay out several things in it (the caller keeps the views it uses at once
    disjoint).

    On CPU the same bookkeeping runs without events.
    """

    def __init__(self, device: torch.device, slots: dict[tuple[int, torch.dtype], int], scratch: dict[str, int]):
        self.device = device
        self.cuda = device.type == "cuda"
        self._caller = current_stream(device) if self.cuda else None
        parked = _parked.pop(_device_key(device), {})
        kept = {key: list(parked.get(key, ()))[:n] for key, n in slots.items()}
        made = {
            key: [torch.empty(key[0], dtype=key[1], device=device) for _ in range(n - len(kept[key]))]
            for key, n in slots.items()
        }
        self._regions = {name: torch.empty(n, dtype=torch.uint8, device=device) for name, n in scratch.items()}
        self._ready = [record_event(self._caller)] if self.cuda else []  # after the allocations
        # take() hands out the slot given back longest ago (parked ones first, then new ones):
        # its users are the likeliest to be done, so the taker rarely waits. The newest would make
        # e.g. a fetch wait for the offload that has just given its slot back.
        self._free = {key: deque(kept[key] + [(t, self._ready) for t in made[key]]) for key in slots}
        self._taken: dict[int, tuple[torch.Tensor, tuple]] = {}
        self._pending: list[tuple[torch.Tensor, tuple]] = []
        self._region_streams: set = set()
        self.grown = 0

    @property
    def nbytes(self) -> int:
        """Bytes held: every slot and region."""
        slots = [t for ts in self._free.values() for t, _ in ts]
        slots += [t for t, _ in self._taken.values()] + [t for t, _ in self._pending]
        return sum(t.nbytes for t in slots) + sum(r.numel() for r in self._regions.values())

    def park(self) -> None:
        """Hand the free slots to the next run on this device (see the class docstring)."""
        _parked[_device_key(self.device)] = {key: free for key, free in self._free.items() if free}
        self._free = {}

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A free slot viewed as ``shape``, usable on the current stream."""
        key = (math.prod(shape), dtype)
        free = self._free.setdefault(key, deque())
        if free:
            t, events = free.popleft()
        else:
            self.grown += 1
            warnings.warn(f"no free device slot of {key}: adding one (ring too small)", RuntimeWarning, stacklevel=2)
            with use_stream(self._caller) if self.cuda else contextlib.nullcontext():
                t = torch.empty(key[0], dtype=dtype, device=self.device)
                events = [record_event(self._caller)] if self.cuda else []
        if self.cuda:
            wait_events(current_stream(self.device), events)
        self._taken[storage_key(t)] = (t, key)
        return t.view(shape)

    def release(self, tensor: torch.Tensor) -> None:
        """Give back the slot ``tensor`` views (a no-op for other tensors); free after :meth:`settle`."""
        entry = self._taken.pop(storage_key(tensor), None)
        if entry is not None:
            self._pending.append(entry)

    def settle(self, events: Iterable) -> None:
        """Slots released since the last call are free once ``events`` (their users) complete."""
        events = list(events)
        for t, key in self._pending:
            self._free[key].append((t, events))
        self._pending.clear()

    def scratch(self, name: str, shape, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """Region ``name`` from byte ``offset`` on, viewed as ``shape``/``dtype``, for the current
        stream. ``offset`` must be a multiple of ``dtype``'s size."""
        region = self._regions[name]
        nbytes = math.prod(shape) * dtype.itemsize
        if offset % dtype.itemsize:
            raise ValueError(f"scratch offset {offset} is not a multiple of {dtype}'s {dtype.itemsize} bytes")
        if offset + nbytes > region.numel():
            asked = f"{nbytes} asked" + (f" from byte {offset}" if offset else "")
            raise ValueError(f"scratch region {name!r} holds {region.numel()} bytes, {asked}")
        if self.cuda:
            stream = current_stream(self.device)
            if stream not in self._region_streams:
                self._region_streams.add(stream)
                wait_events(stream, self._ready)
                for r in self._regions.values():
                    r.record_stream(stream)  # freed after the run: reuse waits for this stream
        return region[offset : offset + nbytes].view(dtype).view(shape)


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
    buffers: DeviceBuffers | None = None,
    ready: dict[str, object] | None = None,
    timeline: Timeline | None = None,
    label: str = "",
    max_blocks_ahead: int = 2,
) -> dict[str, object]:
    """Execute ``schedule`` by calling ``handlers[op.kind](op)`` on the op's stream.

    ``buffers``: the run's :class:`DeviceBuffers` (settled after each op). ``ready``: what an
    earlier run returned, for the buffers it wrote that this one reads. ``timeline``: records
    the ops under ``label`` (default: the schedule's direction). ``max_blocks_ahead``: on CUDA,
    after issuing an attention block the host waits for the one issued that many blocks before
    it. Returns the event of the last writer of every buffer this run wrote (empty on CPU).
    """
    label = label or schedule.direction
    if device.type != "cuda":
        for op in schedule.ops:
            start = timeline._start(False) if timeline else None
            handlers[op.kind](op)
            if timeline:
                timeline.add(label, op, start, timeline._end(False))
            if buffers is not None:
                buffers.settle(())
        return {}
    caller = current_stream(device)
    streams = {Stream.COMPUTE: caller, **side_streams(device)}
    start = record_event(caller)
    ready = dict(ready or {})
    # The caller's buffers: a side stream touches them only after the caller's work so far.
    owned = {n for n in schedule.inputs | schedule.outputs if not n.startswith(HOST) and n not in ready}
    ops, events = schedule.ops, [None] * len(schedule.ops)
    last_write: dict[str, int] = {}
    touched_owned: dict[Stream, int] = {}  # per side stream, its last op that touched them
    waited: set[tuple[Stream, int]] = set()
    in_flight: deque = deque()

    def latest_per_stream(indices) -> list:
        """The events of the last of ``indices`` on each stream (events on one stream are ordered)."""
        latest: dict[Stream, int] = {}
        for d in indices:
            if events[d] is not None:  # FREE ops record none
                latest[ops[d].stream] = max(d, latest.get(ops[d].stream, -1))
        return [events[d] for d in latest.values()]

    for op in ops:
        if op.kind == Kind.FREE:  # host-side drop of a reference; Env made it stream-safe
            handlers[op.kind](op)
            if buffers is not None:
                buffers.settle(latest_per_stream(op.deps))
            continue
        stream = streams[op.stream]
        waits = latest_per_stream(d for d in op.deps if ops[d].stream != op.stream)
        for name in op.reads + op.writes:
            if name in last_write:  # made in this run: its writer is a dependency
                continue
            if name in ready and name in op.reads:
                waits.append(ready[name])
            elif name in owned and op.stream != Stream.COMPUTE:
                waits.append(start)
        for event in waits:
            if (op.stream, id(event)) not in waited:
                waited.add((op.stream, id(event)))
                stream.wait_event(event)
        with use_stream(stream):
            t0 = timeline._start(True) if timeline else None
            handlers[op.kind](op)
            if timeline:
                timeline.add(label, op, t0, timeline._end(True))
            events[op.index] = record_event(stream)
        for name in op.writes:
            last_write[name] = op.index
        if op.stream != Stream.COMPUTE and any(n in owned for n in op.reads + op.writes):
            touched_owned[op.stream] = op.index
        if buffers is not None:
            buffers.settle(latest_per_stream([*op.deps, op.index]))
        if op.kind in (Kind.ATTN_FWD, Kind.ATTN_BWD):
            # Bounded run-ahead (like FSDP's rate limiter): the host waits for the block issued
            # `max_blocks_ahead` blocks ago, never for the whole device. Without it the host
            # could issue every fetch of the pass at once, and memory freed by the schedule
            # would not be reusable until the device caught up.
            in_flight.append(events[op.index])
            if len(in_flight) > max_blocks_ahead:
                in_flight.popleft().synchronize()
    # The caller reads the outputs and may reuse its inputs: it waits for those ops only.
    finals = {last_write[n] for n in schedule.outputs if n in last_write} | set(touched_owned.values())
    wait_events(caller, latest_per_stream(d for d in finals if ops[d].stream != Stream.COMPUTE))
    return {name: events[i] for name, i in last_write.items()}
