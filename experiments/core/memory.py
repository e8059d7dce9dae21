"""Memory figures for a training step: CUDA allocator statistics, or a simulated device on CPU.

On CPU there is no device, so :class:`MemoryTracker` plays one: it counts the bytes of
every tensor storage created while it is active and still alive ("live tensor bytes"), except
storages that live in host memory by design (the FPDT offload store, host-kept activation
checkpoints) — those are reported as host memory instead. With ``cap_bytes`` it raises
:class:`SimulatedOutOfMemory` the moment the live bytes exceed the cap, like a GPU would, so
out-of-memory handling and the maximum-sequence-length search work on a laptop.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from parallel.tensors import real_tensors, storage_key

from .paths import REPO
from .units import format_bytes


class SimulatedOutOfMemory(RuntimeError):
    """The simulated device ran out of memory (its message mimics CUDA's)."""


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
        self._ignored = {storage_key(t) for t in ignore}
        self.exclude = exclude

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        return out

    def track(self, tensors) -> None:
        """Count tensors that existed before the mode started (e.g. a model built earlier)."""
        for t in tensors:
            self._track(t)

    def reset_peak(self) -> None:
        self.peak = dict(self.current)

    def _track(self, t: torch.Tensor, func=None) -> None:
        if t.device.type != "cpu":
            return
        key = storage_key(t)
        if key is None:  # a wrapper subclass (FSDP's DTensors): its inner tensors are counted
            return
        st = t.untyped_storage()
        nbytes = st.nbytes()
        if nbytes == 0 or key in self._live or key in self._ignored:
            return
        if self.exclude is not None and self.exclude(st):
            return
        pool = "host" if (not self.simulate_device or self.on_host()) else "device"
        self._live[key] = (pool, nbytes)
        self._allocated(key, t, nbytes, func)
        # PyTorch keeps one Python object per live storage, so this fires when it is freed.
        weakref.finalize(st, self._free, key)
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

    # Hooks for subclasses (RecordingMemoryTracker): a storage counted, a new peak of a pool.
    def _allocated(self, key: int, t: torch.Tensor, nbytes: int, func) -> None:
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


def _site(depth: int = 3) -> str:
    """The innermost ``depth`` frames of this repository's code on the stack (not this module)."""
    frames = []
    for f in reversed(traceback.extract_stack()):
        path = Path(f.filename)
        if path == Path(__file__) or not path.is_relative_to(REPO) or "tests" in path.parts:
            continue
        frames.append(f"{path.relative_to(REPO)}:{f.lineno} {f.name}")
        if len(frames) == depth:
            break
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
        self._peak: list[tuple[Allocation, bool]] = []
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
        self._sites[key] = Allocation(op, tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes, _site())

    def _free(self, key: int) -> None:
        super()._free(key)
        self._sites.pop(key, None)
        self._saved.discard(key)

    def _new_peak(self, pool: str) -> None:
        # Every new peak replaces the last: keep references only, build the records once, at the end.
        if pool == "device":
            self._peak = [(self._sites[k], k in self._saved) for k, (p, _) in self._live.items() if p == "device"]

    @property
    def at_peak(self) -> list[Allocation]:
        """The device storages live at the device peak."""
        return [dataclasses.replace(a, saved=saved) for a, saved in self._peak]


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
