"""The memory/timing benchmarks run end to end on CPU and write what they promise."""

import pytest

from experiments import bench_fpdt_block, bench_model_memory
from experiments.core.tables import read_csv


def test_fpdt_block_benchmark_writes_rows_and_timeline(tmp_path):
    out = tmp_path / "block.csv"
    rows = bench_fpdt_block.main(
        ["--seq-lens", "1024", "--chunk-tokens", "256", "512", "--heads", "2", "--head-dim", "16", "--out", str(out)]
    )
    assert [(r["strategy"], r["chunks"], r["offload"]) for r in rows] == [
        ("ulysses", 1, False), ("fpdt", 4, False), ("fpdt", 4, True), ("fpdt", 2, False), ("fpdt", 2, True),
    ]  # fmt: skip
    assert all(r["status"] == "ok" and r["step_s"] > 0 and r["peak_gib"] > 0 for r in rows)
    assert rows[2]["host_gib"] > 0 == rows[1]["host_gib"]  # offload uses the host store, no-offload does not
    assert len(read_csv(out)) == 5
    timeline = read_csv(tmp_path / "block_timeline.csv")
    assert {"compute", "h2d", "d2h"} <= {r["stream"] for r in timeline}
    assert (tmp_path / "block_timeline.png").stat().st_size > 10_000


@pytest.mark.distributed
def test_model_memory_benchmark_orders_the_strategies(tmp_path):
    rows = bench_model_memory.main(["--seq-len", "2048", "--chunks", "1", "4", "--steps", "1", "--out",
                                    str(tmp_path / "m.csv")])  # fmt: skip
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    peak = {(r["variant"], r["chunks"]): r["device_mem_peak_gib"] for r in rows}
    assert peak[("ulysses", 1)] < peak[("local", 1)]
    assert peak[("fpdt", 4)] < peak[("fpdt", 1)] < peak[("ulysses", 1)]
