"""``experiments.run`` under the ways a sweep ends badly: Ctrl-C/SIGTERM or a killed controller in
the middle of a point, a hung or crashing rank, jobs recording at once, a re-run after the code
changed, a sweep directory that cannot take the row, and the launchers' environments (SLURM,
torchrun). The rank bodies below run in real spawned ranks (gloo), so they live at module level."""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import experiments.sweep.config  # noqa: F401  (registers the schema)
from experiments.core.ranks import descendants, rank_pids
from experiments.sweep import controller, results
from experiments.sweep.points import check_point, resolve_point
from experiments.sweep.results import point_key, read_csv, record_point

REPO = Path(__file__).resolve().parent.parent
TINY = ["model=llama-tiny", "parallel=fpdt", "seq_len=512", "chunks=2"]


def _point(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return resolve_point(compose("config", overrides=[*TINY, *overrides]))


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # CPU points use the torch attention backend
    return env


def _run(*args, cwd, env=None, timeout=120):
    cmd = [sys.executable, "-m", "experiments.run", *args]
    return subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _alive(pid):
    """Running, not a zombie waiting for a parent that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _long_point(tmp_path, sweep, ignore_sigint, module="experiments.run", args=None):
    """A long 2-rank point of a sweep (or ``module`` with ``args``); yields the controller and its
    ranks once both are running, and kills whatever of them is left afterwards (a test that fails
    leaks nothing). ``ignore_sigint``: as a controller started with ``&`` from a script, which
    inherits SIGINT ignored."""

    def pre():
        os.setsid()
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    if args is None:
        args = ["-m", *TINY, "gpus=2", "steps=100000", "warmup_steps=0", f"hydra.sweep.dir={sweep}"]
    # Files, not pipes: a rank that outlives the controller would hold a pipe open.
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=tmp_path, env=_env(),
                                stdout=out, stderr=err, text=True, preexec_fn=pre)  # fmt: skip
    ranks = []
    try:
        deadline = time.monotonic() + 90
        while len(ranks := rank_pids(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # the controller is waiting on them now
        yield proc, ranks
    finally:
        for pid in [proc.pid, *ranks]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)


def _gone(pids, within=20.0):
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_sigterm_mid_point_stops_the_ranks_and_leaves_the_point_to_rerun(tmp_path):
    sweep = tmp_path / "sweep"
    with _long_point(tmp_path, sweep, ignore_sigint=True) as (proc, ranks):
        proc.send_signal(signal.SIGTERM)  # a scheduler's preemption signals the controller
        proc.wait(60)
        assert _gone(ranks), "a rank outlived its controller"
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM while running llama-tiny_fpdt_s512_u2_g2" in err and "has no row" in err, err[-3000:]
    assert not (sweep / "points").exists() and not (sweep / "results.csv").exists()


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["experiments.max_seqlen", "experiments.train"])
def test_sigterm_ends_max_seqlen_and_train_with_one_line_not_a_traceback(tmp_path, module):
    run_dir = tmp_path / "run"
    args = [*TINY, "gpus=2", "steps=100000", f"hydra.run.dir={run_dir}"]
    if module == "experiments.max_seqlen":
        args += ["warmup_steps=0", "max_device_memory=100", "search.start=512"]
    with _long_point(tmp_path, None, False, module, args) as (proc, ranks):
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert _gone(ranks), "a rank outlived its controller"
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if module == "experiments.max_seqlen":
        assert "experiments.max_seqlen: SIGTERM while probing (llama-tiny fpdt gpus=2" in err, err[-3000:]
        assert "the 0 finished probes are kept" in err, err[-3000:]
    else:
        assert "experiments.train: SIGTERM while training: the ranks are stopped; no complete checkpoint" in err, err
        assert "add resume=true" not in err


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_ranks_die_with_a_killed_controller_even_where_sigint_is_ignored(tmp_path):
    with _long_point(tmp_path, tmp_path / "sweep", ignore_sigint=True) as (proc, ranks):
        os.kill(proc.pid, signal.SIGKILL)  # the OOM killer, or a scheduler after its grace time
        proc.wait(30)
        assert _gone(ranks), "ranks of a killed controller kept running"


# ----------------------------------------------------------------------------- rank bodies


def _hang_with_a_helper(point, out):
    helper = subprocess.Popen(["sleep", "120"])
    (out / f"helper{os.environ['RANK']}").write_text(str(helper.pid))
    time.sleep(600)


def _raise_on_a_full_disk(point, out):
    from experiments.sweep import worker

    def full(path, data):
        raise OSError(28, "No space left on device", str(path))

    worker.write_json = full  # as a full disk would: the rank cannot write its error file
    raise RuntimeError("boom")


def _exit_quietly(point, out):
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_timeout_kills_the_ranks_and_what_they_started(tmp_path):
    point = _point("gpus=2", "timeout_s=25")
    out = controller.launch(point, tmp_path / "job", _hang_with_a_helper)
    assert out == {"status": "timeout", "error": "no result after timeout_s=25 s; ranks killed"}
    helpers = [int(p.read_text()) for p in (tmp_path / "job").glob("helper*")]
    assert len(helpers) == 2, "both ranks started their helper within the timeout"
    assert _gone(helpers, within=5), "a process a rank started outlived the point"


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_rank_that_fails_silently_gets_a_row_that_says_how(tmp_path):
    point = _point("gpus=1", "timeout_s=60")
    out = controller.launch(point, tmp_path / "a", _raise_on_a_full_disk)
    # What it raised, not "rank 0 died (exit code 1)".
    assert out["status"] == "error", out
    assert out["error"].startswith("rank 0 failed: OSError: [Errno 28] No space left on device"), out
    out = controller.launch(point, tmp_path / "b", _exit_quietly)
    assert out["status"] == "error" and "the ranks exited without a result" in out["error"], out


# ----------------------------------------------------------------------------- shared directories


def test_a_second_launch_in_a_busy_job_dir_is_refused(tmp_path):
    job = tmp_path / "0"
    job.mkdir()
    with (job / ".launch.lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on node7")
        held.flush()
        row = controller.measure(_point("gpus=1"), job)  # refused before any rank starts
    assert row["status"] == "error"
    assert f"{job} is in use by pid 4242 on node7" in row["error"] and "hydra.sweep.dir" in row["error"]


def _row(key, **kw):
    return {"key": key, "status": "ok", "model": "llama-tiny", "strategy": "fpdt", "seq_len": 512, "chunks": 2,
            "gpus": 1, **kw}  # fmt: skip


def test_a_row_recorded_during_a_rebuild_reaches_the_csv(tmp_path, monkeypatch):
    """Another job records its point between this rebuild's read of the points and its write of the
    table (where the lock is not honoured): the table is written again and has both."""
    sweep, load = tmp_path / "sweep", results.load_points
    calls = []

    def racing_load(sweep_dir):
        rows = load(sweep_dir)
        if not calls:
            calls.append(1)
            results.write_json(Path(sweep_dir) / "points" / "b.json", _row("b", seq_len=1024))
        return rows

    monkeypatch.setattr(results, "load_points", racing_load)
    monkeypatch.setattr(results, "_sweep_lock", lambda d: contextlib.nullcontext())
    record_point(sweep, sweep / "0", _row("a"))
    assert sorted(r["key"] for r in read_csv(sweep / "results.csv")) == ["a", "b"]


def _record_many(sweep, w, n):
    for i in range(n):
        record_point(sweep, sweep / f"{w}_{i}", _row(f"w{w}_{i}", seq_len=i, gpus=w))


def test_jobs_recording_at_once_lose_no_row(tmp_path):
    import multiprocessing as mp

    sweep = tmp_path / "sweep"
    procs = [mp.get_context("fork").Process(target=_record_many, args=(sweep, w, 15)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    assert len(read_csv(sweep / "results.csv")) == 90


def test_a_skipped_point_missing_from_the_csv_is_restored_and_names_its_commit(tmp_path):
    """A re-run reuses rows by configuration, not code version: it says so when the commit
    differs, and a row the table missed (a job stopped between point file and table) returns."""
    sweep = tmp_path / "sweep"
    point = _point("gpus=1", "steps=1", "warmup_steps=0")
    key = point_key(point)
    row = {**point.as_dict(), "key": key, "status": "oom", "error": "out of memory", "git_commit": "0123456789ab"}
    (sweep / "points").mkdir(parents=True)
    (sweep / "points" / f"{key}.json").write_text(json.dumps(row))
    proc = _run("-m", *TINY, "gpus=1", "steps=1", "warmup_steps=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped: already in {sweep}; measured at commit 0123456789ab, now " in proc.stdout, proc.stdout
    assert f"delete its points/{key}.json" in proc.stdout
    assert [r["key"] for r in read_csv(sweep / "results.csv")] == [key]


def test_a_sweep_dir_that_cannot_take_the_row_stops_with_the_row_and_the_reason(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "points").write_text("not a directory")  # as a full disk or a read-only mount would fail
    # A bad point (rejected before any rank starts) still has a row to record.
    proc = _run("-m", "seq_len=1004", "chunks=4", "gpus=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1
    assert "could not record the row of llama-tiny_fpdt_s1004_u4_g2_" in proc.stderr, proc.stderr[-3000:]
    assert f"in {sweep} ([Errno 17] File exists" in proc.stderr and "point runs again" in proc.stderr
    assert '"seq_len": 1004' in proc.stderr  # the row itself is not lost


# ----------------------------------------------------------------------------- launchers


def test_sigterm_handler_of_a_launcher_is_left_alone():
    """submitit ignores SIGTERM on purpose (it requeues on its own signal): launch keeps that."""
    mine = lambda signum, frame: None
    old = signal.signal(signal.SIGTERM, mine)
    try:
        with controller._sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)
    with controller._sigterm_raises():
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, mine)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_slurm_job_with_too_few_gpus_names_the_launcher_setting(monkeypatch):
    point = _point("gpus=2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(ValueError, match="gpus=2 but this machine has 1 visible GPUs") as err:
        check_point(point)
    assert "SLURM job 77" in str(err.value) and "hydra.launcher.gpus_per_node" in str(err.value)


def test_a_sweep_under_torchrun_is_refused_with_a_clear_error(tmp_path):
    env = dict(_env(), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = _run("-m", *TINY, "seq_len=512,1024", "gpus=2", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path,
                env=env)  # fmt: skip
    assert proc.returncode == 1
    assert "under torchrun one launch is one point; drop -m" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.distributed
def test_points_run_under_the_joblib_launcher(tmp_path):
    """Hydra's joblib launcher runs jobs in loky workers, whose start method fresh ranks cannot
    know: ranks are started with spawn, and jobs recording at once share one results.csv."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    sweep = tmp_path / "sweep"
    proc = _run("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "seq_len=512,1024", "gpus=1",
                "steps=1", "warmup_steps=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(sweep / "results.csv")
    assert sorted((int(r["seq_len"]), r["status"]) for r in rows) == [(512, "ok"), (1024, "ok")], rows


# torchrun's rank script: experiments.run with its run_rank replaced by one of the bodies below.
_TORCHRUN_RANK = """
import os, runpy, sys, time
import experiments.sweep.controller as controller
from experiments.sweep import worker

{body}

controller.run_rank = run_rank
sys.argv = ["experiments.run", *sys.argv[1:]]
runpy.run_module("experiments.run", run_name="__main__")
"""

_DYING_RANK = """
def run_rank(point, job_dir):  # rank 1 dies; rank 0 waits as in a collective until torchrun stops it
    if os.environ["RANK"] == "1":
        time.sleep(1)
        os._exit(7)
    time.sleep(120)
"""

_RAISING_RANK = """
def failing(point, out):  # rank 1 joins the process group, then fails; rank 0 measures, waiting for it
    if os.environ["RANK"] == "1":
        from experiments.training.loop import setup_rank
        setup_rank(point)
        time.sleep(float(os.environ["DELAY"]))
        raise ValueError("rank one's distinctive failure")
    return worker.measure_steps(point, out)

def run_rank(point, job_dir):
    worker.run_rank(point, job_dir, failing)
"""


def _torchrun(tmp_path, body, *overrides, env=None):
    """A 2-rank torchrun job of the tiny point, each rank running ``body`` (None: the real one);
    returns how torchrun ended (a CompletedProcess) and rank 0's row."""
    if body is None:
        rank_script = ["-m", "experiments.run"]
    else:
        script = tmp_path / "rank.py"
        script.write_text(_TORCHRUN_RANK.format(body=body))
        rank_script = [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *rank_script,
           *TINY, "gpus=2", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=100)
    except BaseException:  # a hung job leaks no rank (torchrun starts each in a session of its own)
        for pid in descendants(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        raise
    result = tmp_path / "run" / "result.json"
    assert result.exists(), f"rank 0 wrote no row:\n{err[-5000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), json.loads(result.read_text())


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "overrides, error",
    [
        (["chunks=3"], "seq_len=512 is not divisible by sp*chunks=6"),
        (["gpus=4"], "gpus=4 but torchrun started WORLD_SIZE=2"),
    ],
    ids=["indivisible", "world-size"],
)
def test_under_torchrun_a_bad_point_is_a_row_and_one_line_per_rank(tmp_path, overrides, error):
    """The checks run on every rank before any process group: rank 0 records the error row, and
    each rank ends with the reason in one line, not a traceback."""
    proc, row = _torchrun(tmp_path, None, *overrides)
    assert proc.returncode != 0 and row["status"] == "error" and error in row["error"], row
    ours = "experiments/sweep/"  # a traceback through our code (torchrun prints one of its own)
    assert proc.stderr.count(f"experiments.run: {row['error']}") == 2 and ours not in proc.stderr, proc.stderr


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_under_torchrun_rank0_records_why_it_was_stopped(tmp_path):
    # torchrun SIGTERMs the other ranks when one fails: rank 0 still writes its row.
    proc, row = _torchrun(tmp_path, _DYING_RANK, "steps=1", "warmup_steps=0")
    assert proc.returncode != 0
    assert row["status"] == "error" and "stopped by SIGTERM: torchrun stops every rank" in row["error"], row


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("delay", [0, 3], ids=["stopped-by-torchrun", "peer-connection-closed"])
def test_under_torchrun_rank0_records_the_failed_ranks_cause(tmp_path, delay):
    """Rank 0 sees only the consequence of rank 1's failure: torchrun's SIGTERM (rank 1 fails while
    rank 0 still builds its model) or gloo's closed connection (rank 0 already waits in a
    collective). Its row names rank 1 and what rank 1 raised, then its own error."""
    proc, row = _torchrun(tmp_path, _RAISING_RANK, "steps=1", "warmup_steps=0", env=dict(_env(), DELAY=str(delay)))
    assert proc.returncode != 0
    assert row["status"] == "error", row
    assert row["error"].startswith("rank 1: ValueError: rank one's distinctive failure; then rank 0: "), row


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_under_torchrun_a_point_past_timeout_s_gets_a_timeout_row(tmp_path):
    start = time.monotonic()
    proc, row = _torchrun(tmp_path, None, "steps=100000", "warmup_steps=0", "timeout_s=5")
    assert time.monotonic() - start < 60, "the ranks were not stopped at timeout_s"
    assert proc.returncode != 0 and "exitcode  : 124" in proc.stderr, proc.stderr[-3000:]
    assert row["status"] == "timeout", row
    assert row["error"] == "no result after timeout_s=5 s; rank 0 exited, so torchrun stopped the other ranks"


def test_the_cause_is_the_rank_that_failed_first_not_the_peers_it_took_down(tmp_path):
    def error(rank, message, status="error", knock_on=False):
        row = {"status": status, "error": message, "knock_on": knock_on, "device_peak_bytes": None}
        (tmp_path / f"rank{rank}_error.json").write_text(json.dumps(row))

    closed = "RuntimeError: [pair.cc:553] Connection closed by peer"
    error(0, closed + "\nmore", knock_on=True)
    error(2, "ValueError: bad shard")
    error(10, "ValueError: another")
    assert controller._read_errors(tmp_path, 12)["error"] == f"rank 2: ValueError: bad shard; then rank 0: {closed}"
    error(10, "OutOfMemoryError: out of memory", status="oom")  # an OOM anywhere is the cause
    assert controller._read_errors(tmp_path, 12)["error"].startswith("rank 10: OutOfMemoryError")
    assert controller._read_errors(tmp_path, 1)["error"] == closed + "\nmore"  # one rank: no rank named


def test_of_two_causes_the_first_raised_is_the_cause(tmp_path):
    """A knock-on error in wording that is not recognised still comes after its cause: the
    earliest of the errors that are not known knock-ons wins, whatever the ranks' order."""

    def error(rank, message, at):
        row = {"status": "error", "error": message, "knock_on": False, "device_peak_bytes": None, "time": at}
        (tmp_path / f"rank{rank}_error.json").write_text(json.dumps(row))

    error(0, "RuntimeError: some new wording of a lost peer", at=1000.5)
    error(3, "ValueError: bad shard", at=1000.0)
    assert controller._read_errors(tmp_path, 4)["error"].startswith("rank 3: ValueError: bad shard")
    error(1, "ValueError: also bad", at=1000.0)  # equal times: the lower rank
    assert controller._read_errors(tmp_path, 4)["error"].startswith("rank 1: ValueError: also bad")


def test_a_row_names_the_commit_its_ranks_started_at(monkeypatch, tmp_path):
    """A tree committed to (or edited) while a long point runs is not the code its ranks
    imported: the row keeps the commit of when they started."""
    commits = iter(["aaaa00000000", "bbbb00000000-dirty"])
    monkeypatch.setattr(controller, "git_commit", lambda: next(commits))

    def launch(point, job_dir):
        return {"status": "error", "error": "RuntimeError: stopped"}  # the tree changes meanwhile

    monkeypatch.setattr(controller, "launch", launch)
    row = controller.measure(_point("gpus=1", "steps=1", "warmup_steps=0"), tmp_path)
    assert row["git_commit"] == "aaaa00000000"
