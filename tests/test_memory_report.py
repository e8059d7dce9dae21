"""The device peak of an FPDT training step grows with the sequence length by at most the design's
bound at a fixed chunk size: 4 sequence-long ``[S, h]`` fp32 tensors (the layer input, the residual
inside the layer, two gradients) and the step's int64 token ids; everything else on the device is
per chunk or per tile. Measured on the simulated device by ``experiments.bench.memory_report``,
which lists what makes the peak where it fails."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _slope(*args: str) -> tuple[float, float, str]:
    cmd = [sys.executable, "-m", "experiments.bench.memory_report", "--seq-lens", "2048", "4096",
           "--chunk-tokens", "512", *args]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    m = re.search(r"device peak slope (-?\d+) B/token \(bound (\d+) B/token", run.stdout)
    assert m, run.stdout[-3000:] + run.stderr[-3000:]
    return float(m.group(1)), float(m.group(2)), run.stdout


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fpdt_device_memory_per_token_is_bounded(precision):
    slope, bound, out = _slope("--precision", precision)
    assert bound == 4 * 32 * 4 + 3 * 8  # llama-tiny: h = 32
    assert slope <= bound, out
    if precision == "bf16-mixed":  # the residual stream in bf16: half the bytes of the fp32 one
        assert slope <= bound / 2, out


def test_a_strategy_without_chunks_is_reported_not_held_to_the_bound(capsys):
    """The bound is FPDT's chunked design: ulysses' report is printed and exits 0, saying so (it
    exited 1 without a word)."""
    from experiments.bench import memory_report

    assert memory_report.main(["--strategy", "ulysses", "--seq-lens", "256", "512"]) == 0
    out = capsys.readouterr().out
    assert "device peak slope" in out and "ulysses, which keeps whole-sequence activations, is not held to it" in out
