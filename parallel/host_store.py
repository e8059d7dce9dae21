"""Host memory for offloaded chunks and host-kept checkpoints: pools of (pinned) buffers.

A buffer is taken with :meth:`HostStore.acquire` when a chunk is offloaded and given back
with :meth:`HostStore.release` when the backward no longer needs it, so the same buffers serve
every chunk, layer and step (``allocations`` stops growing after the first step). On CUDA the
buffers are pinned, so copies are asynchronous; each :class:`HostBuffer` keeps the CUDA events
of its last write and of the reads since, and a copy into or out of it first makes its stream
wait for the ones it must follow (no host synchronisation). Without CUDA the buffers are plain
CPU tensors and the copies are synchronous.

Pinned memory comes from PyTorch's caching host allocator, which reserves the next power of two
of every request (:func:`pinned_reserved_bytes`): up to twice the bytes asked, 1.6x for a buffer
of 5 * 2^k bytes. So the store lays its buffers out twice. The first time a shape is needed, its
buffer is an allocation of its own ("loose"). Once every buffer is back (the end of a step) and
loose ones exist, the next :meth:`~HostStore.acquire` re-lays all of them out as exact-size views
carved from a few larger allocations, packed so that the powers of two those reserve waste little
(:meth:`~HostStore.compact`), if that reserves fewer bytes. From then on the store reserves within
a few percent of what its buffers hold, however their sizes fall.

:func:`saved_tensors_on_host` keeps the tensors autograd saves (activation checkpoints) in the
same store, copied on the device-to-host stream the FPDT pipeline uses.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import warnings
import weakref

import torch

from .executor import current_stream, record_event, side_streams, use_stream, wait_events
from .schedule import Stream
from .tensors import storage_key

_allocating_on_host = contextvars.ContextVar("allocating_on_host", default=False)


@contextlib.contextmanager
def host_allocation():
    """Mark tensors allocated inside as host memory by design (offload buffers, host checkpoints).

    On a CPU-only run every tensor is in host memory, so memory accounting (the simulated device
    of ``experiments.core.memory``) needs to be told which ones stand for host memory.
    """
    token = _allocating_on_host.set(True)
    try:
        yield
    finally:
        _allocating_on_host.reset(token)


def allocating_on_host() -> bool:
    """True inside :func:`host_allocation`."""
    return _allocating_on_host.get()


def pinned_reserved_bytes(nbytes: int) -> int:
    """Bytes PyTorch's pinned host allocator reserves for a request of ``nbytes``: the next power
    of two (``CachingHostAllocator``: ``roundSize = PowerOf2Ceil(size)``)."""
    return nbytes if nbytes <= 1 else 1 << (nbytes - 1).bit_length()


# Where a buffer starts inside a shared allocation: a multiple of every dtype's size, and of the
# CUDA caching allocator's 512-byte rounding, so a carved view is aligned like an allocation.
ALIGN = 512


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def pack_bins(sizes: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Lay buffers of ``sizes`` bytes out in allocations whose pinned reservations sum the least.

    First-fit decreasing into bins of one capacity, for each power of two from the largest
    buffer's to the total's; a bin is then allocated at the bytes it holds (the allocator rounds
    that up to a power of two). Returns the bins' bytes and, per buffer in the order given,
    ``(bin, offset)``; offsets are multiples of :data:`ALIGN`.
    """
    if not sizes:
        return [], []
    order = sorted(range(len(sizes)), key=lambda k: -sizes[k])
    total = sum(_aligned(n) for n in sizes)
    best = None
    cap = pinned_reserved_bytes(max(1, _aligned(sizes[order[0]])))
    while True:
        bins: list[int] = []
        where = [(0, 0)] * len(sizes)
        for k in order:
            n = _aligned(sizes[k])
            b = next((b for b, used in enumerate(bins) if cap - used >= n), None)
            if b is None:
                b = len(bins)
                bins.append(0)
            where[k] = (b, bins[b])
            bins[b] += n
        cost = sum(pinned_reserved_bytes(used) for used in bins)
        if best is None or cost < best[0]:
            best = (cost, bins, where)
        if cap >= total:
            return best[1], best[2]
        cap *= 2


