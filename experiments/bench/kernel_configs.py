"""Every autotune config of each Triton attention kernel, timed alone: what autotune chooses
from, and by how much the winner wins.

For each head dim and causal flag it builds ``flash_attention``'s own launches (forward, dK/dV,
dQ) at bf16, ``B*S`` tokens, ``H*d = 2048``, and times each config autotune may choose there
(``--all``: every config) with ``triton.testing.do_bench`` (p50). A config that fails to compile
or launch is a row with its error, not the end of the sweep. ``clean`` says whether the kernel's
tile table lists the config as spill-free on this GPU's family (autotune only considers those).
Every kernel's tensor-descriptor tiles (names ending ``tma``/``tma ws``; sm_90) are timed beside
the others whatever ``FPDT_TMA`` says: that variable only lets autotune pick them.
``fwd_scale_first`` is the forward as it was before it scaled only the row maxima (every score
scaled, then shifted: one multiply more per score), timed config by config beside ``fwd``.

TFLOP/s per kernel counts the matmuls the kernel executes, each ``2*B*H*S^2*d`` FLOPs (halved
when causal), as the flash-attn convention counts the forward's two: the dK/dV kernel runs 4,
the dQ kernel 3 (it recomputes ``S`` and ``dP``), the fused backward 5 (delta, a small pass, is
not timed). So a row says how busy the kernel keeps the GPU; the convention credits a whole
backward with 5 whichever kernels run it (the split pair runs 7), which ``bench_attention``
reports. The CSV's ``flop_convention`` column says this per row.

    python -m experiments.bench.kernel_configs --out configs.csv            # d 128,64, causal and not
    python -m experiments.bench.kernel_configs --compile-only --head-dims 64 --causal true
"""

from __future__ import annotations

import argparse
import csv
import sys

import torch

from fpdt_kernels.attention.api import MAX_HEAD_DIM

from .cli import check_divides, names_list, out_file, positive_int, positive_ints

CSV_FIELDS = (
    "device", "commit", "triton", "kernel", "config", "clean", "S", "B", "H", "d", "causal", "dtype",
    "p50_ms", "tflops", "flop_convention", "error",
)  # fmt: skip
# Matmuls of the kernel, in units of one forward matmul (2*B*H*S^2*d FLOPs, halved when causal).
_MATMULS = {"fwd": 2, "fwd_scale_first": 2, "dkdv": 4, "dq": 3, "fused": 5}


def _launches(d: int, causal: bool, S: int, tokens: int, dtype: torch.dtype):
    """``{kernel name: (Launch, Tiles)}`` for one shape, built by the kernels' own launch code."""
    from fpdt_kernels.attention import triton_bwd, triton_fwd
    from fpdt_kernels.attention.common import default_scale

    H, B = 2048 // d, max(1, tokens // S)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, S, H, d, generator=gen, device="cuda", dtype=dtype) for _ in range(4))
    scale = default_scale(d, None)
    q, k, v, do = triton_fwd.pad_inputs(q, k, v, do)
    out = torch.empty(B, S, H, d, device="cuda", dtype=dtype)
    lse = torch.empty(B, H, S, device="cuda", dtype=torch.float32)
    fwd = triton_fwd.forward_launch(q, k, v, 0, 0, causal, scale, out, lse, False)
    triton_fwd.run(fwd)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    bwd = triton_bwd.backward_launches(do, q, k, v, out, lse, None, 0, 0, causal, scale, *grads, False)
    triton_bwd.run(bwd[0])  # delta, which both backwards read
    dq32 = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
    fused = triton_bwd.backward_launches(
        do, q, k, v, out, lse, bwd[0].args["Delta"], 0, 0, causal, scale, dq32, *grads[1:], False, fused=True
    )
    shape = dict(S=S, B=B, H=H, d=d, causal=causal)
    return shape, {
        "fwd": (fwd, triton_fwd.TILES),
        "fwd_scale_first": (fwd._replace(args={**fwd.args, "SCALE_POSITIVE": False}), triton_fwd.TILES),
        "dkdv": (bwd[-2], triton_bwd.DKDV_TILES),
        "dq": (bwd[-1], triton_bwd.DQ_TILES),
        "fused": (fused[-1], triton_bwd.FUSED_TILES),
    }


