"""FPDT attention block on one device: step time with host offload vs without, peak memory vs
chunk count, and one recorded timeline of the chunk pipeline (copies vs compute).

One rank (``P = 1``), forward + backward of one block (QKV projection, RoPE, attention, output
projection). On CUDA: bf16, ``H=32, d=128``, ``S`` in {128K, 256K} (add 512K with
``--seq-lens``), global chunk ``C`` in {16K, 32K, 64K}; times are CUDA-event medians,
memory is ``torch.cuda.max_memory_allocated``. Without CUDA it runs a toy size so the code path
is exercised, with the simulated device of ``experiments.core.memory``. The target: offload
costs at most 15% at ``C >= 32K``. Writes ``results/bench/fpdt_block_<device>.csv`` (``--out``), the
timeline as CSV and PNG::

    python -m experiments.bench_fpdt_block
    python -m experiments.bench_fpdt_block --seq-lens 524288 --chunk-tokens 65536
    python -m experiments.bench_fpdt_block --doc-len 16384    # packed documents: blocks skipped

With ``--doc-len`` the sequence is packed documents of that length: attention stays inside each
and FPDT's schedules omit the chunk blocks (and their fetches) that share no document.

Columns: ``step_s`` the median step; ``peak_gib`` the device peak above ``base_gib``, what was
allocated before the step (the block's weights, its input and output gradient); on CUDA
``reserved_gib`` the caching allocator's peak reservation, absolute (it holds ``base_gib`` too,
so its overhead over what the step allocated is ``reserved - base - peak``) and ``alloc_retries``;
``host_gib`` the host store's bytes allocated (pinned buffers are rounded up to a power of two).
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from pathlib import Path

import torch

import fpdt_kernels
from parallel import BACKWARD_ORDERS, Timeline, check_setup, get_strategy

from ..core.dtypes import dtype_name
from ..core.memory import is_out_of_memory
from ..core.paths import BENCH_DIR
from ..core.tables import write_csv
from ..core.units import GIB, format_bytes
from .block import Block
from .cli import check_divides, error_text, out_file, positive_int, usage_errors


def _timed(fn, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(block: Block, strategy: str, S: int, C: int, offload: bool, reps: int, cuda: bool,
            backward_order: str = "auto") -> dict:  # fmt: skip
    takes_chunks = get_strategy(strategy).takes_chunks
    chunks = S // C if takes_chunks else 1
    row = dict(strategy=strategy, S=S, C=C if takes_chunks else S, chunks=chunks, offload=offload,
               backward_order=backward_order if takes_chunks else "")  # fmt: skip
    run = lambda: block.step(strategy, chunks, offload, backward_order=backward_order)
    block.new_store()  # host bytes of this configuration only
    try:
        t0 = time.perf_counter()
        run()  # warm-up: compiles, autotuning, host buffers, allocator
        if cuda:
            torch.cuda.synchronize()
        row["warmup_s"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # reserved memory of this configuration only
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = [_timed(run, True) for _ in range(reps)]
            peak = torch.cuda.max_memory_allocated() - base
            # Reserved (what the caching allocator holds, side-stream pools included) and its
            # retries (an allocation that had to free cached blocks first) say what allocated hides.
            stats = torch.cuda.memory_stats()
            extra = dict(base_gib=base / GIB, reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                         alloc_retries=stats.get("num_alloc_retries", 0))  # fmt: skip
        else:
            with block.tracker() as tracker:
                times = [_timed(run, False) for _ in range(reps)]
            peak = tracker.peak["device"]
            extra = {}
    except Exception as exc:  # an OOM at one size, or any failed measurement, is a row, not the end
        oom = is_out_of_memory(exc)
        if not oom:
            traceback.print_exc()  # what failed, and where; the row keeps its first line
        if cuda:
            torch.cuda.empty_cache()
        if oom:
            return dict(row, status="oom", error=str(exc).splitlines()[0][:300])
        return dict(row, status="error", error=error_text(exc))
    return dict(row, status="ok", step_s=statistics.median(times), peak_gib=peak / GIB,
                host_gib=block.store.bytes_allocated / GIB, **extra)  # fmt: skip


def _format_row(r: dict) -> str:
    size = lambda gib: format_bytes(gib * GIB)
    cost = f"  offload cost {100 * r['offload_cost']:+.1f}%" if "offload_cost" in r else ""
    reserved = f"  reserved {size(r['reserved_gib'])}  retries {r['alloc_retries']}" if "reserved_gib" in r else ""
    if r["status"] != "ok":
        body = f"{r['status']}: {r['error']}"
    else:
        body = f"{r['step_s']:.3f} s (warm-up {r['warmup_s']:.1f} s)  peak {size(r['peak_gib'])}{reserved}"
        body += f"  host {size(r['host_gib'])}{cost}"
    order = f" {r['backward_order']:<5}" if r.get("backward_order") else " " * 6
    return (
        f"{r['strategy']:<8} S={r['S']:>7} C={r['C']:>7} u={r['chunks']:<3} offload={r['offload']!s:<5}{order} {body}"
    )


def main(argv=None) -> list[dict]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", default=[131072, 262144] if cuda else [4096])
    parser.add_argument("--chunk-tokens", type=positive_int, nargs="+",
                        default=[16384, 32768, 65536] if cuda else [1024, 2048],
                        help="global chunk sizes C, each dividing every --seq-lens")  # fmt: skip
    parser.add_argument("--heads", type=positive_int, default=32 if cuda else 4)
    parser.add_argument("--kv-heads", type=positive_int, default=None, help="KV heads (GQA); default: --heads (MHA)")
    parser.add_argument("--backward-orders", nargs="+", default=["auto"], choices=["auto", *BACKWARD_ORDERS],
                        help="FPDT backward loops to time with offload: kv (the paper's), query, auto "
                             "(the one that moves fewer bytes)")  # fmt: skip
    parser.add_argument("--head-dim", type=positive_int, default=128 if cuda else 32)
    parser.add_argument("--reps", type=positive_int, default=3 if cuda else 1)
    parser.add_argument("--out", type=out_file, default=BENCH_DIR / f"fpdt_block_{'cuda' if cuda else 'cpu'}.csv")
    parser.add_argument("--no-timeline", dest="timeline", action="store_false", help="skip the timeline run")
    parser.add_argument("--doc-len", type=positive_int, default=None,
                        help="packed documents of this many tokens: attention inside each, FPDT skips the chunk "
                             "blocks that share none")  # fmt: skip
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if not cuda:
        fpdt_kernels.set_backend("torch")
        print("NO CUDA: toy size on the CPU (simulated device memory); GPU figures need CUDA")
    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    kv_heads = args.kv_heads or args.heads
    meta = dict(device=name, H=args.heads, Hkv=kv_heads, d=args.head_dim, dtype=dtype_name(dtype), doc_len=args.doc_len)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def record(row: dict) -> None:  # printed and written as measured: a timeout keeps what ran
        row.update(meta)
        rows.append(row)
        print(_format_row(row), flush=True)
        write_csv(rows, args.out)

    if cuda:
        _tune_kernels(args, dtype, device)
    for S in args.seq_lens:
        block = Block(S, args.heads, args.head_dim, dtype, device, doc_len=args.doc_len, n_kv_heads=kv_heads)
        record(measure(block, "ulysses", S, S, False, args.reps, cuda))
        for C in args.chunk_tokens:  # each divides S (checked)
            on_device = measure(block, "fpdt", S, C, False, args.reps, cuda)
            record(on_device)
            for order in args.backward_orders:
                offloaded = measure(block, "fpdt", S, C, True, args.reps, cuda, backward_order=order)
                if on_device["status"] == offloaded["status"] == "ok":
                    offloaded["offload_cost"] = offloaded["step_s"] / on_device["step_s"] - 1
                record(offloaded)
        del block
    print(f"wrote {args.out}")
    if args.timeline:
        _record_timeline(args, dtype, device, args.out.with_name(args.out.stem + "_timeline"))
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        raise SystemExit(f"{len(failed)} measurement(s) failed (rows with status=error in {args.out}); "
                         f"first: {failed[0]['error']}")  # fmt: skip
    return rows


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors for the sizes no measurement can run, before the first one."""
    kv_heads = args.kv_heads or args.heads
    for S in args.seq_lens:
        for C in args.chunk_tokens:
            check_divides(parser, "--chunk-tokens", C, "--seq-lens", S)
        for strategy, C in [("ulysses", S), *(("fpdt", C) for C in args.chunk_tokens)]:
            at = f"{strategy} at S={S}" + (f" C={C}" if get_strategy(strategy).takes_chunks else "")
            with usage_errors(parser, f"--heads {args.heads} --kv-heads {kv_heads}, {at}"):
                check_setup(strategy, S, 1, S // C, args.heads, kv_heads)


def _timeline_chunk(S: int, chunk_tokens: list[int]) -> int | None:
    """The timeline's chunk: the largest of ``chunk_tokens`` that splits ``S`` into >= 4 chunks,
    else ``S / u`` for the fewest chunks ``u`` in 4..64 that divide ``S``; ``None`` if none do."""
    given = [c for c in sorted(chunk_tokens, reverse=True) if S % c == 0 and S // c >= 4]
    if given:
        return given[0]
    u = next((u for u in range(4, min(S, 64) + 1) if S % u == 0), None)
    return None if u is None else S // u


def _tune_kernels(args, dtype, device) -> None:
    """Compile and autotune at a small length first: every length from ``SEQ_BUCKET_CAP`` up shares
    one autotune key, and tuning at the full length runs each config ~7 times there."""
    from fpdt_kernels.attention.triton_common import SEQ_BUCKET_CAP  # CUDA only: Triton is there

    S = 2 * SEQ_BUCKET_CAP
    t0 = time.perf_counter()
    block = Block(S, args.heads, args.head_dim, dtype, device)
    block.step("ulysses", 1, False)
    block.step("fpdt", 2, False)
    torch.cuda.synchronize()
    print(f"kernels compiled and tuned at S={S} in {time.perf_counter() - t0:.1f} s", flush=True)


def _record_timeline(args, dtype, device, stem: Path) -> None:
    """One forward+backward with per-op start/end times, for the copy/compute overlap figure."""
    S = args.seq_lens[0]
    C = _timeline_chunk(S, args.chunk_tokens)
    if C is None:
        print(f"timeline skipped: no chunk count u in 4..64 divides S={S} (the first --seq-lens); "
              "start --seq-lens with a length that has one, or pass --no-timeline")  # fmt: skip
        return
    if C not in args.chunk_tokens:
        print(f"timeline: no --chunk-tokens splits S={S} into >= 4 chunks; using C={C} (u={S // C})")
    block = Block(S, args.heads, args.head_dim, dtype, device, doc_len=args.doc_len, n_kv_heads=args.kv_heads)
    for order in args.backward_orders:  # one timeline per order; a suffix when there are several
        path = stem if len(args.backward_orders) == 1 else stem.with_name(f"{stem.name}_{order}")
        block.step("fpdt", S // C, True, backward_order=order)  # warm-up
        timeline = Timeline()
        block.step("fpdt", S // C, True, timeline, backward_order=order)
        rows = timeline.rows()
        write_csv(rows, path.with_suffix(".csv"))
        print(f"timeline: {path.with_suffix('.csv')}")
        try:
            from ..figures.plots import plot_timeline
        except ImportError as exc:  # a bare GPU box may lack matplotlib; the CSV is the record
            print(f"timeline figure skipped: {exc}")
            continue
        docs = f", documents of {args.doc_len}" if args.doc_len else ""
        title = f"FPDT block S={S} C={C} (u={S // C}), offload on, backward order {order}{docs}, {device.type}"
        for png in plot_timeline(rows, path, title=title):
            print(f"timeline: {png}")


if __name__ == "__main__":
    main()
