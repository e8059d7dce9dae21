"""The attention benchmark runs end to end on CPU (toy size) and writes a well-formed CSV."""

import csv
import math

from experiments.bench import attention as bench_attention


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


def test_print_targets_checks_ratios():
    t = {
        ("ours", "fwd", 16384, 128, False): 380.0,
        ("sdpa_cudnn", "fwd", 16384, 128, False): 380.0,
        ("sdpa_flash", "fwd", 16384, 128, False): 400.0,
        ("ours", "fwd", 16384, 128, True): 300.0,
        ("sdpa_cudnn", "fwd", 16384, 128, True): 380.0,
        ("ours", "fwd", 1024, 128, False): 1.0,  # shorter S: not the one the targets look at
    }
    lines = bench_attention.print_targets(t, "ours")
    assert lines[0].startswith("targets for ours at d=128, S=16384")
    # The targets are against cuDNN; FA2's ratio is printed for information only.
    assert any("causal=False" in s and "ours/cudnn" in s and "1.00x" in s and s.endswith("ok") for s in lines)
    assert any("causal=False" in s and "ours/flash" in s and "0.95x" in s and s.endswith("(info)") for s in lines)
    assert any("causal=True" in s and "ours/cudnn" in s and "0.79x" in s and s.endswith("MISS") for s in lines)
    assert any("causal/non-causal" in s and "79%" in s and s.endswith("MISS") for s in lines)
