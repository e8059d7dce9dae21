"""One rank of ``python -m experiments.train``: the training loop with logging and checkpoints.

Rank 0 appends one row per step to ``train.csv`` in the run directory (the columns of
:data:`TRAIN_FIELDS`, written and flushed as each step ends) and prints a progress line every
``log_every`` steps. Checkpoints go to ``checkpoint.dir`` every ``checkpoint.every`` steps and when
the run ends (``steps`` reached, or ``stop_after``: a planned preemption that leaves the schedule,
which runs to ``steps``, unchanged).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.host_store import default_host_store

from ..core.memory import start_peak
from ..core.point import Point
from ..core.units import GIB
from . import checkpoint
from .data import data_spec, replica_batch
from .loop import build_model, build_optimizer, clip_and_step, forward_backward, model_config, setup_rank
from .schedule import make_scheduler

TRAIN_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "device_mem_peak_gib",
                "device_mem_reserved_gib", "host_store_gib", "tokens_seen", "wall_s"]  # fmt: skip


def _peak_device_gib(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB


class _Log:
    """``train.csv`` (rank 0): appended and flushed row by row, so a killed run keeps its rows."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            new = not path.exists()
            self._file = path.open("a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=TRAIN_FIELDS)
            if new:
                self._writer.writeheader()

    def write(self, row: dict) -> None:
        if self.enabled:
            self._writer.writerow(row)
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def train_rank(point: Point, run_dir: Path) -> dict:
    """Train this rank from step 0 or from the newest checkpoint; returns a summary for rank 0."""
    me = setup_rank(point)
    mesh, device, precision, cuda = me.mesh, me.device, me.precision, me.cuda
    rank = mesh.world.rank
    model = build_model(point, mesh, device, precision)
    optimizer = build_optimizer(model, point)
    horizon = point.steps
    scheduler = make_scheduler(optimizer, point.lr_warmup_steps, horizon, point.lr_min_ratio)
    ckpt_root = Path(point.checkpoint_dir)
    data = data_spec(point, model_config(point).vocab_size)
    tokens_per_step = point.batch_size * mesh.dp.size * point.seq_len
    start = tokens_seen = 0
    if point.resume:
        found = checkpoint.latest(ckpt_root)
        if found is None:
            raise ValueError(f"resume=true but {ckpt_root} holds no complete checkpoint; run without resume first")
        start = checkpoint.load(found, model, optimizer, scheduler)
        # The tokens trained so far: a resume may change the sp/dp split, and with it the tokens a
        # step takes (checkpoints from before the count was kept assume this run's).
        tokens_seen = int(checkpoint.read_meta(found).get("tokens_seen", start * tokens_per_step))
        checkpoint.apply_settings(optimizer, scheduler, point.lr, point.weight_decay)
        if rank == 0:
            print(f"resumed from {found} (step {start} of {horizon})", flush=True)
    stop = point.end_step
    meta = checkpoint.run_meta(point.model, model_config(point), point.gpus, point.lr, point.weight_decay)
    log = _Log(Path(run_dir) / "train.csv", enabled=rank == 0)
    t_start, loss = time.perf_counter(), float("nan")
    start_peak(None, device)  # train.csv's device peak is the steps', not the build's or the restore's
    try:
        for step in range(start, stop):
            tokens, labels, cu_seqlens = replica_batch(data, step, mesh.dp.size, mesh.replica)
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss = float(forward_backward(model, point, mesh, precision, device, tokens, labels, cu_seqlens))
            grad_norm = clip_and_step(model, optimizer, point.grad_clip)
            scheduler.step()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            tokens_seen += tokens_per_step
            peak, reserved = _peak_device_gib(device)
            row = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_step / seconds,
                       step_time_s=seconds, device_mem_peak_gib=peak, device_mem_reserved_gib=reserved,
                       host_store_gib=default_host_store().bytes_allocated / GIB,
                       tokens_seen=tokens_seen, wall_s=time.perf_counter() - t_start)  # fmt: skip
            log.write(row)
            if rank == 0 and (step % point.log_every == 0 or step == stop - 1):
                mem = "" if peak is None else f"  device peak {peak:.2f} GiB"
                print(f"step {step + 1}/{horizon}  loss {loss:.4f}  lr {lr:.2e}  grad norm {grad_norm:.3f}  "
                      f"{row['tokens_per_s']:.0f} tok/s  {seconds:.2f} s{mem}", flush=True)  # fmt: skip
            done = step + 1
            if point.checkpoint_every and done % point.checkpoint_every == 0 and done < stop:
                checkpoint.save(ckpt_root, done, model, optimizer, scheduler, {**meta, "tokens_seen": tokens_seen})
        if stop > start or not point.resume:
            path = checkpoint.save(ckpt_root, stop, model, optimizer, scheduler, {**meta, "tokens_seen": tokens_seen})
            if rank == 0:
                print(f"checkpoint: {path}", flush=True)
    finally:
        log.close()
    if dist.is_initialized():
        dist.barrier()
    return {"start_step": start, "end_step": stop, "horizon": horizon, "loss": loss}
