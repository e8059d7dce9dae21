"""One sweep point per Hydra job: ``python -m experiments.run``.

The job is a controller: it resolves and checks the configuration once, skips it if the sweep
already has its row, starts ``gpus`` fresh worker processes (NCCL with one GPU each on CUDA,
gloo on CPU; forked from a server that imported torch once, ``experiments.core.ranks``), waits
for them under a timeout, and records one result row, whatever happened::

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
or ``timeout``; the sweep goes on. Ctrl-C or SIGTERM (a scheduler's preemption) stops the ranks and
the sweep; the point in progress gets no row and runs when the same command is run again. A row
is reused by configuration (its key), not by code version: a re-run after the code changed skips
the points already measured and says at which commit they were (``git_commit`` in the row).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import hydra
import torch.multiprocessing as mp
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ..core.flops import FLOP_CONVENTION, step_flops
from ..core.hardware import cpu_peak_tflops
from ..core.locks import exclusive_lock
from ..core.paths import CONF_DIR
from ..core.point import Point
from ..core.provenance import git_commit, versions
from ..core.ranks import descendants, start_ranks
from ..core.units import GIB, format_bytes
from ..training.loop import model_config, uses_cuda
from . import config as _schema  # noqa: F401  (registers the structured configs)
from .points import check_point, resolve_point
from .results import csv_has_key, find_point, point_key, rebuild_results_csv, record_point
from .worker import is_knock_on, run_rank, sigterm_ignored, spawn_entry, summarize

FINAL_STATUSES = ("ok", "oom")
# Point fields that are not part of the row (how to run it, not what was run).
_NOT_IN_ROW = ("timeout_s", "results_csv", "requested_chunks")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while ranks ran (a scheduler's preemption, ``scancel``, ``kill``): handled as
    Ctrl-C is, so the ranks are stopped before the controller exits."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stopped(exc: KeyboardInterrupt, command: str, what: str) -> SystemExit:
    """Ctrl-C or SIGTERM (:class:`Terminated`) ended ``command`` while it was ``what`` (``launch``
    has stopped the ranks): say so in one line, and exit as a process killed by that signal does
    (``128 + signum``) instead of with a traceback."""
    signum = getattr(exc, "signum", signal.SIGINT)
    print(f"{command}: {signal.Signals(signum).name} while {what}", file=sys.stderr, flush=True)
    return SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into :class:`Terminated` in this block, unless someone else handles SIGTERM
    (submitit's launcher ignores it on purpose) or this is not the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop(ctx) -> None:
    """SIGKILL every rank still running and what it started (compile workers, helpers), then reap
    the ranks: nothing of a point outlives it, holding memory or a GPU."""
    alive = [p for p in ctx.processes if p.is_alive()]
    for pid in [q for p in alive for q in descendants(p.pid)]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for p in alive:
        p.kill()
    for p in alive:
        p.join(10)


@contextlib.contextmanager
def _job_dir_lock(job_dir: Path):
    """Hold ``job_dir`` for this launch. Two sweeps writing into the same ``hydra.sweep.dir`` at
    once share their job directories (``0``, ``1``, ...), where the ranks' result files would mix
    (one point's row could carry the other's measurements): the second is refused with a clear
    error instead (on filesystems without locks, not checked)."""
    path = job_dir / ".launch.lock"
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(exclusive_lock(path, wait=False))
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "another process"
            raise ValueError(
                f"{job_dir} is in use by {holder}: two runs share an output directory at once (two sweeps into "
                "one hydra.sweep.dir share their job directories 0, 1, ...); give each its own hydra.sweep.dir "
                "(or hydra.run.dir), or run them one after the other (a re-run skips the points already measured)"
            ) from None
        if f is not None:
            with contextlib.suppress(OSError):  # who holds it, for the message above (a full disk: nobody said)
                f.truncate(0)
                f.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_errors(job_dir: Path, ranks: int) -> dict | None:
    """What the ranks' ``rank<r>_error.json`` say: the cause (an OOM on any rank, else the error
    that is not only the consequence of another's, e.g. a peer's closed connection, and of those
    the one raised first, then the lowest rank: a knock-on whose wording ``is_knock_on`` does not
    know still comes after its cause), then the first such consequence as context.
    ``knock_on``: no rank said more than that."""
    found = []
    for rank in range(ranks):
        with contextlib.suppress(OSError, ValueError):  # none, or one being written
            found.append({**json.loads((job_dir / f"rank{rank}_error.json").read_text()), "rank": rank})
    if not found:
        return None
    cause = min(found, key=lambda e: (e["status"] != "oom", bool(e.get("knock_on")), e.get("time", 0.0), e["rank"]))
    error = cause["error"] if ranks == 1 else f"rank {cause['rank']}: {cause['error']}"
    then = [e for e in found if e is not cause and e.get("knock_on")]
    if then and not cause.get("knock_on"):
        error += f"; then rank {then[0]['rank']}: {then[0]['error'].splitlines()[0][:300]}"
    return {"status": cause["status"], "error": error, "device_peak_bytes": cause.get("device_peak_bytes"),
            "knock_on": bool(cause.get("knock_on"))}  # fmt: skip


def _death(exc: BaseException, ctx, job_dir: Path) -> str | None:
    """The rank that ended without saying why (killed by a signal, or exited non-zero with no
    ``rank<r>_error.json``): the cause, where the others' errors are its consequences. The rank
    torch.multiprocessing saw fail first is taken over the others, which it stops with SIGTERM."""

    def silent(rank: int, code: int | None) -> bool:
        return code not in (None, 0) and not (job_dir / f"rank{rank}_error.json").exists()

    def how(code: int) -> str:
        return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

    if isinstance(exc, mp.ProcessExitedException) and silent(exc.error_index, exc.exit_code):
        return f"rank {exc.error_index} died ({how(exc.exit_code)}){_SIGNAL_HINTS.get(-exc.exit_code, '')}"
    if isinstance(exc, mp.ProcessRaisedException) and not (job_dir / f"rank{exc.error_index}_error.json").exists():
        # It raised but could not say so in its error file (a full disk, an unwritable directory):
        # the exception it raised is the cause, not its exit code.
        return f"rank {exc.error_index} failed: {str(exc).strip().splitlines()[-1][:2000]}"
    for rank, p in enumerate(ctx.processes):
        p.join(5)
        if silent(rank, p.exitcode) and p.exitcode != -signal.SIGTERM:
            return f"rank {rank} died ({how(p.exitcode)}){_SIGNAL_HINTS.get(-p.exitcode, '')}"
    return None


# What a rank's death by a signal usually means (after "rank r died (signal NAME)").
_SIGNAL_HINTS = {
    signal.SIGKILL: ": killed from outside the job, e.g. by the host's out-of-memory killer (dmesg) or the scheduler",
    signal.SIGTERM: ": stopped from outside the job (a scheduler's preemption or time limit, scancel, kill)",
    signal.SIGSEGV: ": a crash in native code (the rank's stderr above has more)",
    signal.SIGBUS: ": a crash in native code, or shared memory (/dev/shm) ran out",
}


def launch(point: Point, job_dir: Path, body=None) -> dict:
    """Spawn the ranks (each runs ``body``, default the sweep's measured steps), wait under the
    point's ``timeout_s`` (``None``: no limit), and return the raw outcome. However this ends
    (a result, a failure, the timeout, Ctrl-C or SIGTERM), no rank is left running."""
    job_dir.mkdir(parents=True, exist_ok=True)
    with _job_dir_lock(job_dir):
        for stale in [*job_dir.glob("rank*_error.json"), job_dir / "worker_metrics.json"]:
            stale.unlink(missing_ok=True)
        port = _free_port()
        args = (point, point.gpus, port, str(job_dir)) + (() if body is None else (body,))
        ctx = start_ranks(spawn_entry, args, point.gpus)
        try:
            with _sigterm_raises():
                return _wait(ctx, point, job_dir)
        finally:
            _stop(ctx)


def _timed_out(point: Point, metrics: Path, stopped: str) -> dict:
    """The outcome of a point still running at ``timeout_s`` (``stopped``: what became of its ranks)."""
    if metrics.exists():  # rank 0 wrote it after every rank had finished measuring
        return {"status": "ok", "metrics": json.loads(metrics.read_text()),
                "warning": f"teardown: ranks still running at timeout_s={point.timeout_s:g} s after the "
                           f"measurement; {stopped}"}  # fmt: skip
    return {"status": "timeout", "error": f"no result after timeout_s={point.timeout_s:g} s; {stopped}"}


def _wait(ctx, point: Point, job_dir: Path) -> dict:
    metrics = job_dir / "worker_metrics.json"
    deadline = None if point.timeout_s is None else time.monotonic() + point.timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if deadline is not None and time.monotonic() > deadline:
                _stop(ctx)
                return _timed_out(point, metrics, "ranks killed")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        time.sleep(1.0)  # let the other ranks fail on their own (their error files say how)
        _stop(ctx)  # the rest wait in a collective for the dead one
        death = _death(exc, ctx, job_dir)
        err = _read_errors(job_dir, point.gpus)
        if death is not None:
            then = f"; then {err['error']}" if err is not None else ""
            return {"status": "error", "error": death + then}
        if err is not None:
            return err
        reason = str(exc).strip().splitlines()[-1][:2000]
        if metrics.exists():
            return {"status": "ok", "metrics": json.loads(metrics.read_text()), "warning": f"teardown: {reason}"}
        return {"status": "error", "error": reason}
    err = _read_errors(job_dir, point.gpus)
    if err is not None:
        return err
    if not metrics.exists():  # every rank exited 0, but rank 0 never wrote its result
        return {"status": "error", "error": f"the ranks exited without a result (no {metrics})"}
    return {"status": "ok", "metrics": json.loads(metrics.read_text())}


def _gib(x):
    return None if x is None else x / GIB


def make_row(point: Point, outcome: dict, key: str, job_dir: Path, wall_s: float, commit: str) -> dict:
    """The point's row. ``commit``: the code that ran, as ``git_commit()`` said when its
    processes started, since a tree edited during a long point is not what ran."""
    row = {k: v for k, v in point.as_dict().items() if k not in _NOT_IN_ROW}
    row.update(
        status=outcome["status"],
        error=outcome.get("error"),
        warning=outcome.get("warning"),
        key=key,
        job_dir=str(job_dir),
        git_commit=commit,
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        wall_s=round(wall_s, 2),
        flop_convention=FLOP_CONVENTION,
        device_mem_simulated=not uses_cuda(point),
        **versions(),
    )
    if outcome["status"] == "oom" and outcome.get("device_peak_bytes") is not None:
        # How far it got: the peak reached before the failure (the cap is max_device_memory).
        row["device_mem_peak_gib"] = _gib(outcome["device_peak_bytes"])
    if outcome["status"] != "ok":
        return row
    s = summarize(outcome["metrics"])
    sequences = point.batch_size * point.dp  # the global batch: every replica's sequences
    flops = step_flops(model_config(point), point.seq_len, sequences, s["attention_square_tokens"])
    peak = point.peak_tflops
    if peak is None:  # CPU: the machine's measured peak, shared by the ranks that run on it
        machine_peak, how = cpu_peak_tflops()
        peak = machine_peak / point.gpus
        row["peak_tflops_source"] = f"{how}; divided by gpus={point.gpus} ranks sharing the cores"
    if not point.fake_tensors:  # a step on fake tensors computes nothing: no time, rate or loss
        step = s["step_time_s"]
        tflops_per_gpu = flops.causal / step / point.gpus / 1e12
        row.update(
            step_time_s=step,
            step_time_p20_s=s["step_time_p20_s"],
            step_time_p80_s=s["step_time_p80_s"],
            tokens_per_s=sequences * point.seq_len / step,
            tflops_per_gpu=tflops_per_gpu,
            mfu=tflops_per_gpu / peak,
            mfu_full_attention=flops.full / step / point.gpus / 1e12 / peak,
            loss=s["loss"],
        )
    row.update(
        peak_tflops=peak,
        flops_per_step=flops.causal,
        flops_per_step_full_attention=flops.full,
        attention_flops_per_step=flops.attention_causal,  # inside documents when packed
        device_mem_peak_gib=_gib(s["device_peak_bytes"]),
        device_mem_reserved_gib=_gib(s["device_reserved_bytes"]),
        device_alloc_retries=s["device_alloc_retries"],
        device_mem_driver_gib=_gib(s["device_driver_bytes"]),
        device_mem_total_gib=_gib(s["device_total_bytes"]),
        host_mem_gib=_gib(s["host_peak_bytes"]),
        host_mem_node_gib=_gib(s["host_node_bytes"]),
        host_pinned_gib=_gib(s["host_pinned_bytes"]),
        rss_peak_gib=_gib(s["rss_peak_bytes"]),
        device_name=s["device_name"],
    )
    return row


def measure(point: Point, job_dir: Path) -> dict:
    """Check the point, run it in fresh processes and return its row (a bad point is a row too)."""
    start, commit = time.monotonic(), git_commit()  # the ranks import the tree as it is now
    try:
        check_point(point)
        outcome = launch(point, job_dir)
    except ValueError as exc:
        outcome = {"status": "error", "error": str(exc)}
    return make_row(point, outcome, point_key(point), job_dir, time.monotonic() - start, commit)


def _progress(row: dict, sweep_dir: Path, job_num: int | None, skipped: str | None = None) -> str:
    layout = f" sp={row['sp']}" if row.get("sp") not in (None, row["gpus"]) else ""
    head = f"[{row['model']} {row['strategy']} seq_len={row['seq_len']} chunks={row['chunks']} "
    head += f"gpus={row['gpus']}{layout}]"
    if skipped:
        body = f"skipped: {skipped} (status {row['status']})"
    elif row["status"] == "ok":
        dev = "simulated " if row.get("device_mem_simulated") else ""
        rate = "fake tensors (memory only)" if row.get("fake_tensors") else \
            f"{row['tokens_per_s']:.0f} tok/s  MFU {100 * row['mfu']:.1f}%"  # fmt: skip
        body = (
            f"ok  {rate}  {dev}device peak {format_bytes(row['device_mem_peak_gib'] * GIB)}  "
            f"host {format_bytes(row['host_mem_gib'] * GIB)}"
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


def _skip_reason(point: Point, sweep_dir: Path) -> str:
    """Why a point is not measured: its row is in the sweep directory (from this sweep or an
    earlier one), and, for a strategy without chunks, that row stands for every chunk count."""
    if point.requested_chunks != point.chunks:
        return f"already in {sweep_dir} (as chunks={point.chunks}: {point.strategy} takes no chunks)"
    return f"already in {sweep_dir}"


def _other_commit(row: dict) -> str:
    """A note when a reused row was measured at another commit than the one running now."""
    then, now = row.get("git_commit"), git_commit()
    if not then or then == now:
        return ""
    return (f"; measured at commit {then}, now {now}: delete its points/{row['key']}.json, or use another "
            "hydra.sweep.dir, to measure it again")  # fmt: skip


def _record(sweep_dir: Path, job_dir: Path, row: dict, csv_name: str) -> Path:
    """``record_point``, or, when the directory cannot take it (a full disk, no permission), the
    row on stderr and an exit naming the directory: the sweep stops rather than measure points it
    cannot keep."""
    try:
        return record_point(sweep_dir, job_dir, row, csv_name)
    except OSError as exc:
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)
        raise SystemExit(
            f"experiments.run: could not record the row of {row.get('key')} in {sweep_dir} ({exc}); the row is "
            "printed above, and the point runs again when the sweep is re-run"
        ) from exc


def _unresolved_row(cfg: DictConfig, exc: ValueError) -> dict:
    """The error row of a point whose configuration could not be resolved: the settings as given."""
    what = {"model": cfg.model.name, "strategy": str(cfg.parallel.strategy.value), "seq_len": cfg.seq_len,
            "chunks": cfg.chunks, "gpus": cfg.gpus, "n_layers": cfg.model.n_layers}  # fmt: skip
    return {**what, "status": "error", "error": str(exc), "key": point_key(what)}


def run_point(cfg: DictConfig) -> dict:
    """Resolve, check, skip-or-run and record one point; returns its row."""
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir) if multirun else job_dir
    job_num = hc.job.num if multirun else None
    try:
        point = resolve_point(cfg)
    except ValueError as exc:  # e.g. an undetectable GPU
        row = _unresolved_row(cfg, exc)
        _record(sweep_dir, job_dir, row, cfg.results_csv)
        print(_progress(row, sweep_dir, job_num), flush=True)
        return row
    key = point_key(point)
    existing = find_point(sweep_dir, key)
    # ok and oom rows are measurements and stay; error and timeout rows are retried.
    if existing is not None and existing["status"] in FINAL_STATUSES:
        if not csv_has_key(sweep_dir / point.results_csv, key):  # recorded, but the table missed it
            rebuild_results_csv(sweep_dir, point.results_csv)
        skipped = _skip_reason(point, sweep_dir) + _other_commit(existing)
        print(_progress(existing, sweep_dir, job_num, skipped), flush=True)
        return existing
    try:
        row = measure(point, job_dir)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): launch stopped the ranks
        raise stopped(exc, "experiments.run", f"running {key}: its ranks are stopped and it has no row; run the "
                      f"same command again to measure it (rows already in {sweep_dir} are kept)") from None  # fmt: skip
    csv_path = _record(sweep_dir, job_dir, row, point.results_csv)
    print(_progress(row, sweep_dir, job_num), flush=True)
    if not multirun:
        print(f"row: {csv_path} (and {job_dir / 'result.json'})", flush=True)
    return row


# How long rank 0 of a torchrun job waits for the error file of the rank that failed first, when
# it saw only the consequence (on a shared filesystem another node's file can take a moment to show).
_PEER_ERROR_WAIT_S = 5.0


def _torchrun_failure(exc: BaseException, point: Point, job_dir: Path) -> dict:
    """Rank 0's outcome after it raised ``exc``. Where that is only the consequence of another
    rank's failure (torchrun's SIGTERM, a peer's closed connection), the row names that rank and
    what it raised, with rank 0's error as context."""
    why = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Terminated):
        why = ("stopped by SIGTERM: torchrun stops every rank when one fails (the failed rank's log says "
               "why), or the scheduler preempted the job")  # fmt: skip
    elif is_knock_on(exc):
        why += "; no other rank said why it failed (torchrun's summary names the rank that exited first)"
    deadline = time.monotonic() + (_PEER_ERROR_WAIT_S if is_knock_on(exc) else 0.0)
    while (err := _read_errors(job_dir, point.gpus)) is None or err["knock_on"]:
        if time.monotonic() >= deadline:
            return {"status": "error", "error": why}
        time.sleep(0.2)
    return err


