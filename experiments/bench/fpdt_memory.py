"""Memory evidence for FPDT on CPU: peak live "device" bytes of one attention block forward+backward.

One process (``P = 1``), fp32, the torch CPU attention backend. A dispatch-mode tracker counts
the bytes of every tensor storage created during the measured step while it is alive; storages
of the FPDT host store are host memory and are reported separately (a warm-up step allocates
the store's buffers first, as in training, where they are allocated once and reused). Tensors
that exist before the step (the block input, its output gradient, the weights) are not counted.

Rows: ``ulysses`` (the full-sequence block: at ``P = 1`` it is the ``local`` one) and ``fpdt``
with ``u`` in {1, 2, 4, 8, 16}, offload on, plus the largest ``u`` with offload off. ``act``
is one ``[B, S, h]`` fp32 activation; the block's output and the gradients of its output and
input (about 3 act) are needed by every strategy, so ``working set = peak - 3 act`` is what
chunking shrinks (roughly as ``1/u``).

Usage::

    python -m experiments.bench_fpdt_memory                 # S=16384, H=8, d=64, B=1
    python -m experiments.bench_fpdt_memory --seq-len 4096 --chunks 1 2 4
"""

from __future__ import annotations

import argparse
import math
import time
import traceback

import torch

import fpdt_kernels
from parallel import get_strategy

from ..core.paths import BENCH_DIR
from ..core.tables import write_csv
from ..core.units import MIB
from .block import Block
from .cli import check_divides, error_text, out_file, positive_int

WIDTHS = (9, 3, 8, 10, 10, 17, 10, 7)
FIELDS = ["strategy", "chunks", "offload", "B", "S", "H", "d", "dtype", "peak_mib", "act_mib", "peak_acts",
          "working_set_mib", "host_store_mib", "host_allocations", "step_s"]  # fmt: skip


def measure(kind: str, chunks: int, B: int, S: int, H: int, d: int, offload: bool = True) -> dict:
    block = Block(S, H, d, torch.float32, "cpu", batch=B)
    offload = offload and get_strategy(kind).offloads
    # Warm-up, for every row alike: the host store allocates its buffers once, and first calls
    # (kernel selection, allocator) stay out of step_s.
    block.step(kind, chunks, offload)
    t0 = time.perf_counter()
    with block.tracker() as tracker:
        block.step(kind, chunks, offload)
    seconds = time.perf_counter() - t0
    act, peak = B * S * H * d * 4, tracker.peak["device"]
    return dict(
        strategy=kind, chunks=chunks, offload=offload, B=B, S=S, H=H, d=d, dtype="fp32",
        peak_mib=peak / MIB, act_mib=act / MIB, peak_acts=peak / act, working_set_mib=(peak - 3 * act) / MIB,
        host_store_mib=block.store.peak_bytes_in_use / MIB,
        host_allocations=block.store.allocations, step_s=seconds,
    )  # fmt: skip


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=positive_int, default=16384)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--chunks", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="FPDT chunk counts u, each dividing --seq-len")  # fmt: skip
    parser.add_argument("--out", type=out_file, default=BENCH_DIR / "fpdt_memory_cpu.csv")
    args = parser.parse_args(argv)
    for u in args.chunks:
        check_divides(parser, "--chunks", u, "--seq-len", args.seq_len)
    fpdt_kernels.set_backend("torch")
    dims = (args.batch, args.seq_len, args.heads, args.head_dim)
    runs = [("ulysses", 1, True), *(("fpdt", u, True) for u in args.chunks), ("fpdt", max(args.chunks), False)]
    print(f"one attention block fwd+bwd, P=1, B={dims[0]} S={dims[1]} H={dims[2]} d={dims[3]} fp32 (CPU)")
    print(f"act = one [B, S, h] fp32 activation = {math.prod(dims) * 4 / MIB:.1f} MiB")
    header = ("strategy", "u", "offload", "peak MiB", "peak/act", "working set MiB", "host MiB", "s")
    cells = [f"{name:>{w}}" for name, w in zip(header, WIDTHS, strict=True)]
    print(f"{header[0]:<9}" + "".join(cells[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, u, offload in runs:  # each row printed and written as measured: a failure keeps the others
        try:
            r = measure(kind, u, *dims, offload=offload)
        except Exception as exc:  # a failed measurement is a row with its error, not the end
            traceback.print_exc()
            B, S, H, d = dims
            r = dict(dict.fromkeys(FIELDS), strategy=kind, chunks=u, offload=offload and get_strategy(kind).offloads,
                     B=B, S=S, H=H, d=d, dtype="fp32", error=error_text(exc))  # fmt: skip
        rows.append(r)
        head = f"{r['strategy']:<9}{r['chunks']:>3}{r['offload']!s:>8}"
        if r.get("error"):
            print(f"{head}  error: {r['error']}")
        else:
            print(
                f"{head}{r['peak_mib']:>10.1f}{r['peak_acts']:>10.2f}"
                f"{r['working_set_mib']:>17.1f}{r['host_store_mib']:>10.1f}{r['step_s']:>7.1f}"
            )
        write_csv(rows, args.out, FIELDS)
    print(f"wrote {args.out}")
    failed = [r for r in rows if r.get("error")]
    if failed:
        raise SystemExit(f"{len(failed)} measurement(s) failed (rows with an error in {args.out}); "
                         f"first: {failed[0]['error']}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
