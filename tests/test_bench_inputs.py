"""Bad input to the benchmark CLIs is a usage error that names the flag, the value and what is
allowed, raised before anything is measured or spawned; and what was measured before a failure
is written. Every case runs the CLI's ``main`` in-process; none measures anything."""

from __future__ import annotations

import argparse
import importlib

import pytest

from experiments.bench import cli
from experiments.core.tables import read_csv, write_csv, write_json

# (module of experiments.bench, argv, text the usage error must contain), by audit item.
USAGE_ERRORS = [
    # 14: kernel_configs (checked before its CUDA check, so on any machine)
    ("kernel_configs", ["--kernels", "fwdd"],
     "unknown kernel(s) ['fwdd']; use a comma list of fwd,fwd_scale_first,dkdv,dq,fused"),
    ("kernel_configs", ["--kernels", "fwd,dq,nope"], "unknown kernel(s) ['nope']"),
    ("kernel_configs", ["--seq-len", "16384", "--tokens", "1000"], "--seq-len 16384 does not divide --tokens 1000"),
    ("kernel_configs", ["--seq-len", "0"], "argument --seq-len: '0' is out of range; use an integer >= 1"),
    ("kernel_configs", ["--head-dims", "128,0"], "argument --head-dims: '0' is out of range"),
    ("kernel_configs", ["--head-dims", "300"], "--head-dims 300: the kernels take head dims up to 256"),
    # 15: attention
    ("attention", ["--seq-lens", "0", "--modes", "fwd"], "argument --seq-lens: '0' is out of range"),
    ("attention", ["--seq-lens", "-128"], "argument --seq-lens: '-128' is out of range"),
    ("attention", ["--seq-lens", ","], "argument --seq-lens: ',' lists no value"),
    ("attention", ["--heads", "0"], "argument --heads: '0' is out of range; use an integer >= 1"),
    ("attention", ["--tokens", "0"], "argument --tokens: '0' is out of range"),
    ("attention", ["--reps", "0"], "argument --reps: '0' is out of range"),
    ("attention", ["--head-dims", "x"], "argument --head-dims: 'x' is not an integer"),
    ("attention", ["--modes", "fwdd"], "unknown mode(s) ['fwdd']; use a comma list of fwd,bwd,fwd_bwd"),
    ("attention", ["--seq-lens", "128,96", "--tokens", "256"], "--seq-lens 96 does not divide --tokens 256"),
    # 16: attention_memory
    ("attention_memory", ["--seq-len", "0", "--dtypes", "fp32"], "argument --seq-len: '0' is out of range"),
    ("attention_memory", ["--batch", "0"], "argument --batch: '0' is out of range"),
    ("attention_memory", ["--seq-len", "-5"], "argument --seq-len: '-5' is out of range"),
    ("attention_memory", ["--heads", "0"], "argument --heads: '0' is out of range"),
    ("attention_memory", ["--head-dim", "0"], "argument --head-dim: '0' is out of range"),
    ("attention_memory", ["--head-dim", "300"], "--head-dim 300: the kernels take head dims up to 256"),
    # 17: fpdt_block
    ("fpdt_block", ["--seq-lens", "1024", "--chunk-tokens", "1000"],
     "--chunk-tokens 1000 does not divide --seq-lens 1024"),
    ("fpdt_block", ["--seq-lens", "1024", "--chunk-tokens", "2048"], "--chunk-tokens 2048 does not divide"),
    ("fpdt_block", ["--seq-lens", "1024", "2000", "--chunk-tokens", "512"], "512 does not divide --seq-lens 2000"),
    ("fpdt_block", ["--chunk-tokens", "0"], "argument --chunk-tokens: '0' is out of range"),
    ("fpdt_block", ["--doc-len", "0"], "argument --doc-len: '0' is out of range"),
    ("fpdt_block", ["--reps", "0"], "argument --reps: '0' is out of range"),
    ("fpdt_block", ["--heads", "4", "--kv-heads", "3"], "H=4 query heads must be a positive multiple of Hkv=3"),
    ("fpdt_block", ["--out", "{tmp}"], "is a directory; give the path of a file"),
    # 18: fpdt_memory
    ("fpdt_memory", ["--seq-len", "1024", "--chunks", "1", "3"], "--chunks 3 does not divide --seq-len 1024"),
    ("fpdt_memory", ["--batch", "0"], "argument --batch: '0' is out of range"),
    ("fpdt_memory", ["--chunks", "0"], "argument --chunks: '0' is out of range"),
    ("fpdt_memory", ["--out", "{tmp}"], "argument --out: '{tmp}' is a directory"),
    # 19: step_flops
    ("step_flops", ["--n-layers", "0"], "argument --n-layers: '0' is out of range"),
    ("step_flops", ["--loss-tile", "0"], "argument --loss-tile: '0' is out of range"),
    ("step_flops", ["--time-steps", "-1"], "argument --time-steps: '-1' is out of range; use an integer >= 0"),
    ("step_flops", ["--model", "nope"], "unknown model preset 'nope'; use one of gpt-tiny, llama-tiny"),
    ("step_flops", ["--seq-len", "102", "--recipes", "fpdt"], "seq_len=102 is not divisible by sp*chunks=4"),
    # 20: memory_report
    ("memory_report", ["--seq-lens", "256", "512", "--chunk-tokens", "0"], "argument --chunk-tokens: '0'"),
    ("memory_report", ["--seq-lens", "256", "512", "--chunk-tokens", "100"], "--chunk-tokens 100 does not divide"),
    ("memory_report", ["--seq-lens", "256", "600", "--chunk-tokens", "128"], "does not divide --seq-lens 600"),
    ("memory_report", ["--precision", "bf16"], "argument --precision: invalid choice: 'bf16'"),
    ("memory_report", ["--n-layers", "0"], "argument --n-layers: '0' is out of range"),
    ("memory_report", ["--model", "llama-tinyy"], "unknown model preset 'llama-tinyy'; use one of"),
    # 21: strategy_memory, deepspeed_compare (before any rank is spawned)
    ("strategy_memory", ["--no-deepspeed", "--ranks", "0"], "argument --ranks: '0' is out of range"),
    ("strategy_memory", ["--no-deepspeed", "--batch", "0"], "argument --batch: '0' is out of range"),
    ("strategy_memory", ["--no-deepspeed", "--head-dim", "0"], "argument --head-dim: '0' is out of range"),
    ("strategy_memory", ["--no-deepspeed", "--at-peak", "ring", "--strategies", "fpdt"],
     "--at-peak ring is not one of the strategies measured"),
    ("deepspeed_compare", ["--ranks", "0"], "argument --ranks: '0' is out of range"),
    ("deepspeed_compare", ["--chunks", "0"], "argument --chunks: '0' is out of range"),
    ("deepspeed_compare", ["--heads", "3"], "H=3 query heads are not divisible by P=2"),
    ("deepspeed_compare", ["--seq-len", "4095"], "--seq-len 4095 must split into --ranks x --chunks = 8"),
    # model_memory
    ("model_memory", ["--model", "llama-tinyy"], "unknown model preset 'llama-tinyy'"),
    ("model_memory", ["--gpus", "0"], "argument --gpus: '0' is out of range"),
    ("model_memory", ["--seq-len", "2049", "--chunks", "1"], "variant ulysses"),
]  # fmt: skip


