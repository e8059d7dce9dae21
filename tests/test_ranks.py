"""``experiments.core.ranks``: ranks forked from a server that imported torch once still run in the
launcher's environment as it is at each launch, and still die with the launcher (the latter is
checked end to end in test_sweep_robustness)."""

import json
import os
import sys

import pytest

from experiments.core.ranks import PRELOAD, run_ranks, start_method


def _report(rank: int, out: str) -> None:
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"env": os.environ.get("RANKS_TEST_VALUE"), "parent": os.getppid(),
                   "preloaded": all(m in sys.modules for m in PRELOAD)}, f)  # fmt: skip


def _reports(out, n):
    return [json.loads((out / f"{r}.json").read_text()) for r in range(n)]


def test_ranks_see_the_launchers_environment_at_each_launch(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    monkeypatch.setenv("RANKS_TEST_VALUE", "one")
    run_ranks(_report, (str(first),), 2)
    monkeypatch.setenv("RANKS_TEST_VALUE", "two")  # after the server started: it still has "one"
    run_ranks(_report, (str(second),), 2)
    assert [r["env"] for r in _reports(first, 2)] == ["one", "one"]
    assert [r["env"] for r in _reports(second, 2)] == ["two", "two"]
    monkeypatch.delenv("RANKS_TEST_VALUE")
    run_ranks(_report, (str(first),), 1)
    assert _reports(first, 1)[0]["env"] is None


@pytest.mark.skipif(start_method() != "forkserver", reason="this platform has no fork server")
def test_ranks_are_forked_from_one_server_that_imported_torch(tmp_path):
    run_ranks(_report, (str(tmp_path),), 2)
    ranks = _reports(tmp_path, 2)
    run_ranks(_report, (str(tmp_path),), 1)
    later = _reports(tmp_path, 1)[0]
    servers = {r["parent"] for r in [*ranks, later]}
    assert len(servers) == 1 and os.getpid() not in servers, servers  # one server, not this process
    assert all(r["preloaded"] for r in [*ranks, later])


def _fail(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails")


def test_a_failing_rank_raises_in_the_launcher():
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessRaisedException, match="rank 1 fails"):
        run_ranks(_fail, (), 2)


def test_cuda_ranks_are_spawned_children_of_the_launcher(tmp_path, monkeypatch):
    """Where the launcher sees a CUDA device, ranks are spawned (a fork server that ever queried
    the driver would hand out ranks that cannot use CUDA); the spawn path runs here on CPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert start_method() == "spawn"
    monkeypatch.setenv("RANKS_TEST_VALUE", "spawned")
    run_ranks(_report, (str(tmp_path),), 1)
    rank = _reports(tmp_path, 1)[0]
    assert rank["env"] == "spawned" and rank["parent"] == os.getpid()
