"""Nothing a ``max_seqlen`` search found is lost: every search's summary is kept under its own
key, and ``max_seqlen.csv`` holds one row per distinct search run in the directory (the same
search again replaces its row; a stale job directory of an earlier multirun adds nothing)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import experiments.sweep.config  # noqa: F401  (registers the schema)
from experiments.sweep.max_seqlen import search_key
from experiments.sweep.points import resolve_point

REPO = Path(__file__).resolve().parent.parent
# One probe per search: start == limit, and a cap far above what 256 tokens of llama-tiny need,
# so the search stops at the limit after a single fit (a real step: faster than a fake one to start).
QUICK = ["model=llama-tiny", "parallel=fpdt", "gpus=1", "steps=1", "warmup_steps=0",
         "max_device_memory=1", "search.start=256", "search.limit=256"]  # fmt: skip


def _max_seqlen(*args, cwd: Path, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # CPU runs use the torch attention backend
    proc = subprocess.run([sys.executable, "-m", "experiments.max_seqlen", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _table(directory: Path) -> list[dict]:
    with open(directory / "max_seqlen.csv", newline="") as f:
        return list(csv.DictReader(f))


def _latest(directory: Path) -> dict:
    return json.loads((directory / "max_seqlen.json").read_text())


def test_search_key_follows_the_settings_that_change_the_answer():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        point = lambda *o: resolve_point(compose("config", overrides=["model=llama-tiny", "parallel=fpdt", *o]))
        base = point("chunks=2")
        key = search_key(base, None, 256, 1024, 0.1)
        assert key == search_key(point("chunks=2", "seq_len=8192"), None, 256, 1024, 0.1)  # seq_len is searched
        others = [search_key(point("chunks=4"), None, 256, 1024, 0.1), search_key(base, None, 512, 1024, 0.1),
                  search_key(base, None, 256, 2048, 0.1), search_key(base, None, 256, 1024, 0.2),
                  search_key(point("chunks=2", "precision=bf16-mixed"), None, 256, 1024, 0.1),
                  search_key(base, 128, 256, 1024, 0.1),
                  search_key(point("chunks=2", "timeout_s=60"), None, 256, 1024, 0.1)]  # fmt: skip
        assert len({key, *others}) == 1 + len(others)
        # With a fixed chunk size the probes choose chunks: the configured chunks do not matter.
        assert search_key(base, 128, 256, 1024, 0.1) == search_key(point("chunks=4"), 128, 256, 1024, 0.1)


@pytest.mark.distributed
def test_two_searches_into_one_directory_keep_both_rows(tmp_path):
    run = tmp_path / "run"
    _max_seqlen(*QUICK, "chunks=2", f"hydra.run.dir={run}", cwd=tmp_path)
    _max_seqlen(*QUICK, "chunks=4", f"hydra.run.dir={run}", cwd=tmp_path)
    rows = _table(run)
    assert [r["chunks"] for r in rows] == ["2", "4"] and all(r["status"] == "limit" for r in rows)
    assert len({r["key"] for r in rows}) == 2 and all(r["timestamp"] for r in rows)
    latest = _latest(run)
    assert latest["chunks"] == 4 and latest["key"] == rows[1]["key"]
    assert sorted(p.stem for p in (run / "searches").glob("*.json")) == sorted(r["key"] for r in rows)


@pytest.mark.distributed
def test_the_same_search_again_replaces_its_row(tmp_path):
    run = tmp_path / "run"
    _max_seqlen(*QUICK, "chunks=2", f"hydra.run.dir={run}", cwd=tmp_path)
    first = _latest(run)
    proc = _max_seqlen(*QUICK, "chunks=2", "seq_len=8192", f"hydra.run.dir={run}", cwd=tmp_path)
    assert "reused" in proc.stdout  # the probe was not measured again
    rows = _table(run)
    assert len(rows) == 1 and rows[0]["key"] == first["key"] == _latest(run)["key"]
    assert len(list((run / "searches").glob("*.json"))) == 1


@pytest.mark.distributed
def test_a_reused_sweep_directory_lists_each_search_once(tmp_path):
    # The second multirun re-runs chunks=4 in job 0; job 1 keeps the first multirun's chunks=4
    # summary. The sweep's table is one row per distinct search: chunks=2 kept, chunks=4 once.
    sweep = tmp_path / "sweep"
    _max_seqlen("-m", *QUICK, "chunks=2,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert sorted(r["chunks"] for r in _table(sweep)) == ["2", "4"]
    _max_seqlen("-m", *QUICK, "chunks=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    rows = _table(sweep)
    assert sorted(r["chunks"] for r in rows) == ["2", "4"] and len({r["key"] for r in rows}) == 2
    assert sorted(r["chunks"] for r in _table(sweep / "0")) == ["2", "4"]  # job 0 ran both
    assert _latest(sweep / "0")["chunks"] == 4


def test_two_refused_searches_keep_both_rows_and_an_old_summary_stays(tmp_path):
    # A refused configuration (no max_device_memory for the simulated device) is a row too; a
    # directory written before searches/ existed keeps its max_seqlen.json in the table.
    run = tmp_path / "run"
    run.mkdir()
    old = {"status": "ok", "model": "llama-tiny", "strategy": "ulysses", "gpus": 1, "max_seq_len": 2048}
    (run / "max_seqlen.json").write_text(json.dumps(old))
    refused = ["model=llama-tiny", "parallel=fpdt", "gpus=1", f"hydra.run.dir={run}"]
    _max_seqlen(*refused, "chunks=2", cwd=tmp_path, expect_rc=1)
    _max_seqlen(*refused, "chunks=4", cwd=tmp_path, expect_rc=1)
    rows = _table(run)
    assert [(r["strategy"], r["status"]) for r in rows] == [("ulysses", "ok"), ("fpdt", "error"), ("fpdt", "error")]
    assert rows[0]["max_seq_len"] == "2048" and len({r["key"] for r in rows}) == 3
    assert "max_device_memory" in _latest(run)["error"]
