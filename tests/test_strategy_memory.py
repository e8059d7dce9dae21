"""Device memory per rank of ring attention against Ulysses on the same attention layer, measured.

Runs the measurement of ``python -m experiments.bench.strategy_memory`` (two gloo ranks, one
attention layer forward + backward under the simulated-device tracker) on small MHA and GQA
layers, once for every test here, and compares the worst rank's device peak of each strategy.
A strategy made to fail (the rank worker's ``FPDT_BENCH_FAIL`` test hook) must be a CSV row with
its error, the other strategies measured, and the script's exit non-zero.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from experiments.bench import strategy_memory
from experiments.bench.strategy_memory import FAIL_ENV, TOLERANCE, Shape, measure, peaks

RANKS = 2
MHA = Shape(S=1024, H=8, Hkv=8, d=32)
GQA = Shape(S=1024, H=8, Hkv=2, d=32)

# One worker runs this module: its tests share one measurement (`rows`).
pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("strategy_memory")]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return measure([MHA, GQA], ["ulysses", "ring"], ranks=RANKS)


def _peak_mib(rows: list[dict], name: str, shape: Shape) -> float:
    return peaks(rows)[(name, shape.S, shape.H, shape.Hkv, shape.d, shape.B)]


def _block_mib(shape: Shape, itemsize: int) -> float:
    """One rank's K and V (``S/P`` tokens, ``Hkv`` heads) at ``itemsize`` bytes per element."""
    return 2 * shape.B * (shape.S // RANKS) * shape.Hkv * shape.d * itemsize / 2**20


def test_every_strategy_matches_the_local_oracle(rows):
    assert {r["strategy"] for r in rows} == {"ulysses", "ring"}
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    for r in rows:
        assert max(r["out_rel_err"], r["dx_rel_err"]) <= TOLERANCE, r


def test_gqa_ring_holds_no_more_than_ulysses(rows):
    ring, ulysses = _peak_mib(rows, "ring", GQA), _peak_mib(rows, "ulysses", GQA)
    assert ring <= ulysses, f"GQA: ring {ring:.3f} MiB per rank > ulysses {ulysses:.3f} MiB"


def test_mha_ring_exceeds_ulysses_by_at_most_its_block_in_flight(rows):
    """With MHA at P = 2 the ring cannot come down to Ulysses: both hold the layer's q, k, v, o,
    output, dO and dQ, which are the same size; beyond them Ulysses holds its dK, dV and its
    kernel allocates nothing else, while the ring holds the other rank's K/V block and one fp32
    dK/dV block while its kernels run, and those kernels' temporaries (one pair of zigzag pieces:
    dQ, dK, dV of ``S/(2P)`` tokens and a summed copy) weigh as much as Ulysses' dK, dV. So the
    ring's excess is bounded by one K/V block and one fp32 dK/dV block (what the backward holds
    with the K/V shift overlapped); a third dK/dV buffer or a kernel call over whole blocks
    breaks the bound."""
    ring, ulysses = _peak_mib(rows, "ring", MHA), _peak_mib(rows, "ulysses", MHA)
    bound = ulysses + _block_mib(MHA, 4) + _block_mib(MHA, 4)  # fp32 K/V block, fp32 dK/dV block
    assert ring <= bound, f"MHA: ring {ring:.3f} MiB per rank > ulysses {ulysses:.3f} + blocks = {bound:.3f} MiB"


# A small layer: the failure tests are about what is recorded, not about the figures.
SMALL = ["--seq-len", "256", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--no-deepspeed"]


def _read(path) -> dict[tuple[str, int], dict]:
    with open(path, newline="") as f:
        return {(r["strategy"], int(r["rank"])): r for r in csv.DictReader(f)}


def test_a_strategy_failing_on_one_rank_is_an_error_row_beside_the_measured_ones(tmp_path, monkeypatch):
    """ulysses raises on rank 1 only, while rank 0 goes into its all-to-all: rank 0 must not hang
    there, ring (measured before it in the same ranks) keeps its rows, and the exit says ulysses."""
    out = tmp_path / "rows.csv"
    monkeypatch.setenv(FAIL_ENV, "ulysses@1")
    with pytest.raises(SystemExit) as exit_:
        strategy_memory.main([*SMALL, "--strategies", "ring", "ulysses", "--out", str(out)])
    assert "ulysses (S=256 H=4 Hkv=2)" in str(exit_.value.code) and "ring" not in str(exit_.value.code)
    rows = _read(out)
    assert set(rows) == {(name, rank) for name in ("ring", "ulysses") for rank in (0, 1)}
    for rank in (0, 1):
        assert rows["ring", rank]["status"] == "ok" and float(rows["ring", rank]["device_peak_mib"]) > 0
        assert rows["ulysses", rank]["status"] == "error" and rows["ulysses", rank]["device_peak_mib"] == ""
    assert "injected failure of ulysses on rank 1" in rows["ulysses", 1]["error"]


def test_a_rank_that_dies_loses_only_its_strategy(tmp_path):
    """Rank 1 is killed (SIGKILL) in ring, the first strategy: its rows say so, ulysses after it
    is measured in fresh ranks, and the command exits non-zero after writing the CSV."""
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "experiments.bench.strategy_memory", *SMALL, "--strategies", "ring", "ulysses",
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, FAIL_ENV: "ring@1:kill"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith("ring (S=256 H=4 Hkv=2)"), done.stderr[-2000:]
    rows = _read(out)
    assert rows["ring", 1]["status"] == "error" and "rank 1 died (signal SIGKILL)" in rows["ring", 1]["error"]
    assert rows["ring", 0]["status"] == "error"  # left waiting for rank 1, then stopped or failed
    assert rows["ulysses", 0]["status"] == rows["ulysses", 1]["status"] == "ok"
    assert "ring" in done.stdout and "rank 1 error: rank 1 died" in done.stdout  # the table shows it
