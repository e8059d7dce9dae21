"""Memory figures for a training step: CUDA allocator statistics, or a simulated device on CPU.

On CPU there is no device, so :class:`MemoryTracker` plays one: it counts the bytes of
every tensor storage created while it is active and still alive ("live tensor bytes"), except
storages that live in host memory by design (the FPDT offload store, host-kept activation
checkpoints) — those are reported as host memory instead. With ``cap_bytes`` it raises
:class:`SimulatedOutOfMemory` the moment the live bytes exceed the cap, like a GPU would, so
out-of-memory handling and the maximum-sequence-length search work on a laptop.

Two ways memory changes without a new storage are followed too: a tensor subclass that wraps
others (FSDP2's parameters, gradients and AdamW moments are ``DTensor`` s) is counted through the
local tensors its own dispatch makes, never as itself, and a storage resized in place
(``UntypedStorage.resize_``, how FSDP2 frees and re-allocates its unsharded parameters) counts
its new size.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
    is_traceable_wrapper_subclass_type,
)
from torch.utils._pytree import tree_flatten

from parallel.tensors import eager_under_compile, real_tensors, storage_key

from .paths import REPO
from .units import format_bytes


class SimulatedOutOfMemory(RuntimeError):
    """The simulated device ran out of memory (its message mimics CUDA's)."""


_entered: list[MemoryTracker] = []  # the trackers active now, innermost last
_resize = torch.UntypedStorage.resize_


_metadata_only = 0  # > 0 while DTensor computes an op's global output shape on fake tensors


def _shapes_only(propagate):
    """DTensor's sharding propagation runs each op once more on fake tensors of the *global* shape
    to learn the output's metadata (``ShardingPropagator._propagate_tensor_meta_non_cached``):
    no memory, on any device, so the trackers count nothing it makes."""

    def wrapped(*args, **kwargs):
        global _metadata_only
        _metadata_only += 1
        try:
            return propagate(*args, **kwargs)
        finally:
            _metadata_only -= 1

    return wrapped


_PROPAGATE = "_propagate_tensor_meta_non_cached"
_SHARDING_PROP = "torch.distributed.tensor._sharding_prop"
_propagate = None  # ShardingPropagator's own, once looked up
_sharding_followed = False  # whether ShardingPropagator is patched now


def _follow(on: bool) -> None:
    """Patch in (``on``) or restore what the dispatch mode cannot see by itself."""
    torch.UntypedStorage.resize_ = _resize_followed if on else _resize
    _follow_sharding(on)


def _follow_sharding(on: bool) -> None:
    """Patch DTensor's sharding propagator in or out, if DTensor's package is imported.

    It is not imported for it: most ranks never make a DTensor, and the import (sympy's) costs
    about a second. A DTensor made later imports it first, and its first op reaches the tracker's
    dispatch (modes go before subclasses) before any propagation: the dispatch calls this then."""
    global _propagate, _sharding_followed
    module = sys.modules.get(_SHARDING_PROP)
    if module is None or _sharding_followed == on:
        return
    cls = module.ShardingPropagator
    if _propagate is None:
        _propagate = cls.__dict__.get(_PROPAGATE)
    if _propagate is not None:
        setattr(cls, _PROPAGATE, _shapes_only(_propagate) if on else _propagate)
    _sharding_followed = on


def _resize_followed(storage: torch.UntypedStorage, nbytes: int):
    """``UntypedStorage.resize_`` while a tracker is active: resize, then tell the trackers.

    Storage resizes do not pass through the dispatcher, so no dispatch mode sees them."""
    out = _resize(storage, nbytes)
    for tracker in list(_entered):
        tracker._resized(storage)
    return out


def local_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s memory: ``t`` itself, or the inner tensors of a wrapper
    subclass (a ``DTensor``'s local shard), recursively."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = (getattr(t, name) for name in names)  # a DTensor also names its device mesh
    return [leaf for x in inner if isinstance(x, torch.Tensor) for leaf in local_tensors(x)]


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes by pool, ``device`` and ``host``, while the mode is active.

    ``simulate_device=True`` (a CPU run): CPU tensors are device memory, except those allocated
    while ``on_host()`` is true (the offload store, host-kept checkpoints), which are host
    memory. ``simulate_device=False`` (a CUDA run): CPU tensors are host memory and CUDA tensors
    are left to the CUDA allocator's statistics. ``cap_bytes`` caps the simulated device,
    ``host_cap_bytes`` the host pool (what a node's RAM would have to hold).
    Storages are counted once however many views share them; those of the ``ignore`` tensors and
    those ``exclude(storage)`` rejects (e.g. ``HostStore.owns``, for buffers made before the
    mode) not at all. ``current``/``peak`` are bytes.
    """

    def __init__(
        self,
        simulate_device: bool = True,
        cap_bytes: int | None = None,
        host_cap_bytes: int | None = None,
        on_host: Callable[[], bool] = lambda: False,
        ignore=(),
        exclude: Callable[[torch.UntypedStorage], bool] | None = None,
    ):
        super().__init__()
        self.simulate_device = simulate_device
        self.cap_bytes = cap_bytes
        self.host_cap_bytes = host_cap_bytes
        self.on_host = on_host
        self.current = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}
        self._live: dict[int, tuple[str, int]] = {}
        # Storages made before the mode (inputs, weights): views of them are not new memory.
        self._ignored = {storage_key(local) for t in ignore for local in local_tensors(t)}
        self.exclude = exclude

    def __enter__(self):
        if not _entered:
            _follow(True)
        _entered.append(self)
        try:
            return super().__enter__()
        except BaseException:
            self._leave()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._leave()

    def _leave(self) -> None:
        _entered.remove(self)
        if not _entered:
            _follow(False)

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # True (torch's default) has torch wrap ``__torch_dispatch__`` in its lazy Dynamo disable,
        # which imports Dynamo (about 2 s) at the first tracked op, compiling or not: the only
        # import of it in a rank without an optimizer (torch's optimizers import it themselves).
        # ``eager_under_compile`` below gives the same graph break without the import.
        return False

    @eager_under_compile
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            # A wrapper subclass (DTensor): let its own dispatch run, with this mode active again,
            # so the local tensors it makes come back here as plain ops and are counted there.
            if not _sharding_followed:
                _follow_sharding(True)
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        return out

    def track(self, tensors) -> None:
        """Count tensors that existed before the mode started (e.g. a model built earlier; a
        ``DTensor`` by its local shard)."""
        for t in tensors:
            for local in local_tensors(t):
                self._track(local)

    def reset_peak(self) -> None:
        """The peaks from now on: what is live now, until more is."""
        self.peak = dict(self.current)
        for pool in self.peak:
            self._new_peak(pool)

    def _track(self, t: torch.Tensor, func=None) -> None:
        if t.device.type != "cpu" or _metadata_only:
            return
        key = storage_key(t)
        if key is None:  # a wrapper subclass (FSDP's DTensors): its inner tensors are counted
            return
        if key not in self._live:
            self._count_new(key, t.untyped_storage(), t, func)

    def _count_new(self, key: int, st: torch.UntypedStorage, t: torch.Tensor | None, func) -> None:
        """Count a storage not counted yet, unless it is empty, predates the mode or is excluded."""
        nbytes = st.nbytes()
        if nbytes == 0 or key in self._ignored or (self.exclude is not None and self.exclude(st)):
            return
        pool = self._pool()
        self._live[key] = (pool, nbytes)
        self._allocated(key, t, nbytes, func)
        # PyTorch keeps one Python object per live storage, so this fires when it is freed.
        weakref.finalize(st, self._free, key)
        self._add(pool, nbytes)

    def _pool(self) -> str:
        return "host" if (not self.simulate_device or self.on_host()) else "device"

    def _add(self, pool: str, nbytes: int) -> None:
        self.current[pool] += nbytes
        if self.current[pool] > self.peak[pool]:
            self.peak[pool] = self.current[pool]
            self._new_peak(pool)
        cap, name = (self.cap_bytes, "device") if pool == "device" else (self.host_cap_bytes, "host")
        if cap is not None and self.current[pool] > cap:
            raise SimulatedOutOfMemory(
                f"simulated {name} out of memory: tried to hold {format_bytes(self.current[pool])} of live "
                f"tensors with max_{name}_memory={format_bytes(cap)}"
            )

    def _free(self, key: int) -> None:
        pool, nbytes = self._live.pop(key, ("device", 0))
        self.current[pool] -= nbytes

    def _resized(self, st: torch.UntypedStorage) -> None:
        """A storage was resized in place: a counted one counts its new size (0 after FSDP frees
        it); one not counted yet that grew is new memory, counted like an allocation."""
        if st.device.type not in ("cpu", "meta"):  # meta: a fake tensor's storage
            return
        key = storage_key(st)
        if key in self._live:
            pool, before = self._live[key]
            self._live[key] = (pool, st.nbytes())
            self._add(pool, st.nbytes() - before)
        else:
            self._count_new(key, st, None, "resize_")

    # Hooks for subclasses (RecordingMemoryTracker): a storage counted (``t`` its first view, None
    # for one counted when resized; ``func`` the op that made it), a new peak of a pool.
    def _allocated(self, key: int, t: torch.Tensor | None, nbytes: int, func) -> None:
        pass

    def _new_peak(self, pool: str) -> None:
        pass


SHAPES_ONLY_DEVICE = "cpu (fake tensors: allocations only, no compute; simulated device)"


class ShapesOnly:
    """A training step on fake tensors (``FakeTensorMode``) while active, if ``enabled``.

    Every op allocates its outputs as it would on CPU, so a :class:`MemoryTracker` inside counts
    the same storages at the same moments as in a real CPU run; but no values exist and nothing
    is computed, so a step of a billion-parameter model at a million tokens costs seconds, not
    days (its time, loss and gradients mean nothing). The batch is made from real data and then
    turned fake (:meth:`batch`); ``cu_seqlens`` stays real, because the document boundaries decide
    which blocks run.
    """

    def __init__(self, enabled: bool):
        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if enabled else None

    def __enter__(self):
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return None if self.mode is None else self.mode.__exit__(*exc)

    def batch(self, make: Callable, *args):
        """``make(*args)`` -> ``(tokens, labels, cu_seqlens)``, with tokens and labels fake when enabled."""
        if self.mode is None:
            return make(*args)
        with real_tensors():
            tokens, labels, cu_seqlens = make(*args)
        # The fake copies share one storage as the real views do, and stand for it from here on.
        return self.mode.from_tensor(tokens), self.mode.from_tensor(labels), cu_seqlens


@dataclass(frozen=True)
class Allocation:
    """One storage live at the peak: the op that made it, its first view's shape and dtype, its
    bytes, where in this repository it was allocated (innermost frames first), and whether
    autograd saved it for the backward."""

    op: str
    shape: tuple
    dtype: str
    nbytes: int
    site: str
    saved: bool = False


@functools.cache
def _repository_file(filename: str) -> str | None:
    """``filename`` relative to the repository where allocation sites are reported from it: the
    repository's code, not its tests nor this module. Cached per file: a report looks up tens of
    thousands of stacks."""
    path = Path(filename)
    if path == Path(__file__) or not path.is_relative_to(REPO) or "tests" in path.parts:
        return None
    return str(path.relative_to(REPO))


# The wrapper ``eager_under_compile`` puts around a function (the tracker's dispatch among them)
# only passes the call on: its frames name no allocation site.
_PASS_THROUGH = eager_under_compile(len).__code__


def _site(depth: int = 3) -> str:
    """The innermost ``depth`` frames of this repository's code on the stack (not this module).

    Walks the frames themselves: ``traceback.extract_stack`` reads every frame's source line,
    which made the stack walks most of a memory report's time."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None and len(frames) < depth:
        name = None if frame.f_code is _PASS_THROUGH else _repository_file(frame.f_code.co_filename)
        if name is not None:
            frames.append(f"{name}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(frames) or "(outside the repository)"


class RecordingMemoryTracker(MemoryTracker):
    """A :class:`MemoryTracker` that also records where every storage was allocated and keeps the
    device storages live at the device peak (``at_peak``: ``Allocation`` records). Storages autograd
    saves for the backward are marked ``saved`` (through a ``saved_tensors_hooks`` pair that
    passes tensors through; hooks installed inside, such as host checkpointing, take those they
    see). Slower than the plain tracker (a stack walk per storage): for reports, not timings."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sites: dict[int, Allocation] = {}
        self._saved: set[int] = set()
        self._peak: list[tuple[Allocation, bool, int]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def __enter__(self):
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._hooks.__exit__(*exc)
        return out

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._saved.add(storage_key(t))
        return t

    def _allocated(self, key, t, nbytes, func) -> None:
        op = getattr(func, "__name__", str(func)) if func is not None else "(tracked)"
        shape, dtype = (tuple(t.shape), str(t.dtype).removeprefix("torch.")) if t is not None else ((nbytes,), "uint8")
        self._sites[key] = Allocation(op, shape, dtype, nbytes, _site())

    def _free(self, key: int) -> None:
        super()._free(key)
        self._sites.pop(key, None)
        self._saved.discard(key)

    def _new_peak(self, pool: str) -> None:
        # Every new peak replaces the last: keep references only, build the records once, at the end.
        if pool == "device":
            self._peak = [
                (self._sites[k], k in self._saved, n) for k, (p, n) in self._live.items() if p == "device" and n
            ]

    @property
    def at_peak(self) -> list[Allocation]:
        """The device storages live at the device peak (at their size then: FSDP resizes some)."""
        return [dataclasses.replace(a, saved=saved, nbytes=n) for a, saved, n in self._peak]


def start_peak(tracker: MemoryTracker | None, device: torch.device) -> None:
    """Start the device (and tracked host) peak afresh from what is live now: called once the
    model and optimizer are built, so a step's peak is not the build's (every rank first holds
    the whole model in its parameter dtype, before FSDP shards it), on a CUDA device as in the
    simulated one."""
    if tracker is not None:
        tracker.reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's, the simulated device's, and the CPU allocator's out-of-memory errors."""
    if isinstance(exc, SimulatedOutOfMemory | torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "DefaultCPUAllocator: can't allocate memory" in text