def _watchdog(point: Point, metrics: Path, record) -> threading.Lock:
    """``timeout_s`` for a torchrun job, which has no controller to enforce it: at ``timeout_s`` a
    thread of rank 0 records the timeout row and ends rank 0, and torchrun then stops the other
    ranks. Whoever takes the returned lock first, this thread or rank 0's own ending, records the row."""
    claim = threading.Lock()
    if point.timeout_s is None:
        return claim

    def expire():
        if not claim.acquire(blocking=False):
            return
        for pid in descendants(os.getpid()):  # what rank 0 started (compile workers, helpers)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            record(_timed_out(point, metrics, "rank 0 exited, so torchrun stopped the other ranks"))
        finally:
            print(f"experiments.run: timeout_s={point.timeout_s:g} s reached; rank 0 exits (124)", file=sys.stderr,
                  flush=True)  # fmt: skip
            sys.stdout.flush()
            os._exit(124)

    timer = threading.Timer(point.timeout_s, expire)
    timer.daemon = True
    timer.start()
    return claim


def run_under_torchrun(cfg: DictConfig) -> None:
    """This process is one rank started by torchrun: train, and rank 0 records the row."""
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    rank0 = int(os.environ["RANK"]) == 0
    point = None
    try:
        point = resolve_point(cfg)
        if point.gpus != int(os.environ["WORLD_SIZE"]):
            raise ValueError(f"gpus={point.gpus} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} "
                             f"ranks; give gpus={os.environ['WORLD_SIZE']} or start that many")  # fmt: skip
        check_point(point)
    except ValueError as exc:  # every rank sees the same: rank 0 records the row, each ends in one line
        if rank0:
            outcome = {"status": "error", "error": str(exc)}
            row = (_unresolved_row(cfg, exc) if point is None
                   else make_row(point, outcome, point_key(point), job_dir, 0.0, git_commit()))  # fmt: skip
            _record(job_dir, job_dir, row, cfg.results_csv)
            print(_progress(row, job_dir, None), flush=True)
        raise SystemExit(f"experiments.run: {exc}") from None
    metrics = job_dir / "worker_metrics.json"
    # An earlier launch into this directory may have left its files; each rank clears its own (a
    # peer's is gone once that peer has joined the process group, before anyone can fail in it).
    (job_dir / f"rank{os.environ['RANK']}_error.json").unlink(missing_ok=True)
    if rank0:
        metrics.unlink(missing_ok=True)
    start, commit = time.monotonic(), git_commit()

    def record(outcome: dict) -> Path:
        row = make_row(point, outcome, point_key(point), job_dir, time.monotonic() - start, commit)
        csv_path = record_point(job_dir, job_dir, row, point.results_csv)
        print(_progress(row, job_dir, None), flush=True)
        return csv_path

    claim = _watchdog(point, metrics, record) if rank0 else None
    try:
        # torchrun stops the other ranks with SIGTERM when one fails (and a scheduler preempts the
        # same way): rank 0 then still records why, instead of dying without a row.
        with _sigterm_raises():
            run_rank(point, str(job_dir))
    except BaseException as exc:
        if rank0:  # the row says what happened; torchrun's summary lists every rank's exit
            # A later SIGTERM would kill rank 0 half way through its row (torchrun follows it
            # with SIGKILL after its grace period anyway).
            with sigterm_ignored():
                claim.acquire()
                record(_torchrun_failure(exc, point, job_dir))
        raise
    if rank0:
        claim.acquire()
        csv_path = record({"status": "ok", "metrics": json.loads(metrics.read_text())})
        print(f"row: {csv_path} (rank 0 of this torchrun job wrote it: keep the output directory on a "
              "filesystem every node shares)", flush=True)  # fmt: skip


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if _under_torchrun():
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Each job would set up the process group again on torchrun's one port: the second hangs.
            raise SystemExit("experiments.run: under torchrun one launch is one point; drop -m (and sweep presets) "
                             "and start one torchrun per point")  # fmt: skip
        run_under_torchrun(cfg)
        return
    row = run_point(cfg)
    if HydraConfig.get().mode == RunMode.RUN and row["status"] != "ok":
        sys.exit(1)


if __name__ == "__main__":
    main()