def _main(name: str):
    return importlib.import_module(f"experiments.bench.{name}").main


@pytest.mark.parametrize(("name", "argv", "want"), USAGE_ERRORS, ids=[f"{n}:{' '.join(a)}" for n, a, _ in USAGE_ERRORS])
def test_bad_input_is_a_usage_error(name, argv, want, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        _main(name)(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and want.replace("{tmp}", str(tmp_path)) in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_check_divides_names_both_fixes(capsys):
    p = argparse.ArgumentParser(prog="x")
    with pytest.raises(SystemExit):
        cli.check_divides(p, "--chunk-tokens", 1000, "--seq-lens", 1024)
    err = capsys.readouterr().err
    assert "--chunk-tokens 1000 does not divide --seq-lens 1024" in err
    assert "(nearest: 512 or 1024)" in err and "(nearest: 1000 or 2000)" in err
    cli.check_divides(p, "--chunk-tokens", 256, "--seq-lens", 1024)  # divides: no error


def test_fpdt_block_timeline_picks_a_dividing_chunk():
    from experiments.bench.fpdt_block import _timeline_chunk

    assert _timeline_chunk(1024, [256, 512]) == 256  # the largest given with >= 4 chunks
    assert _timeline_chunk(4096, [1024, 2048]) == 1024
    assert _timeline_chunk(1022, [511]) == 146  # none given: the fewest chunks >= 4 that divide S (7)
    assert _timeline_chunk(1024, [512]) == 256
    assert _timeline_chunk(1021, [1021]) is None  # prime: skipped, with a note


def test_attention_failed_measurement_is_a_csv_row(tmp_path, monkeypatch, capsys):
    from experiments.bench import attention

    def broken(q, k, v, causal):
        raise RuntimeError("unsupported shape\nmore")

    monkeypatch.setattr(attention, "_impls", lambda cuda: {"broken": (broken, False)})
    monkeypatch.setattr(attention, "git_commit", lambda: "test")
    out = tmp_path / "a.csv"
    argv = ["--seq-lens", "16", "--head-dims", "8", "--modes", "fwd,bwd", "--causal", "true", "--out", str(out)]
    assert attention.main(argv) == 1
    rows = read_csv(out)
    assert list(rows[0]) == [*attention.CSV_FIELDS]  # the old columns, in order, then error
    assert [(r["impl"], r["mode"], r["S"], r["error"]) for r in rows] == [
        ("broken", "fwd", "16", "RuntimeError: unsupported shape"),
        ("broken", "bwd", "16", "RuntimeError: unsupported shape"),
    ]
    assert all(r["p50_ms"] == "" for r in rows)
    assert "2 measurement(s) FAILED" in capsys.readouterr().out


def test_fpdt_memory_keeps_the_rows_measured_before_a_failure(tmp_path, monkeypatch):
    from experiments.bench import fpdt_memory

    def measure(kind, chunks, B, S, H, d, offload=True):
        if chunks == 2:
            raise RuntimeError("boom")
        return dict(dict.fromkeys(fpdt_memory.FIELDS, 1.0), strategy=kind, chunks=chunks, offload=offload)

    monkeypatch.setattr(fpdt_memory, "measure", measure)
    out = tmp_path / "m.csv"
    with pytest.raises(SystemExit, match="1 measurement"):
        fpdt_memory.main(["--seq-len", "64", "--heads", "2", "--head-dim", "8", "--chunks", "1", "2", "4",
                          "--out", str(out)])  # fmt: skip
    rows = read_csv(out)
    assert [(r["strategy"], r["chunks"], r["error"]) for r in rows] == [
        ("ulysses", "1", ""), ("fpdt", "1", ""), ("fpdt", "2", "RuntimeError: boom"), ("fpdt", "4", ""),
        ("fpdt", "4", ""),
    ]  # fmt: skip


def test_fpdt_block_failed_measurement_is_a_row(tmp_path, monkeypatch):
    from experiments.bench import block, fpdt_block

    def step(self, strategy, chunks=1, offload=True, timeline=None, backward_order="auto"):
        if strategy == "fpdt" and offload:
            raise RuntimeError("kernel failed")

    monkeypatch.setattr(block.Block, "step", step)
    out = tmp_path / "b.csv"
    argv = ["--seq-lens", "64", "--chunk-tokens", "16", "--heads", "2", "--head-dim", "8", "--no-timeline"]
    with pytest.raises(SystemExit, match="1 measurement"):
        fpdt_block.main([*argv, "--out", str(out)])
    rows = read_csv(out)
    assert [(r["strategy"], r["offload"], r["status"]) for r in rows] == [
        ("ulysses", "False", "ok"), ("fpdt", "False", "ok"), ("fpdt", "True", "error"),
    ]  # fmt: skip
    assert rows[2]["error"] == "RuntimeError: kernel failed"


def test_model_memory_exits_nonzero_when_every_variant_fails(tmp_path, monkeypatch):
    from experiments.bench import model_memory

    def measure(point, job_dir):
        return dict(strategy=point.strategy, gpus=point.gpus, chunks=point.chunks, chunked_mlp=False,
                    checkpoint_on_host=False, status="error", error="worker died")  # fmt: skip

    monkeypatch.setattr(model_memory, "measure", measure)
    out = tmp_path / "m.csv"
    with pytest.raises(SystemExit, match="every variant failed"):
        model_memory.main(["--seq-len", "64", "--chunks", "1", "--out", str(out)])
    assert [r["variant"] for r in read_csv(out)] == ["local", "ulysses", "fpdt", "fpdt-plain"]


@pytest.mark.parametrize("write", [lambda p: write_csv([{"a": 1}], p), lambda p: write_json(p, {"a": 1})])
def test_a_failed_atomic_write_leaves_no_temporary(tmp_path, write):
    target = tmp_path / "out.csv"
    target.mkdir()  # a directory where the file should go: the rename fails
    with pytest.raises(OSError):
        write(target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
