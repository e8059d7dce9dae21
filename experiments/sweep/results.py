"""Result rows: one JSON per sweep point, aggregated into ``results.csv``.

A sweep directory holds ``points/<key>.json`` (one per distinct effective configuration: the
re-run and de-duplication index) and ``results.csv`` (rebuilt from the points after every point,
written atomically, so an interrupted sweep loses nothing already measured). Each Hydra job
directory also gets its own ``result.json``. Jobs that run at once (Hydra's joblib or submitit
launchers) record under a lock on ``.results.lock``, so no rebuild writes a table that misses a
row another job has just recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from ..core.locks import exclusive_lock
from ..core.point import Point
from ..core.tables import read_csv, read_row, write_csv, write_json

__all__ = ["ROW_FIELDS", "KEY_FIELDS", "csv_has_key", "find_point", "load_points", "point_key", "read_csv",
           "rebuild_results_csv", "record_point", "write_results_csv"]  # fmt: skip

# Column order of results.csv. The first block are the fixed names tests outside this
# repository read; the rest add the configuration echo and provenance.
ROW_FIELDS = [
    "status", "error", "strategy", "model", "seq_len", "chunks", "gpus",
    "step_time_s", "step_time_p20_s", "step_time_p80_s", "tokens_per_s", "tflops_per_gpu",
    "mfu", "mfu_full_attention", "peak_tflops",
    "device_mem_peak_gib", "device_mem_reserved_gib", "host_mem_gib", "rss_peak_gib",
    "device_name", "git_commit", "host_pinned_gib",
    "batch_size", "dtype", "backend", "hardware", "offload", "activation_checkpointing",
    "checkpoint_on_host", "chunked_mlp", "chunked_loss", "mlp_tile", "loss_tile", "fsdp",
    "precision", "sp", "dp", "offload_states", "residual_fp32", "ulysses_degree", "backward_order",
    "n_layers", "steps", "warmup_steps", "seed", "max_device_memory", "max_host_memory", "fake_tensors",
    "device_mem_simulated", "device_mem_driver_gib", "device_mem_total_gib", "device_alloc_retries",
    "peak_tflops_source",
    "flops_per_step", "flops_per_step_full_attention", "attention_flops_per_step", "flop_convention", "loss",
    "torch_version", "triton_version", "timestamp", "wall_s", "warning", "key", "job_dir",
]  # fmt: skip

# The configuration fields that make two points the same experiment.
KEY_FIELDS = [
    "model", "n_layers", "strategy", "seq_len", "chunks", "gpus", "sp", "batch_size", "precision", "backend",
    "hardware", "offload", "activation_checkpointing", "checkpoint_on_host", "chunked_mlp",
    "chunked_loss", "mlp_tile", "loss_tile", "fsdp", "offload_states", "residual_fp32", "steps", "warmup_steps", "seed",
    "max_device_memory", "data_path", "data_packing", "data_eos_id", "data_index", "data_doc_len",
    "ulysses_degree", "backward_order", "max_host_memory", "fake_tensors", "data_dtype", "lr",
]  # fmt: skip
# Key fields added later enter a point's key only when set away from their default, so the points
# of older sweeps keep their keys (and are not run again).
_KEY_FIELD_DEFAULTS = {"ulysses_degree": None, "backward_order": "auto", "max_host_memory": None, "fake_tensors": False,
                       "data_dtype": "uint16", "lr": 1e-4}  # fmt: skip


def point_key(point: Point | dict) -> str:
    """Readable, unique file name for an effective configuration (a point, or a row)."""
    if isinstance(point, Point):
        point = point.as_dict()
    fields = {
        k: point.get(k)
        for k in KEY_FIELDS
        if k not in _KEY_FIELD_DEFAULTS or point.get(k, _KEY_FIELD_DEFAULTS[k]) != _KEY_FIELD_DEFAULTS[k]
    }
    return (f"{point['model']}_{point['strategy']}_s{point['seq_len']}_u{point['chunks']}_g{point['gpus']}_"
            f"{digest(fields)}")  # fmt: skip


def digest(data) -> str:
    """Ten hex digits that tell configurations apart: the SHA-1 of their JSON, keys sorted."""
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _read_point(path: Path) -> dict | None:
    # An unreadable point counts as not run, so it runs again and replaces the file.
    return read_row(path, "result", "the point counts as not run")


def find_point(sweep_dir: Path, key: str) -> dict | None:
    path = Path(sweep_dir) / "points" / f"{key}.json"
    return _read_point(path) if path.exists() else None


def record_point(sweep_dir: Path, job_dir: Path, row: dict, csv_name: str = "results.csv") -> Path:
    """Store one row (sweep index + job's result.json) and rebuild the sweep's CSV."""
    sweep_dir, job_dir = Path(sweep_dir), Path(job_dir)
    points = sweep_dir / "points"
    points.mkdir(parents=True, exist_ok=True)
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "result.json", row)
    with _sweep_lock(sweep_dir):
        write_json(points / f"{row['key']}.json", row)
        return _rebuild(sweep_dir, csv_name)


def rebuild_results_csv(sweep_dir: Path, csv_name: str = "results.csv") -> Path:
    """Write the sweep's CSV again from its points (e.g. when a point recorded earlier is missing
    from it: a job stopped between its point file and the table)."""
    with _sweep_lock(Path(sweep_dir)):
        return _rebuild(Path(sweep_dir), csv_name)


def _rebuild(sweep_dir: Path, csv_name: str) -> Path:
    # Where the lock is not honoured (some network filesystems), a point recorded while the table
    # was being written shows as a change of the listing: write again, until it holds still.
    for _ in range(10):
        before = _listing(sweep_dir)
        path = write_results_csv(load_points(sweep_dir), sweep_dir / csv_name)
        if _listing(sweep_dir) == before:
            break
    return path


def _listing(sweep_dir: Path) -> list[tuple]:
    out = []
    for p in sorted((sweep_dir / "points").glob("*.json")):
        with contextlib.suppress(OSError):
            st = p.stat()
            out.append((p.name, st.st_mtime_ns, st.st_size))
    return out


def _sweep_lock(sweep_dir: Path):
    """An exclusive lock on ``<sweep_dir>/.results.lock`` while a row is stored and the table is
    rebuilt (best effort: where locks are not available, none)."""
    return exclusive_lock(sweep_dir / ".results.lock")


def csv_has_key(path: Path, key: str) -> bool:
    """Whether the table at ``path`` exists and has a row with this ``key``."""
    try:
        return any(r.get("key") == key for r in read_csv(path))
    except (OSError, ValueError):
        return False


def load_points(sweep_dir: Path) -> list[dict]:
    """Every readable point of a sweep directory, sorted (unreadable files are skipped with a warning)."""
    rows = [r for p in sorted((Path(sweep_dir) / "points").glob("*.json")) if (r := _read_point(p)) is not None]
    return sorted(rows, key=lambda r: (r.get("model", ""), r.get("strategy", ""), r.get("gpus", 0),
                                       r.get("chunks", 0), r.get("seq_len", 0)))  # fmt: skip


def write_results_csv(rows: list[dict], path: Path) -> Path:
    """``results.csv``: the fixed columns first, then any others the rows carry."""
    return write_csv(rows, path, ROW_FIELDS)
