"""One sweep point per Hydra job: ``python -m experiments.run``.

The job is a controller: it resolves and checks the configuration once, skips it if the sweep
already has its row, spawns ``gpus`` fresh worker processes (NCCL with one GPU each on CUDA,
gloo on CPU), waits for them under a timeout, and records one result row, whatever happened::

    # one point, 2 ranks
    python -m experiments.run model=llama-tiny parallel=fpdt seq_len=8192 chunks=4 gpus=2
    # a sweep (Hydra multirun): every combination is a point; results.csv in the sweep dir
    python -m experiments.run -m parallel=ulysses,fpdt seq_len=8192,16384 chunks=1,2,4 gpus=1,2
    python -m experiments.run +sweep=demo            # a preset from conf/sweep/ (resumable)
    # several nodes: torchrun starts the ranks, each runs as a worker directly
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \\
        -m experiments.run model=llama3-8b parallel=fpdt seq_len=1048576 chunks=16 gpus=16
    # SLURM, one node per point (pip install -e ".[slurm]")
    python -m experiments.run -m hydra/launcher=slurm +sweep=seqlen gpus=8 hydra.launcher.partition=gpu

An out-of-memory error, a crash or a hung rank becomes a row with ``status`` ``oom``, ``error``
or ``timeout``; the sweep goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.multiprocessing as mp
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import config as _schema  # noqa: F401  (registers the structured configs)
from .flops import FLOP_CONVENTION, step_flops
from .hardware import resolve_hardware
from .memory import GIB
from .results import find_point, point_key, record_point
from .worker import run_rank, spawn_entry, summarize

REPO = Path(__file__).resolve().parent.parent
FINAL_STATUSES = ("ok", "oom")


def resolve_point(cfg: DictConfig) -> dict:
    """The effective configuration of a point as a flat dict (what the key and the row echo)."""
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    par, hw = c["parallel"], resolve_hardware(c["hardware"])
    strategy = par["strategy"]
    return {
        "model": c["model"]["name"],
        "n_layers": c["model"]["n_layers"],
        "strategy": strategy,
        "seq_len": c["seq_len"],
        # chunks only means something to fpdt: other strategies record 1, so a sweep that
        # crosses strategies and chunk counts runs each of their points once.
        "chunks": c["chunks"] if strategy == "fpdt" else 1,
        "gpus": c["gpus"],
        "batch_size": c["batch_size"],
        "steps": c["steps"],
        "warmup_steps": c["warmup_steps"],
        "dtype": c["dtype"],
        "seed": c["seed"],
        # The attention backend actually used: auto = triton on CUDA, the torch CPU kernel otherwise
        # (never the Triton interpreter, even if TRITON_INTERPRET is set).
        "backend": c["backend"] if c["backend"] != "auto" else ("triton" if torch.cuda.is_available() else "torch"),
        "lr": c["lr"],
        "max_device_memory": c["max_device_memory"],
        "timeout_s": c["timeout_s"],
        "offload": par["offload"] and strategy == "fpdt",
        "activation_checkpointing": par["activation_checkpointing"],
        "checkpoint_on_host": par["checkpoint_on_host"] and par["activation_checkpointing"],
        "chunked_mlp": par["chunked_mlp"],
        "chunked_loss": par["chunked_loss"],
        "mlp_tile": par["mlp_tile"],
        "loss_tile": par["loss_tile"],
        "fsdp": par["fsdp"],
        "hardware": hw["name"],
        "peak_tflops": hw.get("peak_tflops"),
        "peak_tflops_source": hw.get("source", ""),
        "data_path": c["data"]["path"],
        "data_dtype": c["data"]["dtype"],
        "results_csv": c["results_csv"],
    }


def check_point(point: dict) -> None:
    """Raise ``ValueError`` with what was wrong and what would be right."""
    from models import get_config
    from parallel.all_to_all import check_heads

    for key in ("seq_len", "chunks", "gpus", "batch_size", "steps"):
        if point[key] < 1:
            raise ValueError(f"{key}={point[key]} must be >= 1")
    if point["warmup_steps"] < 0:
        raise ValueError(f"warmup_steps={point['warmup_steps']} must be >= 0")
    if point["strategy"] == "local" and point["gpus"] != 1:
        raise ValueError(f"parallel=local runs in one process; got gpus={point['gpus']} (use ulysses or fpdt)")
    n = point["gpus"] * point["chunks"]
    if point["seq_len"] % n:
        raise ValueError(f"seq_len={point['seq_len']} is not divisible by gpus*chunks={n}; use a multiple of {n}")
    if torch.cuda.is_available() and point["gpus"] > torch.cuda.device_count() and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"gpus={point['gpus']} but this machine has {torch.cuda.device_count()} visible GPUs; "
            "use fewer, or torchrun across nodes"
        )
    cfg = get_config(point["model"], **({"n_layers": point["n_layers"]} if point["n_layers"] else {}))
    check_heads(cfg.n_heads, cfg.n_kv_heads, point["gpus"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_commit() -> str:
    if os.environ.get("FPDT_COMMIT"):
        return os.environ["FPDT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch_version": torch.__version__, "triton_version": triton_version}


def _read_errors(job_dir: Path) -> dict | None:
    errors = sorted(job_dir.glob("rank*_error.json"))
    if not errors:
        return None
    found = [json.loads(p.read_text()) for p in errors]
    # An OOM on any rank is the cause; the others usually fail in a collective after it.
    return next((e for e in found if e["status"] == "oom"), found[0])


def launch(point: dict, job_dir: Path) -> dict:
    """Spawn the ranks, wait under the timeout, and return the raw outcome."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*job_dir.glob("rank*_error.json"), job_dir / "worker_metrics.json"]:
        stale.unlink(missing_ok=True)
    port = _free_port()
    ctx = mp.start_processes(
        spawn_entry,
        args=(point, point["gpus"], port, str(job_dir)),
        nprocs=point["gpus"],
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + point["timeout_s"]
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(10)
                message = f"no result after timeout_s={point['timeout_s']:.0f} s; ranks killed"
                return {"status": "timeout", "error": message}
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        err = _read_errors(job_dir)
        if err is not None:
            return {"status": err["status"], "error": err["error"]}
        reason = str(exc).strip().splitlines()[-1][:2000]
        metrics = job_dir / "worker_metrics.json"
        if metrics.exists():  # rank 0 wrote it after every rank had finished measuring
            return {"status": "ok", "metrics": json.loads(metrics.read_text()), "warning": f"teardown: {reason}"}
        return {"status": "error", "error": reason}
    err = _read_errors(job_dir)
    if err is not None:
        return {"status": err["status"], "error": err["error"]}
    return {"status": "ok", "metrics": json.loads((job_dir / "worker_metrics.json").read_text())}


def make_row(point: dict, outcome: dict, key: str, job_dir: Path, wall_s: float) -> dict:
    row = {k: v for k, v in point.items() if k not in ("lr", "timeout_s", "data_dtype", "results_csv")}
    row.update(
        status=outcome["status"],
        error=outcome.get("error"),
        warning=outcome.get("warning"),
        key=key,
        job_dir=str(job_dir),
        git_commit=_git_commit(),
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        wall_s=round(wall_s, 2),
        flop_convention=FLOP_CONVENTION,
        device_mem_simulated=not torch.cuda.is_available(),
        **_versions(),
    )
    if outcome["status"] != "ok":
        return row
    from models import get_config

    cfg = get_config(point["model"], **({"n_layers": point["n_layers"]} if point["n_layers"] else {}))
    s = summarize(outcome["metrics"])
    flops = step_flops(cfg, point["seq_len"], point["batch_size"])
    peak = point["peak_tflops"] if point["peak_tflops"] is not None else s["measured_peak_tflops"]
    if point["peak_tflops"] is None:
        row["peak_tflops_source"] = "measured: fp32 matmul TFLOP/s per rank at start (CPU)"
    step = s["step_time_s"]
    tflops_per_gpu = flops.causal / step / point["gpus"] / 1e12

    def gib(x):
        return None if x is None else x / GIB

    row.update(
        step_time_s=step,
        step_time_p20_s=s["step_time_p20_s"],
        step_time_p80_s=s["step_time_p80_s"],
        tokens_per_s=point["batch_size"] * point["seq_len"] / step,
        tflops_per_gpu=tflops_per_gpu,
        mfu=tflops_per_gpu / peak,
        mfu_full_attention=flops.full / step / point["gpus"] / 1e12 / peak,
        peak_tflops=peak,
        flops_per_step=flops.causal,
        flops_per_step_full_attention=flops.full,
        loss=s["loss"],
        device_mem_peak_gib=gib(s["device_peak_bytes"]),
        device_mem_reserved_gib=gib(s["device_reserved_bytes"]),
        device_mem_driver_gib=gib(s["device_driver_bytes"]),
        device_mem_total_gib=gib(s["device_total_bytes"]),
        host_mem_gib=gib(s["host_peak_bytes"]),
        host_mem_node_gib=gib(s["host_node_bytes"]),
        rss_peak_gib=gib(s["rss_peak_bytes"]),
        device_name=s["device_name"],
    )
    return row


def measure(point: dict, job_dir: Path) -> dict:
    """Check the point, run it in fresh processes and return its row (a bad point is a row too)."""
    start = time.monotonic()
    try:
        check_point(point)
        outcome = launch(point, job_dir)
    except ValueError as exc:
        outcome = {"status": "error", "error": str(exc)}
    return make_row(point, outcome, point_key(point), job_dir, time.monotonic() - start)


def _progress(row: dict, sweep_dir: Path, job_num: int | None, skipped: bool) -> str:
    head = f"[{row['model']} {row['strategy']} seq_len={row['seq_len']} chunks={row['chunks']} gpus={row['gpus']}]"
    if skipped:
        body = f"skipped: already in {sweep_dir} (status {row['status']})"
    elif row["status"] == "ok":
        dev = "simulated " if row.get("device_mem_simulated") else ""
        body = (
            f"ok  {row['tokens_per_s']:.0f} tok/s  MFU {100 * row['mfu']:.1f}%  "
            f"{dev}device peak {row['device_mem_peak_gib']:.3f} GiB  host {row['host_mem_gib']:.3f} GiB"
        )
    else:
        body = f"{row['status']}: {row['error']}"
    total_file = sweep_dir / ".total_points"
    if job_num is not None and total_file.exists():
        total = int(total_file.read_text())
        body += f"  ({job_num + 1}/{total} done, {max(0, total - job_num - 1)} to go)"
    return f"{head} {body}"


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def run_point(cfg: DictConfig) -> dict:
    """Resolve, check, skip-or-run and record one point; returns its row."""
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir) if multirun else job_dir
    try:
        point = resolve_point(cfg)
    except ValueError as exc:  # e.g. an undetectable GPU
        point = {"model": cfg.model.name, "strategy": str(cfg.parallel.strategy.value), "seq_len": cfg.seq_len,
                 "chunks": cfg.chunks, "gpus": cfg.gpus, "n_layers": None}  # fmt: skip
        row = {**point, "status": "error", "error": str(exc), "key": point_key(point)}
        record_point(sweep_dir, job_dir, row, cfg.results_csv)
        print(_progress(row, sweep_dir, hc.job.num if multirun else None, False), flush=True)
        return row
    key = point_key(point)
    existing = find_point(sweep_dir, key)
    # ok and oom rows are measurements and stay; error and timeout rows are retried.
    if existing is not None and existing["status"] in FINAL_STATUSES:
        print(_progress(existing, sweep_dir, hc.job.num if multirun else None, True), flush=True)
        return existing
    row = measure(point, job_dir)
    record_point(sweep_dir, job_dir, row, point["results_csv"])
    print(_progress(row, sweep_dir, hc.job.num if multirun else None, False), flush=True)
    return row


