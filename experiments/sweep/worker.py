"""One rank of a sweep point: build the model, parallelise it, train, measure.

Started by the controller (``experiments.run``) as a fresh process per rank, or run directly
under ``torchrun``. Every rank returns its own measurements; rank 0 gathers them and the
controller turns them into the result row (maxima over ranks where it matters).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import kernels
from models import Transformer
from parallel import destroy_distributed, init_distributed
from parallel.host_store import allocating_on_host, default_host_store
from parallel.parallelize import parallelize, shard_batch

from ..core.dtypes import resolve_dtype
from ..core.memory import MemoryTracker, is_out_of_memory, peak_rss_bytes
from ..core.tables import write_json
from ..core.units import GIB
from .points import model_config

# The memory tracker of the step in progress, so a failure can report how far memory got.
_active_tracker: MemoryTracker | None = None


def _peak_device_bytes() -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return None if _active_tracker is None else _active_tracker.peak["device"]


def _batch(point: dict, vocab: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-length ``(tokens, labels)`` ``[B, S]``, identical on every rank (seeded per step)."""
    B, S = point["batch_size"], point["seq_len"]
    gen = torch.Generator().manual_seed(point["seed"] * 1_000_003 + step)
    if point.get("data_path"):
        data = np.memmap(point["data_path"], dtype=point.get("data_dtype", "uint16"), mode="r")
        if len(data) < S + 1:
            raise ValueError(f"data.path has {len(data)} tokens; seq_len={S} needs at least {S + 1}")
        starts = torch.randint(0, len(data) - S, (B,), generator=gen).tolist()
        windows = torch.from_numpy(np.stack([np.asarray(data[s : s + S + 1], dtype=np.int64) for s in starts]))
        if int(windows.max()) >= vocab:
            raise ValueError(f"data.path holds token id {int(windows.max())} >= the model's vocab_size={vocab}")
    else:
        windows = torch.randint(0, vocab, (B, S + 1), generator=gen)
    return windows[:, :-1], windows[:, 1:]


def _sync(device: torch.device, world: int) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world > 1:
        dist.barrier()


def train(point: dict) -> dict:
    """Run ``warmup_steps + steps`` training steps on this rank; return its measurements."""
    group = init_distributed(timeout_s=point["timeout_s"])
    rank, world = group.rank, group.size
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        # Ranks share the cores: without this each would start a full thread pool.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    kernels.set_backend(point["backend"])
    dtype = resolve_dtype(point["dtype"], cuda)
    torch.manual_seed(point["seed"])

    cap = None if point["max_device_memory"] is None else int(point["max_device_memory"] * GIB)
    global _active_tracker
    tracker = _active_tracker = MemoryTracker(simulate_device=not cuda, cap_bytes=cap, on_host=allocating_on_host)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.mem_get_info(device)[1]), device)

    overrides = dict(
        chunked_mlp=point["chunked_mlp"],
        chunked_loss=point["chunked_loss"],
        mlp_tile=point["mlp_tile"],
        loss_tile=point["loss_tile"],
        checkpoint=point["activation_checkpointing"],
        checkpoint_on_host=point["checkpoint_on_host"],
    )
    cfg = model_config(point, **overrides)
    step_times, loss = [], float("nan")
    with tracker:
        model = Transformer(cfg).to(device=device, dtype=dtype)
        model = parallelize(
            model,
            point["strategy"],
            group=group,
            chunks=point["chunks"],
            offload=point["offload"],
            fsdp=point["fsdp"],
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=point["lr"])
        for step in range(point["warmup_steps"] + point["steps"]):
            tokens, labels = _batch(point, cfg.vocab_size, step)
            tokens, labels, positions = shard_batch(
                tokens, labels, point["strategy"], chunks=point["chunks"], group=group
            )
            tokens, labels, positions = (t.to(device) for t in (tokens, labels, positions))
            _sync(device, world)
            start = time.perf_counter()
            out = model(tokens, labels=labels, positions=positions)
            out.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device, world)
            if step >= point["warmup_steps"]:
                step_times.append(time.perf_counter() - start)
            loss = float(out.detach())
            del out

    metrics = {
        "rank": rank,
        "step_times_s": step_times,
        "loss": loss,
        "rss_peak_bytes": peak_rss_bytes(),
        "host_peak_bytes": tracker.peak["host"],
        "host_store_bytes": default_host_store().bytes_allocated,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        metrics.update(
            device_peak_bytes=torch.cuda.max_memory_allocated(device),
            device_reserved_bytes=torch.cuda.max_memory_reserved(device),
            device_driver_bytes=total - free,
            device_total_bytes=total,
            device_name=torch.cuda.get_device_name(device),
        )
    else:
        metrics.update(
            device_peak_bytes=tracker.peak["device"],
            device_reserved_bytes=None,
            device_driver_bytes=None,
            device_total_bytes=None,
            device_name=f"cpu ({os.cpu_count()} cores, simulated device)",
        )
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, metrics, group=group.group)
        return {"ranks": gathered}
    return {"ranks": [metrics]}


def run_rank(point: dict, out_dir: str) -> None:
    """Train; rank 0 writes ``worker_metrics.json``, a failing rank writes ``rank<r>_error.json``."""
    out = Path(out_dir)
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = train(point)
        if rank == 0:
            write_json(out / "worker_metrics.json", result)
        # Leave together: a rank that tears gloo down while its peer still talks aborts the peer.
        if dist.is_initialized():
            dist.barrier()
    except BaseException as exc:
        status = "oom" if is_out_of_memory(exc) else "error"
        message = f"{type(exc).__name__}: {exc}".strip()
        write_json(out / f"rank{rank}_error.json", {"status": status, "error": message[:2000],
                                                    "device_peak_bytes": _peak_device_bytes(),
                                                    "traceback": traceback.format_exc()[-8000:]})  # fmt: skip
        raise
    finally:
        destroy_distributed()


def spawn_entry(local_rank: int, point: dict, world: int, port: int, out_dir: str) -> None:
    """``torch.multiprocessing`` target: one fresh process per rank on this machine."""
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ[kernels.backend.ENV_VAR] = point["backend"]
    run_rank(point, out_dir)
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
        "device_peak_bytes": biggest("device_peak_bytes"),
        "device_reserved_bytes": biggest("device_reserved_bytes"),
        "device_driver_bytes": biggest("device_driver_bytes"),
        "device_total_bytes": biggest("device_total_bytes"),
        "host_peak_bytes": biggest("host_peak_bytes"),
        "host_node_bytes": sum(r["host_peak_bytes"] for r in ranks),
        "rss_peak_bytes": biggest("rss_peak_bytes"),
        "device_name": ranks[0]["device_name"],
    }
