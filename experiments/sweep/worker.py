"""One rank of a sweep point: build the model, parallelise it, train, measure.

Started by the controller (``experiments.run``) as a fresh process per rank, or run directly
under ``torchrun``. Every rank returns its own measurements; rank 0 gathers them and the
controller turns them into the result row (maxima over ranks where it matters).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

import fpdt_kernels
from parallel import destroy_distributed
from parallel.host_store import allocating_on_host, default_host_store
from parallel.tensors import has_values

from ..core.memory import SHAPES_ONLY_DEVICE, MemoryTracker, ShapesOnly, is_out_of_memory, peak_rss_bytes, start_peak
from ..core.point import Point
from ..core.tables import write_json
from ..core.units import GIB
from ..training.data import data_spec, replica_batch, square_tokens
from ..training.loop import build_model, build_optimizer, clip_and_step, forward_backward, model_config, setup_rank

# The memory tracker of the step in progress, so a failure can report how far memory got.
_active_tracker: MemoryTracker | None = None


def _peak_device_bytes() -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return None if _active_tracker is None else _active_tracker.peak["device"]


def _sync(device: torch.device, world: int) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world > 1:
        dist.barrier()


def measure_steps(point: Point, out_dir: Path) -> dict:
    """Run ``warmup_steps + steps`` training steps on this rank; return its measurements."""
    me = setup_rank(point)
    mesh, device, precision, cuda = me.mesh, me.device, me.precision, me.cuda
    rank, world = mesh.world.rank, mesh.world.size

    cap = None if point.max_device_memory is None else int(point.max_device_memory * GIB)
    host_cap = None if point.max_host_memory is None else int(point.max_host_memory * GIB)
    global _active_tracker
    tracker = _active_tracker = MemoryTracker(
        simulate_device=not cuda, cap_bytes=cap, host_cap_bytes=host_cap, on_host=allocating_on_host
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.mem_get_info(device)[1]), device)

    data = data_spec(point, model_config(point).vocab_size)
    step_times, loss, squares = [], float("nan"), []
    shapes = ShapesOnly(point.fake_tensors)
    with shapes, tracker:
        model = build_model(point, mesh, device, precision)
        optimizer = build_optimizer(model, point)
        start_peak(tracker, device)  # the steps' peak, not the build's
        for step in range(point.warmup_steps + point.steps):
            tokens, labels, cu_seqlens = shapes.batch(replica_batch, data, step, mesh.dp.size, mesh.replica)
            _sync(device, world)
            start = time.perf_counter()
            out = forward_backward(model, point, mesh, precision, device, tokens, labels, cu_seqlens)
            clip_and_step(model, optimizer, None)
            _sync(device, world)
            if step >= point.warmup_steps:
                step_times.append(time.perf_counter() - start)
                if cu_seqlens is not None:  # the attention work of packed documents: sum of length^2
                    squares.append(square_tokens(data, step, mesh.dp.size))
            loss = float(out) if has_values(out) else math.nan

    metrics = {
        "rank": rank,
        "step_times_s": step_times,
        "loss": loss,
        "attention_square_tokens": statistics.mean(squares) if squares else None,
        "rss_peak_bytes": peak_rss_bytes(),
        "host_peak_bytes": tracker.peak["host"],
        "host_store_bytes": default_host_store().bytes_allocated,
        # What the pinned allocator reserves for the store (power-of-two rounding): on a CPU run,
        # what a GPU run would reserve for the same buffers.
        "host_pinned_bytes": default_host_store().pinned_bytes,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        metrics.update(
            device_peak_bytes=torch.cuda.max_memory_allocated(device),
            device_reserved_bytes=torch.cuda.max_memory_reserved(device),
            # Allocations that had to free cached blocks first: fragmentation the peak hides.
            device_alloc_retries=torch.cuda.memory_stats(device).get("num_alloc_retries", 0),
            device_driver_bytes=total - free,
            device_total_bytes=total,
            device_name=torch.cuda.get_device_name(device),
        )
    else:
        metrics.update(
            device_peak_bytes=tracker.peak["device"],
            device_reserved_bytes=None,
            device_alloc_retries=None,
            device_driver_bytes=None,
            device_total_bytes=None,
            device_name=SHAPES_ONLY_DEVICE if point.fake_tensors else f"cpu ({os.cpu_count()} cores, simulated device)",
        )
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, metrics)
        return {"ranks": gathered}
    return {"ranks": [metrics]}


# What a rank raises when another rank failed first: its peer's connection closes under a
# collective (gloo, NCCL), or a collective times out waiting for a hung peer.
_PEER_GONE = re.compile(
    r"connection (closed|reset) by peer|broken pipe|remote process exited|communicator was aborted|timed out waiting",
    re.IGNORECASE,
)


def is_knock_on(exc: BaseException) -> bool:
    """Whether ``exc`` is the consequence of another rank's failure rather than a cause: a lost or
    timed-out peer, or a stop from outside (the launcher's SIGTERM after another rank failed)."""
    return isinstance(exc, (KeyboardInterrupt, dist.DistError)) or bool(_PEER_GONE.search(str(exc)))


@contextlib.contextmanager
def sigterm_ignored():
    """Ignore SIGTERM in this block (main thread only): a rank that has failed is on its way out,
    and torchrun's SIGTERM after another rank's failure must not cut off the file that says why."""
    old = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or old is None:
        yield
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_rank(point: Point, out_dir: str, body: Callable[[dict, Path], dict] = measure_steps) -> None:
    """Run ``body`` (default: :func:`measure_steps`) on this rank; rank 0 writes what it returns
    to ``worker_metrics.json``, a failing rank writes ``rank<r>_error.json`` (what it raised, and
    whether that was only the consequence of another rank's failure)."""
    out = Path(out_dir)
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = body(point, out)
        if rank == 0:
            write_json(out / "worker_metrics.json", result)
        # Leave together: a rank that tears gloo down while its peer still talks aborts the peer.
        if dist.is_initialized():
            dist.barrier()
    except BaseException as exc:
        with sigterm_ignored():
            status = "oom" if is_out_of_memory(exc) else "error"
            message = f"{type(exc).__name__}: {exc}".strip()
            write_json(out / f"rank{rank}_error.json", {"status": status, "error": message[:2000],
                                                        "knock_on": is_knock_on(exc), "time": time.time(),
                                                        "device_peak_bytes": _peak_device_bytes(),
                                                        "traceback": traceback.format_exc()[-8000:]})  # fmt: skip
        raise
    finally:
        destroy_distributed()


def spawn_entry(local_rank: int, point: Point, world: int, port: int, out_dir: str,
                body: Callable[[dict, Path], dict] = measure_steps) -> None:  # fmt: skip
    """``experiments.core.ranks.start_ranks`` target: one process per rank on this machine."""
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ[fpdt_kernels.backend.ENV_VAR] = point.backend
    run_rank(point, out_dir, body)
    # Everything is measured and written. Skip interpreter teardown: gloo's destructors
    # occasionally abort (SIGABRT, "terminate called without an active exception") while the
    # interpreter unwinds, which would turn a finished point into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def summarize(result: dict) -> dict:
    """Reduce the per-rank measurements to the figures of one row (before FLOP accounting)."""
    ranks = result["ranks"]
    times = ranks[0]["step_times_s"]
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9

    def biggest(key):
        values = [r[key] for r in ranks if r.get(key) is not None]
        return max(values) if values else None

    return {
        "step_time_s": statistics.median(times),
        "step_time_p20_s": q[1],
        "step_time_p80_s": q[7],
        "loss": ranks[0]["loss"],
        "attention_square_tokens": ranks[0].get("attention_square_tokens"),
        "device_peak_bytes": biggest("device_peak_bytes"),
        "device_reserved_bytes": biggest("device_reserved_bytes"),
        "device_alloc_retries": biggest("device_alloc_retries"),
        "device_driver_bytes": biggest("device_driver_bytes"),
        "device_total_bytes": biggest("device_total_bytes"),
        "host_peak_bytes": biggest("host_peak_bytes"),
        "host_node_bytes": sum(r["host_peak_bytes"] for r in ranks),
        "host_pinned_bytes": biggest("host_pinned_bytes"),
        "rss_peak_bytes": biggest("rss_peak_bytes"),
        "device_name": ranks[0]["device_name"],
    }