def _grid(launch, config):
    return launch.grid(config.kwargs) if callable(launch.grid) else launch.grid


def _call(launch, config):
    from fpdt_kernels.attention.triton_common import set_tma_allocator, uses_tma

    jit = launch.kernel.fn  # the autotuner's kernel: launch it with this config's meta-parameters
    if uses_tma(config):
        set_tma_allocator()  # the scratch its descriptors are built in (this thread's)
    return lambda: jit[_grid(launch, config)](**launch.args, **config.all_kwargs())


def sweep(args, writer=None, meta=None) -> list[dict]:
    from triton.testing import do_bench

    from fpdt_kernels.attention.triton_common import current_arch, tile_name

    rows = []
    for d in args.head_dims:
        for causal in args.causals:
            shape, launches = _launches(d, causal, args.seq_len, args.tokens, torch.bfloat16)
            for name, (launch, tiles) in launches.items():
                if name not in args.kernels:
                    continue
                usable = {tile_name(c) for c in tiles.launch_usable(tiles.configs, launch.args, current_arch())}
                for config in tiles.configs:
                    if not (args.all or tile_name(config) in usable):
                        continue
                    row = dict(meta or {}, kernel=name, config=tile_name(config), clean=tile_name(config) in usable)
                    row.update(shape, dtype="bf16", p50_ms="", tflops="", error="",
                               flop_convention=f"executed: {_MATMULS[name]} matmuls of 2*B*H*S^2*d"
                                               f"{', halved (causal)' if causal else ''}")  # fmt: skip
                    try:
                        fn = _call(launch, config)
                        fn()
                        torch.cuda.synchronize()
                        if not args.compile_only:
                            ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                            flops = _MATMULS[name] * 2.0 * shape["B"] * shape["H"] * args.seq_len**2 * d
                            flops *= 0.5 if causal else 1.0
                            row.update(p50_ms=f"{ms:.4f}", tflops=f"{flops / ms / 1e9:.1f}")
                    except Exception as e:  # a config that does not build is a row, not the end
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                        torch.cuda.synchronize()
                    rows.append(row)
                    if writer:
                        writer.writerow(row)
                    print(
                        f"{name:<5} d={d:<4} causal={causal!s:<6} {row['config']:<18} clean={row['clean']!s:<6}"
                        f" {row['p50_ms']:>9} ms {row['tflops']:>7} TFLOP/s {row['error']}",
                        flush=True,
                    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=positive_ints, default=[128, 64])
    p.add_argument("--kernels", type=names_list(_MATMULS, "kernel"), default=list(_MATMULS),
                   help="comma list of " + ",".join(_MATMULS))  # fmt: skip
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--seq-len", type=positive_int, default=16384)
    p.add_argument("--tokens", type=positive_int, default=None,
                   help="B*S, a multiple of --seq-len (default 16384, or --seq-len if longer: B=1)")  # fmt: skip
    p.add_argument("--all", action="store_true", help="also the configs the tile tables rule out here (spills)")
    p.add_argument("--compile-only", action="store_true", help="run each config once (fills Triton's cache)")
    p.add_argument("--out", type=out_file, help="CSV of every config's row (default: printed only)")
    args = p.parse_args(argv)
    args.causals = {"both": [True, False], "true": [True], "false": [False]}[args.causal]
    if args.tokens is None:
        args.tokens = args.seq_len * max(1, 16384 // args.seq_len)
    check_divides(p, "--seq-len", args.seq_len, "--tokens", args.tokens)
    for d in args.head_dims:
        if d > MAX_HEAD_DIM:
            p.error(f"--head-dims {d}: the kernels take head dims up to {MAX_HEAD_DIM}")
    if not torch.cuda.is_available():
        print("kernel_configs needs a CUDA GPU: it times compiled kernels", file=sys.stderr)
        return 2
    from ..core.provenance import device_name, git_commit, package_version

    meta = dict(device=device_name(True), commit=git_commit(), triton=package_version("triton"))
    if args.out is None:
        sweep(args, meta=meta)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        rows = sweep(args, writer, meta)
    print(f"wrote {args.out}: {sum(1 for r in rows if not r['error'])} of {len(rows)} configs ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
