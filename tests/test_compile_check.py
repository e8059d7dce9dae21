"""The kernels compile for real GPUs: ``python -m fpdt_kernels.compile_check --quick`` in a subprocess.

Triton compiles for sm_90 on a machine without a GPU (ptxas ships in the wheel). This catches
what the interpreter hides (a jit function reading a non-constexpr global, a literal without
``.to()``) and checks the tiles autotune may pick: no spills, shared memory within the target's
limit, 16-byte loads and ``cp.async`` pipelining where expected. The full matrix (sm_80 and sm_90,
bf16/fp16, d in 64/128/256/40/59/111, every variant) is ``python -m fpdt_kernels.compile_check``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One worker runs this module: its tests share the one compile run (`quick_run`).
pytestmark = pytest.mark.xdist_group("compile_check")


def _rows(text):
    return [line.split() for line in text.splitlines() if line.startswith("sm_")]


@pytest.fixture(scope="module")
def quick_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns unless it is set; 1 is its default
    proc = subprocess.run(
        [sys.executable, "-m", "fpdt_kernels.compile_check", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return proc


def test_quick_compile_check_passes(quick_run):
    assert quick_run.returncode == 0, quick_run.stdout[-4000:] + quick_run.stderr[-4000:]
    rows = _rows(quick_run.stdout)
    kernels = {r[1] for r in rows}
    assert kernels == {"fwd", "dkdv", "dq", "delta", "fused"}, kernels


def test_compile_check_reports_hopper_features(quick_run):
    """Each row says whether the kernel uses TMA, warp specialisation, asynchronous wgmma,
    atomics and bulk reductions; the fused backward adds dQ with atomics (bulk reductions in its
    TMA tiles), the split dQ kernel writes it with stores."""
    rows = _rows(quick_run.stdout)
    for r in rows:
        for name in ("tma", "setmaxnreg", "wgmma-pending", "atomics", "bulk-reduce"):
            assert int(_field(r, name)) >= 0, " ".join(r)
    # The fused TMA tile adds dQ by the copy engine's reductions, the others by atomics.
    fused = [r for r in rows if r[1] == "fused"]
    assert any("tma" in r for r in fused)
    assert all(int(_field(r, "bulk-reduce" if "tma" in r else "atomics")) > 0 for r in fused)
    assert all(int(_field(r, "atomics")) == 0 for r in rows if r[1] == "dq" and r[2] == "mha")


def _field(row, name):
    return next(f.split("=", 1)[1] for f in row if f.startswith(name + "="))


def test_main_loops_are_pipelined_with_vector_loads(quick_run):
    """Every multi-stage tile of the attention kernels (odd d=40 included) pipelines its loop
    (cp.async) with 16-byte loads, or, the TMA tiles, with tensor-memory copies (and the
    warp-specialised ones reallocate registers between warp groups); every kernel has wgmma tiles
    on sm_90 at every head dim, and the forward, dK/dV and dQ kernels TMA and ws tiles."""
    rows = [r for r in _rows(quick_run.stdout) if r[1] != "delta"]
    assert rows, quick_run.stdout[-2000:]
    for kernel in ("fwd", "dkdv", "dq"):
        assert any("tma" in r and "ws" in r for r in rows if r[1] == kernel), kernel
    for r in rows:
        if "tma" in r:
            assert int(_field(r, "tma")) > 0, " ".join(r)
            assert (int(_field(r, "setmaxnreg")) > 0) == ("ws" in r), " ".join(r)
        elif r[8] != "s1":
            assert int(_field(r, "cp.async")) > 0 and int(_field(r, "vec16")) > 0, " ".join(r)
    for kernel, d in {(r[1], r[4]) for r in rows}:
        assert any("wgmma" in r for r in rows if (r[1], r[4]) == (kernel, d)), (kernel, d)
