"""Host memory for offloaded chunks: a pool of (pinned) buffers allocated once per shape.

A buffer is taken with :meth:`HostStore.acquire` when a chunk is offloaded and given back
with :meth:`HostStore.release` when the backward no longer needs it, so the same buffers serve
every chunk, layer and step (``allocations`` stops growing after the first step). On CUDA the
buffers are pinned, so copies are asynchronous; each buffer remembers an event recorded after
the last host-to-device copy that read it, and a later device-to-host copy into it waits for
that event on its stream (no host synchronisation). Without CUDA the buffers are plain CPU
tensors and the copies are synchronous.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_allocating_on_host = contextvars.ContextVar("allocating_on_host", default=False)


@contextlib.contextmanager
def host_allocation():
    """Mark tensors allocated inside as host memory by design (offload buffers, host checkpoints).

    On a CPU-only run every tensor is in host memory, so memory accounting (the simulated device
    of ``experiments.memory``) needs to be told which ones stand for host memory.
    """
    token = _allocating_on_host.set(True)
    try:
        yield
    finally:
        _allocating_on_host.reset(token)


def allocating_on_host() -> bool:
    """True inside :func:`host_allocation`."""
    return _allocating_on_host.get()


def _pack_to_host(t: torch.Tensor):
    with host_allocation():
        return t.detach().clone()


def _unpack_from_host(t: torch.Tensor) -> torch.Tensor:
    return t.clone()  # the "host-to-device" copy back


@contextlib.contextmanager
def saved_tensors_on_host():
    """Keep the tensors autograd saves inside this block in host memory until the backward.

    On CUDA this is ``torch.autograd.graph.save_on_cpu(pin_memory=True)``. On a CPU-only run the
    same data movement is simulated: each saved tensor is copied into a host-marked buffer (see
    :func:`host_allocation`) and copied back when the backward needs it, so memory accounting
    sees what a GPU run would hold on the device and on the host.
    """
    if torch.cuda.is_available():
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack_to_host, _unpack_from_host):
        yield


class HostBuffer:
    """One host tensor plus the event that says when its last reader finished (CUDA)."""

    __slots__ = ("tensor", "_event")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self._event = None

    def mark_read(self) -> None:
        """Call on the stream that just issued a copy out of this buffer (CUDA only)."""
        event = torch.cuda.Event()
        event.record()
        self._event = event

    def wait_writable(self) -> None:
        """Make the current CUDA stream wait until earlier readers are done."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)


class HostStore:
    """Pool of host buffers keyed by ``(shape, dtype)``; pinned when CUDA is available."""

    def __init__(self, pin_memory: bool | None = None):
        available = torch.cuda.is_available()
        self.pin_memory = available if pin_memory is None else (pin_memory and available)
        self._free: dict[tuple, list[HostBuffer]] = {}
        self._owned: set[int] = set()
        self.allocations = 0
        self.bytes_allocated = 0
        self.bytes_in_use = 0
        self.peak_bytes_in_use = 0

    def acquire(self, shape, dtype: torch.dtype) -> HostBuffer:
        key = (tuple(shape), dtype)
        free = self._free.get(key)
        if free:
            buf = free.pop()
        else:
            with host_allocation():
                buf = HostBuffer(torch.empty(key[0], dtype=dtype, pin_memory=self.pin_memory))
            self.allocations += 1
            self.bytes_allocated += buf.tensor.nbytes
            self._owned.add(buf.tensor.untyped_storage().data_ptr())
        self.bytes_in_use += buf.tensor.nbytes
        self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.bytes_in_use)
        return buf

    def release(self, buf: HostBuffer) -> None:
        self.bytes_in_use -= buf.tensor.nbytes
        self._free.setdefault((tuple(buf.tensor.shape), buf.tensor.dtype), []).append(buf)

    def owns(self, tensor_or_storage) -> bool:
        """True if this storage is one of the store's buffers (for memory accounting)."""
        st = tensor_or_storage
        if isinstance(st, torch.Tensor):
            st = st.untyped_storage()
        return st.data_ptr() in self._owned

    def clear(self) -> None:
        """Drop the idle buffers (the ones in use stay allocated)."""
        for bufs in self._free.values():
            for buf in bufs:
                self._owned.discard(buf.tensor.untyped_storage().data_ptr())
                self.bytes_allocated -= buf.tensor.nbytes
        self._free.clear()

    def __repr__(self) -> str:
        return (
            f"HostStore(pinned={self.pin_memory}, allocations={self.allocations}, "
            f"bytes_allocated={self.bytes_allocated}, bytes_in_use={self.bytes_in_use})"
        )


_default: HostStore | None = None


def default_host_store() -> HostStore:
    """The process-wide store the FPDT blocks use unless given one."""
    global _default
    if _default is None:
        _default = HostStore()
    return _default