def run_under_torchrun(cfg: DictConfig) -> None:
    """This process is one rank started by torchrun: train, and rank 0 records the row."""
    point = resolve_point(cfg)
    if point["gpus"] != int(os.environ["WORLD_SIZE"]):
        raise ValueError(f"gpus={point['gpus']} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} ranks")
    check_point(point)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    key, start = point_key(point), time.monotonic()
    rank0 = int(os.environ["RANK"]) == 0
    try:
        run_rank(point, str(job_dir))
    except BaseException as exc:
        if rank0:  # the row says what happened here; torchrun reports the other ranks
            err = _read_errors(job_dir) or {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            row = make_row(point, err, key, job_dir, time.monotonic() - start)
            record_point(job_dir, job_dir, row, point["results_csv"])
            print(_progress(row, job_dir, None, False), flush=True)
        raise
    if rank0:
        metrics = json.loads((job_dir / "worker_metrics.json").read_text())
        row = make_row(point, {"status": "ok", "metrics": metrics}, key, job_dir, time.monotonic() - start)
        record_point(job_dir, job_dir, row, point["results_csv"])
        print(_progress(row, job_dir, None, False), flush=True)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if _under_torchrun():
        run_under_torchrun(cfg)
        return
    row = run_point(cfg)
    if HydraConfig.get().mode == RunMode.RUN and row["status"] != "ok":
        sys.exit(1)


if __name__ == "__main__":
    main()
