"""The longest trainable sequence: ``python -m experiments.max_seqlen``.

For one model, strategy, ``gpus`` and ``chunks`` (or a fixed chunk size ``search.chunk_tokens``),
probe training steps at growing ``seq_len``: double from ``search.start`` until a probe fails,
then bisect between the last fit and the first failure until the gap is within
``search.resolution`` of the fit (and a multiple of the granularity, ``gpus*chunks`` or the chunk
size). Every probe is a fresh set of processes and a row in this run's ``results.csv``; the
answer goes to ``max_seqlen.json`` and one line is printed::

    python -m experiments.max_seqlen model=llama3.2-1b parallel=fpdt gpus=1 chunks=8
    python -m experiments.max_seqlen -m parallel=ulysses,fpdt model=llama-tiny gpus=2 max_device_memory=0.05

On CPU (and on fake tensors), ``max_device_memory`` (GiB) caps the simulated device, which has
no size of its own: the search refuses to run there without it. An ``oom`` or ``timeout`` probe
counts as "does not fit"; when a timeout set the bound, the summary's status is ``timeout`` (the
length is the longest that ran within ``timeout_s``, not a memory limit). An ``error`` stops the
search; a single search then exits 1, as ``experiments.run`` does.

Every search's summary is kept under ``searches/<key>.json`` (the key is built from the search's
configuration, :func:`search_key`), in the job directory and, in a multirun, in the sweep
directory; ``max_seqlen.csv`` there is rebuilt from them, one row per distinct search, so another
search into the same directory adds a row and the same search again replaces its row.
``max_seqlen.json`` is the latest search's summary.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from parallel import get_strategy

from ..core.paths import CONF_DIR
from ..core.point import Point
from ..core.tables import read_row, write_atomic, write_csv
from ..core.units import GIB, format_bytes
from ..training.loop import uses_cuda
from .controller import FINAL_STATUSES, measure, stopped
from .points import check_point, check_requested_chunks, resolve_point
from .results import digest, find_point, point_key, record_point

SUMMARY_FIELDS = [
    "status", "model", "strategy", "gpus", "n_layers", "sp", "precision", "chunks", "chunk_tokens", "max_seq_len",
    "first_failure",
    "failure_status", "probes", "hardware", "max_device_memory", "max_host_memory", "fake_tensors",
    "device_name", "error", "key", "timestamp",
]  # fmt: skip


def _granularity(point: Point, chunk_tokens: int | None) -> int:
    if chunk_tokens:
        if chunk_tokens % point.sp:  # a chunk is split over the sequence-parallel ranks
            raise ValueError(f"search.chunk_tokens={chunk_tokens} must be a multiple of sp={point.sp} (the "
                             "sequence-parallel ranks a chunk is split over)")  # fmt: skip
        return chunk_tokens
    return get_strategy(point.strategy).granule(point.sp, point.chunks, point.ulysses_degree)


def _round_down(n: int, g: int) -> int:
    return max(g, n // g * g)


class _Prober:
    def __init__(self, base: Point, chunk_tokens: int | None, job_dir: Path):
        self.base, self.chunk_tokens, self.job_dir = base, chunk_tokens, job_dir
        self.rows: list[dict] = []

    def __call__(self, seq_len: int) -> dict:
        point = self.base.replace(seq_len=seq_len)
        if self.chunk_tokens and get_strategy(point.strategy).takes_chunks:
            point = point.replace(chunks=seq_len // self.chunk_tokens)
        key = point_key(point)
        row, how = find_point(self.job_dir, key), " (reused: already in this directory)"
        if row is None or row["status"] not in FINAL_STATUSES:  # error and timeout rows run again
            probe_dir = self.job_dir / "probes" / key
            row, how = measure(point, probe_dir), ""
            record_point(self.job_dir, probe_dir, row)
        self.rows.append(row)
        mem = row.get("device_mem_peak_gib")
        peak = f" (device peak {format_bytes(mem * GIB)})" if mem else ""
        why = f": {str(row.get('error') or '')[:300]}" if row["status"] in ("error", "timeout") else ""
        print(f"  probe seq_len={seq_len}: {row['status']}{peak}{why}{how}", flush=True)
        return row


def search(base: dict, probe, start: int, limit: int, resolution: float, granularity: int) -> dict:
    """Doubling then bisection; returns the summary (``max_seq_len`` 0 if nothing fits)."""
    fits = lambda row: row["status"] == "ok"
    lo, hi, hi_status = 0, None, None
    s = _round_down(start, granularity)
    row = probe(s)
    if row["status"] == "error":
        return {"status": "error", "max_seq_len": 0, "error": row["error"]}
    if fits(row):
        lo = s
        while hi is None and s * 2 <= limit:
            s *= 2
            row = probe(s)
            if row["status"] == "error":
                return {"status": "error", "max_seq_len": lo, "error": row["error"]}
            if fits(row):
                lo = s
            else:
                hi, hi_status = s, row["status"]
        if hi is None:
            why = f"fits at {lo} tokens; the next doubling ({2 * lo}) exceeds search.limit={limit}"
            return {"status": "limit", "max_seq_len": lo, "first_failure": None, "error": why}
    else:
        hi, hi_status = s, row["status"]
        while lo == 0 and s > granularity:
            s = _round_down(s // 2, granularity)
            row = probe(s)
            if row["status"] == "error":
                return {"status": "error", "max_seq_len": 0, "error": row["error"]}
            if fits(row):
                lo = s
            else:
                hi, hi_status = s, row["status"]
        if lo == 0:
            return _bounded(0, hi, hi_status)
    while hi - lo > max(granularity, resolution * lo):
        mid = _round_down((lo + hi) // 2, granularity)
        if mid <= lo:
            break
        row = probe(mid)
        if row["status"] == "error":
            return {"status": "error", "max_seq_len": lo, "first_failure": mid, "failure_status": "error",
                    "error": row["error"]}  # fmt: skip
        if fits(row):
            lo = mid
        else:
            hi, hi_status = mid, row["status"]
    return _bounded(lo, hi, hi_status)


def _bounded(lo: int, hi: int, hi_status: str) -> dict:
    """The answer between the longest fit ``lo`` and the first failure ``hi``: ``ok`` when memory
    set the bound, ``timeout`` when the first failure ran out of time (a lower bound in memory)."""
    result = {"status": "ok", "max_seq_len": lo, "first_failure": hi, "failure_status": hi_status}
    if hi_status == "timeout":
        result.update(status="timeout", error=f"the probe at {hi} tokens timed out (timeout_s): {lo} is the longest "
                                               "that ran within the time limit, not a memory limit")  # fmt: skip
    return result


def _check_search(search_cfg, base: Point, chunk_tokens: int | None) -> None:
    if search_cfg.start < 1 or search_cfg.limit < search_cfg.start:
        raise ValueError(f"search.start={search_cfg.start} and search.limit={search_cfg.limit} must satisfy "
                         "1 <= start <= limit (tokens)")  # fmt: skip
    if not 0 < search_cfg.resolution < 1:
        raise ValueError(f"search.resolution={search_cfg.resolution} must be in (0, 1): the gap between the "
                         "longest fit and the first failure, as a fraction of the fit")  # fmt: skip
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"search.chunk_tokens={chunk_tokens} must be >= 1 tokens, or null for a fixed chunks")


def search_key(base: Point, chunk_tokens: int | None, start: int, limit: int, resolution: float) -> str:
    """Readable, unique file name for a search: the base point's key and the search settings that
    change the answer (``timeout_s`` among them, where set). ``seq_len`` is what the search
    varies, and with ``chunk_tokens`` the probes set ``chunks`` themselves, so neither enters the key."""
    point = base.replace(seq_len=0, chunks=None if chunk_tokens else base.chunks)
    settings = {"point": point_key(point), "chunk_tokens": chunk_tokens, "start": start, "limit": limit,
                "resolution": resolution}  # fmt: skip
    if base.timeout_s is not None:  # a probe's time limit can set the bound (status timeout)
        settings["timeout_s"] = base.timeout_s
    layout = f"t{chunk_tokens}" if chunk_tokens else f"u{base.chunks}"
    return f"{base.model}_{base.strategy}_g{base.gpus}_{layout}_{digest(settings)}"


def _error_key(cfg: DictConfig, what: dict) -> str:
    """Key of a search whose configuration was refused: its point may not resolve, so the whole job
    configuration is hashed. Two different bad configurations keep two rows; a setting the search
    does not read (``seq_len``) also makes a new row, which for a refused search loses nothing."""
    config = OmegaConf.to_container(cfg, resolve=False)
    return f"{what['model']}_{what['strategy']}_g{what['gpus']}_error_{digest(config)}"


def _read_summary(path: Path) -> dict | None:
    # An unreadable summary is left out; the table is rebuilt from the others.
    return read_row(path, "max_seqlen summary", "its row is left out of the table")


def _adopt_old_summaries(directory: Path) -> None:
    """Keep the summaries written before ``searches/`` existed: ``max_seqlen.json`` without a key,
    the directory's own or (of a sweep) its jobs'. Each is stored under a key of its content, once,
    before the job's ``max_seqlen.json`` is replaced by this search's. Once ``searches/`` exists they
    have been adopted, and the job folders are not read again."""
    if (directory / "searches").is_dir():
        return
    for path in [directory / "max_seqlen.json", *sorted(directory.glob("*/max_seqlen.json"))]:
        old = _read_summary(path) if path.is_file() else None
        if old is None or "key" in old:
            continue
        mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
        old = {**old, "key": f"old_{digest(old)}", "timestamp": mtime}
        target = directory / "searches" / f"{old['key']}.json"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, json.dumps(old, indent=2))


def _store_summary(summary: dict, directory: Path) -> None:
    """``searches/<key>.json`` (the same search again replaces its file), then ``max_seqlen.csv``
    rebuilt from every stored search, oldest first."""
    searches = directory / "searches"
    searches.mkdir(parents=True, exist_ok=True)
    write_atomic(searches / f"{summary['key']}.json", json.dumps(summary, indent=2))
    rows = [r for p in sorted(searches.glob("*.json")) if (r := _read_summary(p)) is not None]
    rows.sort(key=lambda r: (str(r.get("timestamp") or ""), str(r.get("key") or "")))
    write_csv(rows, directory / "max_seqlen.csv", SUMMARY_FIELDS)


def _write_summary(summary: dict, job_dir: Path, hc) -> None:
    """Store this search in the job directory and, in a multirun, the sweep's (one table of every
    search run there); ``max_seqlen.json`` becomes this search's summary."""
    summary = {**summary, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    directories = [job_dir] + ([Path(hc.sweep.dir)] if hc.mode == RunMode.MULTIRUN else [])
    for directory in directories:
        _adopt_old_summaries(directory)
        _store_summary(summary, directory)
    write_atomic(job_dir / "max_seqlen.json", json.dumps(summary, indent=2))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        base = resolve_point(cfg)
        check_requested_chunks(base)  # before the granularity it multiplies
        chunk_tokens = cfg.search.chunk_tokens if get_strategy(base.strategy).takes_chunks else None
        granularity = _granularity(base, chunk_tokens)
        _check_search(cfg.search, base, chunk_tokens)
        check_point(base.replace(seq_len=granularity, chunks=1 if chunk_tokens else base.chunks))
        if granularity > cfg.search.limit:
            raise ValueError(f"search.limit={cfg.search.limit} is below the smallest length this search can probe "
                             f"({granularity} tokens: one chunk, or gpus*chunks)")  # fmt: skip
        if base.max_device_memory is None and not uses_cuda(base):
            raise ValueError("the simulated device (CPU or fake_tensors) has no size: set max_device_memory=<GiB> "
                             "(e.g. the GPU's 141 for an H200) so that a probe can run out of it")  # fmt: skip
    except ValueError as exc:  # a bad search is a summary row too, and the sweep goes on
        what = {"model": cfg.model.name, "strategy": str(cfg.parallel.strategy.value), "gpus": cfg.gpus}
        summary = {**what, "status": "error", "max_seq_len": 0, "error": str(exc), "key": _error_key(cfg, what)}
        _write_summary(summary, job_dir, hc)
        print(f"max_seqlen {what['model']} {what['strategy']} gpus={what['gpus']}: error: {exc}", flush=True)
        if hc.mode == RunMode.RUN:
            sys.exit(1)
        return
    label = f"{base.model} {base.strategy} gpus={base.gpus} " + (
        f"chunk_tokens={chunk_tokens}" if chunk_tokens else f"chunks={base.chunks}"
    )
    label += (f" n_layers={base.n_layers}" if base.n_layers else "") + (
        f" sp={base.sp}" if base.sp != base.gpus else ""
    )
    label += f" {base.precision}"
    print(f"max_seqlen search: {label}", flush=True)
    prober = _Prober(base, chunk_tokens, job_dir)
    try:
        result = search(base, prober, cfg.search.start, cfg.search.limit, cfg.search.resolution, granularity)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during a probe: launch stopped its ranks
        done = sum(r["status"] in FINAL_STATUSES for r in prober.rows)
        why = (
            f"probing ({label}): the probe running has no row; the {done} finished probes are kept in "
            f"{job_dir} and the same command again reuses them"
        )
        raise stopped(exc, "experiments.max_seqlen", why) from None
    ok_rows = [r for r in prober.rows if r["status"] == "ok"]
    summary = {
        **{
            k: getattr(base, k)
            for k in (
                "model",
                "strategy",
                "gpus",
                "n_layers",
                "sp",
                "precision",
                "hardware",
                "max_device_memory",
                "max_host_memory",
                "fake_tensors",
            )
        },  # fmt: skip
        "chunks": None if chunk_tokens else base.chunks,
        "chunk_tokens": chunk_tokens,
        "probes": len(prober.rows),
        "device_name": ok_rows[-1].get("device_name") if ok_rows else None,
        "first_failure": None,
        "failure_status": None,
        "error": None,
        **result,
        "key": search_key(base, chunk_tokens, cfg.search.start, cfg.search.limit, cfg.search.resolution),
    }
    _write_summary(summary, job_dir, hc)
    print(f"max_seqlen {label}: {summary['max_seq_len']} tokens ({summary['status']}, {summary['probes']} probes"
          + (f", first failure {summary['first_failure']}: {summary['failure_status']}" if summary["first_failure"]
             else "") + ")" + (f": {summary['error']}" if summary["error"] else ""), flush=True)  # fmt: skip
    if summary["status"] == "error" and hc.mode == RunMode.RUN:
        sys.exit(1)


if __name__ == "__main__":
    main()