class HostBuffer:
    """One host tensor, the bytes it reserves (``nbytes``: its allocation's reservation, or its
    aligned share of a shared one), and on CUDA the event of its last write and those of the
    reads since."""

    __slots__ = ("tensor", "nbytes", "_written", "_reads", "_block")

    def __init__(self, tensor: torch.Tensor, nbytes: int | None = None):
        self.tensor = tensor
        self.nbytes = tensor.nbytes if nbytes is None else nbytes
        self._written = None
        self._reads: list = []
        self._block: _Block | None = None

    def before_write(self) -> list:
        """Events a copy into the buffer waits for: the last write and every read since."""
        return self._reads + ([self._written] if self._written is not None else [])

    def before_read(self) -> list:
        """Events a copy out of the buffer waits for: the last write."""
        return [self._written] if self._written is not None else []

    def wrote(self, event) -> None:
        """Record the event after a copy into the buffer."""
        self._written, self._reads = event, []

    def read(self, event) -> None:
        """Record the event after a copy out of the buffer."""
        self._reads.append(event)


def copy_rows(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
    """``dst.copy_(src)`` between host and device, one copy per leading index when ``src`` is a
    slice of contiguous rows (a chunk of a ``[B, S, ...]`` tensor with ``B > 1``): PyTorch copies
    a non-contiguous tensor across devices through a contiguous temporary allocated on the
    current stream, which on a side stream would come from that stream's memory pool."""
    if src.is_contiguous() or src.numel() == 0 or not src[0].is_contiguous():
        dst.copy_(src, non_blocking=non_blocking)
        return
    for k in range(src.shape[0]):
        dst[k].copy_(src[k], non_blocking=non_blocking)


class _Block:
    """One allocation of the store: a loose buffer's own, or a bin that :meth:`HostStore.compact`
    carved several buffers from. ``reserved``: what the allocator holds for it; ``buffers``: how
    many of the store's buffers still view it."""

    __slots__ = ("tensor", "reserved", "buffers", "loose", "key")

    def __init__(self, tensor: torch.Tensor, reserved: int, loose: bool):
        self.tensor, self.reserved, self.buffers, self.loose = tensor, reserved, 0, loose
        # Its storage's id; a zero-byte tensor has no storage to name, and each one must still be
        # a block of its own, so its key is the block itself.
        key = storage_key(tensor)
        self.key = self if key is None else key


class HostStore:
    """Pool of host buffers keyed by ``(shape, dtype)``; pinned when CUDA is available.

    Accounting, in bytes (each is what it says at any time, compactions included):

    * ``bytes_allocated``: what the store's allocations reserve: for a pinned store the power of
      two of each (:func:`pinned_reserved_bytes`), for a pageable one their size;
    * ``pinned_bytes``: what the same allocations reserve when pinned, on any machine: what a
      GPU run reserves for the same requests (equal to ``bytes_allocated`` when pinned);
    * ``buffer_bytes``: what the buffers themselves hold (the bytes asked for);
    * ``bytes_in_use``/``peak_bytes_in_use``: the ``nbytes`` of the buffers handed out.

    ``allocations`` counts buffers made, ``compactions`` the re-layouts (module docstring).
    """

    def __init__(self, pin_memory: bool | None = None):
        available = torch.cuda.is_available()
        if available and pin_memory is False:
            warnings.warn(
                "HostStore(pin_memory=False) on a CUDA machine: copies between the device and pageable "
                "host memory are synchronous (the host waits for each one, nothing overlaps), so every "
                "offload and fetch stalls the pipeline; leave pin_memory unset to pin the buffers",
                UserWarning,
                stacklevel=2,
            )
        self.pin_memory = available if pin_memory is None else (pin_memory and available)
        self._free: dict[tuple, list[HostBuffer]] = {}
        self._buffers: list[HostBuffer] = []  # every buffer made and not dropped, in use or idle
        self._blocks: dict[int | _Block, _Block] = {}  # by storage id (_Block.key)
        self._loose = 0  # loose blocks: while any exist, an idle store may compact
        self._judged_at = -1  # `allocations` when compaction was last found not worth it
        self.allocations = 0
        self.compactions = 0
        self.bytes_in_use = 0
        self.peak_bytes_in_use = 0
        # The buffers handed out (by identity): a buffer released twice, or into another store,
        # would later be handed to two holders at once and one would overwrite the other.
        self._out: set[int] = set()

    @property
    def bytes_allocated(self) -> int:
        return sum(b.reserved for b in self._blocks.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(pinned_reserved_bytes(b.tensor.nbytes) for b in self._blocks.values())

    @property
    def buffer_bytes(self) -> int:
        return sum(buf.tensor.nbytes for buf in self._buffers)

    def _allocate(self, nbytes: int, loose: bool, shape=None, dtype: torch.dtype = torch.uint8) -> _Block:
        with host_allocation():
            tensor = torch.empty(shape if loose else (nbytes,), dtype=dtype, pin_memory=self.pin_memory)
        reserved = pinned_reserved_bytes(tensor.nbytes) if self.pin_memory else tensor.nbytes
        block = _Block(tensor, reserved, loose)
        self._blocks[block.key] = block
        self._loose += loose
        return block

    def acquire(self, shape, dtype: torch.dtype) -> HostBuffer:
        if self.bytes_in_use == 0 and self._loose and self._judged_at != self.allocations:
            self.compact()
        key = (tuple(shape), dtype)
        free = self._free.get(key)
        if free:
            buf = free.pop()
        else:
            block = self._allocate(math.prod(key[0]) * dtype.itemsize, True, key[0], dtype)
            buf = HostBuffer(block.tensor, block.reserved)
            buf._block, block.buffers = block, 1
            self._buffers.append(buf)
            self.allocations += 1
        self.bytes_in_use += buf.nbytes
        self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.bytes_in_use)
        self._out.add(id(buf))
        return buf

    def release(self, buf: HostBuffer) -> None:
        if not isinstance(buf, HostBuffer):
            raise TypeError(f"release takes a HostBuffer from acquire(), got {type(buf).__name__}")
        if id(buf) not in self._out:
            raise ValueError("this buffer is not out of this store: released twice, or acquired from another store")
        self._out.remove(id(buf))
        self.bytes_in_use -= buf.nbytes
        self._free.setdefault((tuple(buf.tensor.shape), buf.tensor.dtype), []).append(buf)

    def compact(self) -> bool:
        """Re-lay every buffer out as views carved from a few shared allocations (:func:`pack_bins`),
        if that reserves fewer pinned bytes than the present layout; True if it did.

        Only while every buffer is back (``bytes_in_use == 0``): their contents are not needed, so
        nothing is copied. On CUDA it first waits for the copies still reading or writing them,
        then frees the old allocations and empties the pinned allocator's cache (which would keep
        them reserved otherwise) before making the new ones, so the two layouts are never held at
        once. :meth:`acquire` calls it when idle while loose buffers exist.
        """
        if self.bytes_in_use:
            raise RuntimeError(f"compact() needs every buffer back; {self.bytes_in_use} bytes are in use")
        self._judged_at = self.allocations
        sizes = [buf.tensor.nbytes for buf in self._buffers]
        bins, where = pack_bins(sizes)
        if sum(pinned_reserved_bytes(n) for n in bins) >= self.pinned_bytes:
            return False
        empty_cache = getattr(torch._C, "_host_emptyCache", None)
        if self.pin_memory and empty_cache is None:
            # Without a way to hand the freed pinned blocks back, the allocator's cache would keep
            # them next to the new layout: the re-layout would hold more host memory, not less.
            return False
        if self.pin_memory:
            for buf in self._buffers:
                for event in buf.before_write():
                    event.synchronize()
        keys = [(tuple(buf.tensor.shape), buf.tensor.dtype) for buf in self._buffers]
        for buf in self._buffers:
            buf.tensor = buf._block = None
        self._blocks.clear()
        self._loose = 0
        if self.pin_memory:
            empty_cache()  # every pinned block freed so far goes back to the system, ours included
        blocks = [self._allocate(n, False) for n in bins]
        for buf, (shape, dtype), nbytes, (b, offset) in zip(self._buffers, keys, sizes, where, strict=True):
            block = blocks[b]
            buf.tensor = block.tensor[offset : offset + nbytes].view(dtype).view(shape)
            buf.nbytes, buf._block = _aligned(nbytes), block
            buf._written, buf._reads = None, []
            block.buffers += 1
        self.compactions += 1
        return True

    def owns(self, tensor_or_storage) -> bool:
        """True if this storage is one of the store's allocations (for memory accounting)."""
        return storage_key(tensor_or_storage) in self._blocks

    def clear(self) -> None:
        """Drop the idle buffers (the ones in use stay allocated), and every allocation no buffer
        views any more."""
        idle = {id(buf) for bufs in self._free.values() for buf in bufs}
        for buf in self._buffers:
            if id(buf) in idle:
                block = buf._block
                block.buffers -= 1
                if block.buffers == 0:
                    del self._blocks[block.key]
                    self._loose -= block.loose
        self._buffers = [buf for buf in self._buffers if id(buf) not in idle]
        self._free.clear()

    def __repr__(self) -> str:
        return (
            f"HostStore(pinned={self.pin_memory}, allocations={self.allocations}, compactions={self.compactions}, "
            f"bytes_allocated={self.bytes_allocated}, pinned_bytes={self.pinned_bytes}, "
            f"buffer_bytes={self.buffer_bytes}, bytes_in_use={self.bytes_in_use})"
        )


_default: HostStore | None = None


def default_host_store() -> HostStore:
    """The process-wide store the FPDT blocks use unless given one."""
    global _default
    if _default is None:
        _default = HostStore()
    return _default


# --- host-kept checkpoints -------------------------------------------------------------------
# The store the CPU hooks of saved_tensors_on_host pack into (set while they run).
_packing_store: contextvars.ContextVar[HostStore | None] = contextvars.ContextVar("packing_store", default=None)


def _pack_to_host(t: torch.Tensor) -> torch.Tensor:
    """CPU: the copy a GPU run makes, into a buffer of the store (host memory by design). Returns
    a view of the buffer that autograd alone holds: the buffer goes back to the store when
    autograd drops it."""
    store = _packing_store.get() or default_host_store()
    buf = store.acquire(t.shape, t.dtype)
    with torch.no_grad():
        buf.tensor.copy_(t)
    packed = buf.tensor.view(buf.tensor.shape)
    weakref.finalize(packed, store.release, buf)
    return packed


def _unpack_from_host(packed: torch.Tensor) -> torch.Tensor:
    return packed.clone()  # the "host-to-device" copy back


def _packing_into(store: HostStore, pack):
    """``pack`` (looked up when called: tests replace it) with ``store`` as the packing store."""

    def hook(t):
        token = _packing_store.set(store)
        try:
            return pack(t)
        finally:
            _packing_store.reset(token)

    return hook


class _Packed:
    """A saved tensor kept in a host buffer; ``prefetched``: its device copy and the event after
    that copy, once one is under way."""

    __slots__ = ("device", "buf", "seq", "prefetched", "__weakref__")

    def __init__(self, device: torch.device, buf: HostBuffer, seq: int):
        self.device, self.buf, self.seq, self.prefetched = device, buf, seq, None


class _HostCheckpoints:
    """Pack/unpack hooks that keep saved ``device_type`` tensors in ``store``.

    Pack: the device-to-host stream waits for the current stream, copies the tensor into a
    buffer of the store (reused across steps), records the event; the tensor is recorded on that
    stream, so autograd may drop it at once. Unpack: copies back on the current stream after
    that event, unless a prefetch did; then it prefetches the checkpoint packed just before this
    one (the one the backward unpacks next, e.g. the previous layer's input under reentrant
    checkpointing) on the host-to-device stream, into memory taken from the current stream's
    pool, so the copy overlaps this layer's recompute and backward. At most one prefetch is in
    flight: one extra checkpoint on the device. A buffer goes back to the store when autograd
    drops the saved tensor.
    """

    def __init__(self, store: HostStore, device_type: str = "cuda"):
        self.store = store
        self.device_type = device_type
        self._packed: list[weakref.ref] = []  # live, not yet unpacked, in pack order
        self._prefetch: weakref.ref | None = None
        self._seq = itertools.count()

    def pack(self, t: torch.Tensor):
        if t.device.type != self.device_type:
            return t
        buf = self.store.acquire(t.shape, t.dtype)
        d2h = side_streams(t.device)[Stream.D2H]
        wait_events(d2h, [record_event(current_stream(t.device))])
        with use_stream(d2h), torch.no_grad():
            wait_events(d2h, buf.before_write())
            copy_rows(buf.tensor, t.detach(), non_blocking=True)
            buf.wrote(record_event(d2h))
        t.record_stream(d2h)
        packed = _Packed(t.device, buf, next(self._seq))
        weakref.finalize(packed, self.store.release, buf)
        self._packed.append(weakref.ref(packed))
        return packed

    def unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self._packed = [r for r in self._packed if r() is not None and r() is not packed]
        caller = current_stream(packed.device)
        if packed.prefetched is not None:
            t, event = packed.prefetched
            packed.prefetched = None
            wait_events(caller, [event])
        else:
            t, _ = self._copy_back(packed, caller, caller)
        self._prefetch_before(packed, caller)
        return t

    def _copy_back(self, packed: _Packed, stream, caller):
        """A device copy of ``packed`` in the caller's pool, copied on ``stream``; and its event."""
        buf = packed.buf
        t = torch.empty(buf.tensor.shape, dtype=buf.tensor.dtype, device=packed.device)
        if stream != caller:  # the block is free on the caller's stream from here on
            wait_events(stream, [record_event(caller)])
        with use_stream(stream):
            wait_events(stream, buf.before_read())
            copy_rows(t, buf.tensor, non_blocking=True)
            event = record_event(stream)
        buf.read(event)
        if stream != caller:
            t.record_stream(stream)
        return t, event

    def _prefetch_before(self, packed: _Packed, caller) -> None:
        busy = self._prefetch() if self._prefetch is not None else None
        if busy is not None and busy.prefetched is not None:
            return
        earlier = [p for p in (r() for r in self._packed) if p is not None and p.seq < packed.seq]
        earlier = [p for p in earlier if p.device == packed.device and p.prefetched is None]
        if earlier:
            nxt = max(earlier, key=lambda p: p.seq)
            nxt.prefetched = self._copy_back(nxt, side_streams(packed.device)[Stream.H2D], caller)
            self._prefetch = weakref.ref(nxt)


_hooks: weakref.WeakKeyDictionary[HostStore, _HostCheckpoints] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def saved_tensors_on_host(store: HostStore | None = None, only: torch.Tensor | None = None):
    """Keep the tensors autograd saves inside this block in host memory until the backward.

    On CUDA they go to ``store`` (default: :func:`default_host_store`) through
    :class:`_HostCheckpoints`: copies on the side streams, pinned buffers reused across steps,
    and the next checkpoint prefetched while the backward of the current one runs. On a CPU-only
    run the same data movement is simulated: each saved tensor is copied into a buffer of the same
    store (host memory by design, see :func:`host_allocation`) and copied back when the backward
    needs it, so memory accounting sees what a GPU run would hold on the device and on the host,
    and the store counts what it would reserve. ``only``: move just the saved tensors that share
    its storage (e.g. an activation), leaving the rest (the weights an op saves with it) where
    they are.
    """
    store = store or default_host_store()
    if not torch.cuda.is_available():
        pack = _packing_into(store, lambda t: _pack_to_host(t))
        unpack = lambda p: _unpack_from_host(p)  # noqa: E731
    else:
        if store not in _hooks:
            _hooks[store] = _HostCheckpoints(store)
        pack, unpack = _hooks[store].pack, _hooks[store].unpack
    if only is not None:  # the others pass through both hooks untouched
        target, moved_pack, moved_unpack = storage_key(only), pack, unpack
        pack = lambda t: (True, moved_pack(t)) if storage_key(t) == target else (False, t)  # noqa: E731
        unpack = lambda p: moved_unpack(p[1]) if p[0] else p[1]  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
