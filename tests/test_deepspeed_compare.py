"""The DeepSpeed side-by-side script's own parts (DeepSpeed itself is optional and not needed
here): a clear error without it, and the CPU stand-in for flash-attn's block kernels; with
DeepSpeed installed, that DeepSpeed failing on a rank is a CSV row beside our measured rows."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fpdt_kernels
from experiments.bench import deepspeed_compare
from experiments.bench.strategy_memory import FAIL_ENV


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails as if not installed
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(SystemExit, match="pip install deepspeed"):
        deepspeed_compare.main([])


def test_flash_attn_standin_is_causal_attention():
    # flash-attn's conventions: q, k, v [B, S, H, d]; lse [B, H, S] fp32; the backward writes
    # dq, dk, dv into the buffers it is given.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    iface = deepspeed_compare._flash_attn_standin().flash_attn_interface
    with fpdt_kernels.use_backend("torch"):
        out, lse, _, _ = iface._flash_attn_forward(q.detach(), k.detach(), v.detach(), 0.0, 8**-0.5, causal=True)
        do = torch.randn_like(out)
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        iface._flash_attn_backward(do, q.detach(), k.detach(), v.detach(), out, lse, *grads, 0.0, 8**-0.5, True)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    ref.transpose(1, 2).backward(do)
    assert lse.shape == (1, 2, 16) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref.transpose(1, 2).detach())
    for got, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.distributed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (optional)")
def test_deepspeed_failing_on_one_rank_is_an_error_row_beside_ours(tmp_path):
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "experiments.bench.deepspeed_compare", "--seq-len", "512", "--chunks", "2",
           "--heads", "2", "--head-dim", "16", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", FAIL_ENV: "deepspeed@1"}  # the rank worker's test hook
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith(f"rows failed (status=error in {out}): deepspeed")
    with open(out, newline="") as f:
        rows = {(r["impl"], int(r["rank"])): r for r in csv.DictReader(f)}
    assert set(rows) == {(impl, rank) for impl in ("ours", "deepspeed") for rank in (0, 1)}
    for rank in (0, 1):
        assert rows["ours", rank]["status"] == "ok" and float(rows["ours", rank]["device_peak_mib"]) > 0
        assert rows["deepspeed", rank]["status"] == "error"
    assert "injected failure of deepspeed on rank 1" in rows["deepspeed", 1]["error"]
    assert "not compared (a row failed)" in done.stdout
