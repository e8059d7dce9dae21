"""The attention benchmark runs end to end on CPU (toy size) and writes a well-formed CSV."""

import csv
import math

from experiments import bench_attention


def test_quick_run_writes_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert bench_attention.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GPU figures need CUDA" in printed

    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench_attention.CSV_FIELDS
        rows = list(reader)

    impls = {r["impl"] for r in rows}
    assert {"sdpa_flash", "ours_torch"} <= impls
    # Every (mode, causal) pair of the default sweep has a row for SDPA and the torch backend.
    for impl in ("sdpa_flash", "ours_torch"):
        got = {(r["mode"], r["causal"]) for r in rows if r["impl"] == impl}
        assert got == {(m, c) for m in bench_attention.MODES for c in ("False", "True")}, impl

    for r in rows:
        assert (r["B"], r["S"], r["H"], r["d"], r["dtype"]) == ("1", "128", "2", "64", "float32")
        assert r["flop_convention"] == bench_attention.FLOP_CONVENTION
        assert r["commit"] and r["torch"] and r["timestamp"]
        ms = [float(r[k]) for k in ("p20_ms", "p50_ms", "p80_ms")]
        assert all(math.isfinite(x) and x > 0 for x in ms), r
        assert ms[0] <= ms[1] <= ms[2], r
        assert math.isfinite(float(r["tflops"])) and float(r["tflops"]) > 0, r
        if r["impl"] != "sdpa_flash":
            assert float(r["max_abs_err_vs_sdpa"]) < 1e-4, r


def test_flop_convention():
    cfg = bench_attention.Config("fwd", B=2, S=1024, H=16, d=128, causal=False, dtype=None)
    fwd = 4 * 2 * 16 * 1024 * 1024 * 128
    assert bench_attention.attention_flops(cfg) == fwd
    causal_bwd = bench_attention.Config("bwd", 2, 1024, 16, 128, causal=True, dtype=None)
    assert bench_attention.attention_flops(causal_bwd) == fwd * 0.5 * 2.5
    full = bench_attention.Config("fwd_bwd", 2, 1024, 16, 128, causal=False, dtype=None)
    assert bench_attention.attention_flops(full) == fwd * 3.5
