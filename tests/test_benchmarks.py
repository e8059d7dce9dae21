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


def test_fpdt_block_benchmark_times_each_backward_order(tmp_path):
    # GQA 4:1 at u=4: the query-outer order keeps fewer bytes in the host store (the fp32 K/V
    # gradients of 3 chunks instead of 3 output gradients and 4 fp32 dq) and writes a timeline each.
    out = tmp_path / "block.csv"
    args = ["--seq-lens", "512", "--chunk-tokens", "128", "--heads", "4", "--kv-heads", "1", "--head-dim", "16"]
    rows = bench_fpdt_block.main([*args, "--backward-orders", "kv", "query", "--out", str(out)])
    offloaded = {r["backward_order"]: r for r in rows if r["offload"]}
    assert set(offloaded) == {"kv", "query"} and all(r["status"] == "ok" and r["Hkv"] == 1 for r in rows)
    assert offloaded["query"]["host_gib"] < offloaded["kv"]["host_gib"]
    for order in ("kv", "query"):
        timeline = read_csv(tmp_path / f"block_timeline_{order}.csv")
        assert {"compute", "h2d", "d2h"} <= {r["stream"] for r in timeline}


@pytest.mark.distributed
def test_model_memory_benchmark_orders_the_strategies(tmp_path):
    rows = bench_model_memory.main(["--seq-len", "2048", "--chunks", "1", "4", "--steps", "1", "--out",
                                    str(tmp_path / "m.csv")])  # fmt: skip
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    peak = {(r["variant"], r["chunks"]): r["device_mem_peak_gib"] for r in rows}
    assert peak[("ulysses", 1)] < peak[("local", 1)]
    assert peak[("fpdt", 4)] < peak[("fpdt", 1)] < peak[("ulysses", 1)]


def test_step_flops_counts_exactly_what_each_recipe_recomputes(tmp_path):
    # Every matmul of a real step, against the recipe written out: the checkpoint's recompute
    # runs QKV, attention and the output projection again, and the MLP only when it is the plain
    # one; the chunked MLP's backward recomputes W1 and W3 per tile; the chunked loss makes the
    # logits once. The attention backward runs 5 matmuls to the forward's 2 (2.5x).
    import models
    from experiments.bench import step_flops

    S = 64
    rows = step_flops.main(["--seq-len", str(S), "--time-steps", "1", "--out", str(tmp_path / "f.csv")])
    cfg = models.get_config("llama-tiny")
    L, h, f, H, Hkv, d = cfg.n_layers, cfg.hidden, cfg.ffn_hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    proj = 2 * S * h * (2 * H + 2 * Hkv) * d  # QKV and output projections, one forward
    mlp = 2 * S * h * f * 3
    attn_fwd = 4 * (S * (S + 1) // 2) * H * d  # causal: the triangle with its diagonal
    head = 2 * S * h * cfg.vocab_size
    want = {
        "local-no-ckpt": L * (3 * (proj + mlp) + 3.5 * attn_fwd) + 3 * head,
        "local": L * (4 * (proj + mlp) + 4.5 * attn_fwd) + 3 * head,
        "fpdt": L * (4 * proj + 3 * mlp + 2 * S * h * f * 2 + 4.5 * attn_fwd) + 3 * head,
    }
    got = {r["recipe"]: r["executed_flops"] for r in rows}
    assert got == pytest.approx(want, rel=0, abs=0)
    assert all(r["model_flops"] == rows[0]["model_flops"] and r["step_s"] > 0 for r in rows)
    assert len(read_csv(tmp_path / "f.csv")) == 3
