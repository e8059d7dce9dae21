"""Attention benchmark: our ``fpdt_kernels.flash_attention`` against PyTorch SDPA's flash (FlashAttention-2)
and, on CUDA, cuDNN backends.

Both run in the same process on the same inputs, so each row's ratio is side by side. On CUDA the
default sweep is bf16, ``B*S = 16K`` tokens, ``H*d = 2048``, ``d in {64, 128}``,
``S in {1K..16K}``, causal and not, forward / backward / forward+backward, timed with
``triton.testing.do_bench`` (p20/p50/p80). Without CUDA it runs a toy size (fp32, ``B=1, S=128,
H=2, d=64``) through the Triton interpreter and the torch CPU backend with a wall-clock timer:
those figures say the code path works, not how fast the kernels are.

TFLOP/s convention (as FlashAttention's benchmarks): forward ``4*B*H*Sq*Sk*d``, half of it when
causal; backward 2.5x forward; forward+backward 3.5x forward. Computed at the p50 time.

Our rows are ``ours_triton`` (the split backward, the default) and ``ours_triton_fused``; with
``FPDT_TMA=1`` autotune may also pick the kernels' tensor-descriptor tiles on sm_90, and the rows
are named ``ours_triton_tma`` and ``ours_triton_fused_tma``.

Usage::

    python -m experiments.bench_attention                      # full sweep (CUDA), CSV in results/
    FPDT_TMA=1 python -m experiments.bench_attention --seq-lens 16384 --out tma.csv   # with the TMA tiles
    python -m experiments.bench_attention --quick              # d=128, S in {1K, 16K}
    python -m experiments.bench_attention --seq-lens 4096 --head-dims 128 --causal true --modes fwd
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.dtypes import DTYPES, dtype_name
from ..core.paths import BENCH_DIR
from ..core.provenance import device_name, git_commit, package_version
from .cli import check_divides, error_text, names_list, out_file, positive_int, positive_ints

MODES = ("fwd", "bwd", "fwd_bwd")
FLOP_CONVENTION = "fwd=4*B*H*Sq*Sk*d; causal x0.5; bwd=2.5*fwd; fwd_bwd=3.5*fwd"
_MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
QUANTILES = (0.2, 0.5, 0.8)
CSV_FIELDS = (
    "timestamp", "device", "commit", "torch", "triton", "impl", "mode", "B", "S", "H", "d",
    "causal", "dtype", "p20_ms", "p50_ms", "p80_ms", "tflops", "max_abs_err_vs_sdpa",
    "flop_convention", "timer", "error",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    mode: str
    B: int
    S: int
    H: int
    d: int
    causal: bool
    dtype: torch.dtype


def attention_flops(cfg: Config) -> float:
    """FLOPs of one call under ``FLOP_CONVENTION``."""
    fwd = 4.0 * cfg.B * cfg.H * cfg.S * cfg.S * cfg.d * (0.5 if cfg.causal else 1.0)
    return fwd * _MODE_FLOP_FACTOR[cfg.mode]


def _ours(backend: str, deterministic: bool | None = None) -> Callable:
    import fpdt_kernels

    def attn(q, k, v, causal):  # [B, S, H, d]
        with fpdt_kernels.use_backend(backend):
            return fpdt_kernels.flash_attention(q, k, v, causal=causal, deterministic=deterministic)

    return attn


def _sdpa_with(backend_name: str) -> Callable:
    """SDPA forced to one of its backends; ``[B, H, S, d]`` (its native layout, so no transpose
    is timed)."""

    def attn(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attn


_sdpa = _sdpa_with("FLASH_ATTENTION")  # FlashAttention-2 inside PyTorch: the reference of every row


def _ours_suffix() -> str:
    """``_tma`` when autotune may pick the kernels' tensor-descriptor tiles (``FPDT_TMA=1``, read
    when the kernels are imported): the rows then name what they timed."""
    from fpdt_kernels.attention.triton_common import TMA_AUTOTUNED

    return "_tma" if TMA_AUTOTUNED else ""


# impl name -> (attention fn, whether it takes [B, H, S, d] instead of [B, S, H, d])
def _impls(cuda: bool) -> dict[str, tuple[Callable, bool]]:
    impls = {"sdpa_flash": (_sdpa, True)}
    if cuda:
        suffix = _ours_suffix()
        impls["sdpa_cudnn"] = (_sdpa_with("CUDNN_ATTENTION"), True)
        impls["ours_triton" + suffix] = (_ours("triton"), False)  # the default: the split backward
        impls["ours_triton_fused" + suffix] = (_ours("triton", deterministic=False), False)  # the fused backward
    elif os.environ.get("TRITON_INTERPRET") == "1":
        impls["ours_triton_interp"] = (_ours("triton"), False)
    else:
        print("note: Triton interpreter off (TRITON_INTERPRET is not 1); Triton backend skipped")
    if not cuda:
        impls["ours_torch"] = (_ours("torch"), False)
    return impls


def _percentiles(times: list[float], qs=QUANTILES) -> list[float]:
    xs = sorted(times)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def _time_cpu(fn: Callable, reps: int, grad_to_none: list[torch.Tensor]) -> list[float]:
    # One thread: at the toy size a busy core made the 2-thread pool add ~8 ms wake-ups.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()  # warm-up: the interpreter and autograd allocate on the first call
        times = []
        for _ in range(reps):
            for t in grad_to_none:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return _percentiles(times)


def _time_cuda(fn: Callable, quick: bool, grad_to_none: list[torch.Tensor]) -> list[float]:
    from triton.testing import do_bench

    warmup, rep = (10, 50) if quick else (25, 100)
    return list(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES)))


def _inputs(cfg: Config, device: str, bhsd: bool, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.B, cfg.S, cfg.H, cfg.d)
    qkv = [torch.randn(shape, generator=gen, device=device, dtype=cfg.dtype) for _ in range(3)]
    do = torch.randn(shape, generator=gen, device=device, dtype=cfg.dtype)
    if bhsd:
        qkv, do = [t.transpose(1, 2).contiguous() for t in qkv], do.transpose(1, 2).contiguous()
    for t in qkv:
        t.requires_grad_(cfg.mode != "fwd")
    return qkv, do


def _bench_fn(attn: Callable, cfg: Config, qkv, do) -> Callable:
    q, k, v = qkv
    if cfg.mode == "fwd":

        def fn():
            with torch.no_grad():
                attn(q, k, v, cfg.causal)

    elif cfg.mode == "bwd":
        out = attn(q, k, v, cfg.causal)

        def fn():
            out.backward(do, retain_graph=True)

    else:

        def fn():
            attn(q, k, v, cfg.causal).backward(do)

    return fn


def _max_err_vs_sdpa(attn: Callable, bhsd: bool, cfg: Config, device: str) -> float:
    """Forward max |impl - SDPA flash| on this config's inputs: a fast kernel that is wrong is no
    result. Both see the same ``[B, S, H, d]`` tensors, in the layout each takes."""
    (q, k, v), _ = _inputs(cfg, device, bhsd=False)
    as_bhsd = lambda t: t.transpose(1, 2)
    with torch.no_grad():
        got = attn(*map(as_bhsd, (q, k, v)), cfg.causal).transpose(1, 2) if bhsd else attn(q, k, v, cfg.causal)
        ref = _sdpa(*map(as_bhsd, (q, k, v)), cfg.causal).transpose(1, 2)
    return (got.float() - ref.float()).abs().max().item()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _parse_args(argv: list[str] | None, cuda: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=positive_ints, help="comma list; CUDA 1024..16384, CPU 128")
    p.add_argument("--head-dims", type=positive_ints, help="comma list; CUDA 128,64, CPU 64")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--modes", type=names_list(MODES, "mode"), default=list(MODES),
                   help="comma list of fwd,bwd,fwd_bwd")  # fmt: skip
    p.add_argument("--tokens", type=positive_int, help="B*S per measurement; CUDA 16384, CPU = S")
    p.add_argument("--heads", type=positive_int, help="default 2048 // d on CUDA (H*d = 2048), 2 on CPU")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", type=out_file, help="CSV path; default results/bench/bench_attention_<dev>.csv")
    p.add_argument("--reps", type=positive_int, help="timed runs per measurement on CPU (default 5; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="CUDA: d=128, S in {1K,16K}; CPU: 3 reps unless --reps")
    args = p.parse_args(argv)

    args.causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    if cuda:
        args.seq_lens = args.seq_lens or ([1024, 16384] if args.quick else [1024 * 2**i for i in range(5)])
        # d=128 first: its S=16K row is the headline figure, and a timeout cuts the sweep's tail.
        args.head_dims = args.head_dims or ([128] if args.quick else [128, 64])
        args.tokens = args.tokens or 16384
    else:
        args.seq_lens = args.seq_lens or [128]
        args.head_dims = args.head_dims or [64]
        args.heads = 2 if args.heads is None else args.heads
        args.reps = args.reps or (3 if args.quick else 5)
    args.dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    for s in args.seq_lens:
        if args.tokens is not None:
            check_divides(p, "--seq-lens", s, "--tokens", args.tokens)
    if args.heads is None:
        for d in args.head_dims:
            if d > 2048:
                p.error(f"--head-dims {d}: the default --heads 2048 // d would be 0; give --heads, or d <= 2048")
    return args


def _configs(args) -> list[Config]:
    return [
        Config(mode, (args.tokens or s) // s, s, args.heads or 2048 // d, d, causal, args.dtype)
        for d in args.head_dims
        for s in args.seq_lens
        for causal in args.causals
        for mode in args.modes
    ]


_HEADER = (
    f"{'mode':<8}{'causal':>7}{'S':>7}{'d':>5}{'B':>4}{'H':>4}  {'impl':<19}"
    f"{'p20 ms':>10}{'p50 ms':>10}{'p80 ms':>10}{'TFLOP/s':>10}{'vs SDPA':>10}{'max err':>10}"
)


def _format_row(cfg: Config, impl: str, ms: list[float], tflops: float, ratio, err) -> str:
    ratio_s = f"{ratio:.3g}x" if ratio is not None else ""
    err_s = f"{err:.1e}" if err is not None else ""
    return (
        f"{cfg.mode:<8}{cfg.causal!s:>7}{cfg.S:>7}{cfg.d:>5}{cfg.B:>4}{cfg.H:>4}  {impl:<19}"
        f"{ms[0]:>10.3f}{ms[1]:>10.3f}{ms[2]:>10.3f}{tflops:>10.3g}{ratio_s:>10}{err_s:>10}"
    )


def _measure(attn: Callable, bhsd: bool, cfg: Config, device: str, cuda: bool, args) -> list[float]:
    qkv, do = _inputs(cfg, device, bhsd)
    fn = _bench_fn(attn, cfg, qkv, do)
    grads = qkv if cfg.mode != "fwd" else []
    return _time_cuda(fn, args.quick, grads) if cuda else _time_cpu(fn, args.reps, grads)


def _csv_row(meta: dict, impl: str, cfg: Config, ms: list[float], tflops: float, err) -> dict:
    return {
        **meta,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "impl": impl,
        "mode": cfg.mode,
        "B": cfg.B,
        "S": cfg.S,
        "H": cfg.H,
        "d": cfg.d,
        "causal": cfg.causal,
        "dtype": dtype_name(cfg.dtype),
        "p20_ms": f"{ms[0]:.5f}",
        "p50_ms": f"{ms[1]:.5f}",
        "p80_ms": f"{ms[2]:.5f}",
        "tflops": f"{tflops:.6g}",  # significant digits: a CPU row's rate is ~1e-6
        "max_abs_err_vs_sdpa": "" if err is None else f"{err:.3e}",
    }


def _error_row(meta: dict, impl: str, cfg: Config, error: str) -> dict:
    """The row of a measurement that failed: its configuration and ``error``, no figures."""
    row = _csv_row(meta, impl, cfg, [math.nan] * 3, math.nan, None)
    return {**row, "p20_ms": "", "p50_ms": "", "p80_ms": "", "tflops": "", "error": error}


# Targets for H100/H200, bf16, S=16K, d=128 and 64: ours/cuDNN per mode (cuDNN is the fastest
# attention PyTorch ships on Hopper), and causal vs non-causal TFLOP/s. Without cuDNN rows the
# ratio is taken against SDPA's flash backend (FlashAttention-2) instead.
TARGETS_VS_REFERENCE = {"fwd": 1.0, "bwd": 0.9}
TARGET_CAUSAL_VS_FULL = 0.9


def print_targets(tflops_at: dict[tuple, float], impl: str) -> list[str]:
    """Check the targets at the longest measured S for each d, from
    ``tflops_at[(impl, mode, S, d, causal)]``; prints and returns the lines."""
    lines = []
    ours = [k for k in tflops_at if k[0] == impl]
    for d in sorted({k[3] for k in ours}, reverse=True):
        S = max(k[2] for k in ours if k[3] == d)
        lines.append(f"targets for {impl} at d={d}, S={S} (stated for d=128 and 64, S=16384):")
        for mode, goal in TARGETS_VS_REFERENCE.items():
            for causal in (False, True):
                mine = tflops_at.get((impl, mode, S, d, causal))
                for ref_impl in ("sdpa_cudnn", "sdpa_flash"):
                    ref = tflops_at.get((ref_impl, mode, S, d, causal))
                    if mine and ref:
                        verdict = ("ok" if mine / ref >= goal else "MISS") if ref_impl == "sdpa_cudnn" else "(info)"
                        lines.append(
                            f"  {mode:<8}causal={causal!s:<6}ours/{ref_impl[5:]:<6}{mine / ref:6.2f}x  "
                            f"(target >= {goal}x vs cudnn) {verdict}"
                        )
        for mode in MODES:
            full, causal = tflops_at.get((impl, mode, S, d, False)), tflops_at.get((impl, mode, S, d, True))
            if full and causal:
                verdict = "ok" if causal / full >= TARGET_CAUSAL_VS_FULL else "MISS"
                lines.append(
                    f"  {mode:<8}causal/non-causal TFLOP/s {causal / full:6.0%}  "
                    f"(>= {TARGET_CAUSAL_VS_FULL:.0%}) {verdict}"
                )
    print("\n".join(lines))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table, write the CSV. Returns 0, or 1 if a measurement failed."""
    cuda = torch.cuda.is_available()
    if not cuda:
        # Must precede the first import of the Triton kernels (jit decorators read it).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args = _parse_args(argv, cuda)
    device = "cuda" if cuda else "cpu"
    dev_name = device_name(cuda)
    out_path = args.out or BENCH_DIR / f"bench_attention_{_slug(dev_name) if cuda else 'cpu'}.csv"
    meta = {
        "device": dev_name,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": package_version("triton") or "missing",
        "flop_convention": FLOP_CONVENTION,
        "timer": "triton.testing.do_bench" if cuda else f"perf_counter x{args.reps}",
    }
    print(f"device {dev_name} | torch {meta['torch']} | triton {meta['triton']} | {meta['commit'][:12]}")
    print(f"TFLOP/s at p50; {FLOP_CONVENTION}; 'vs SDPA' = SDPA p50 / ours p50 (>1 = ours faster)")
    if not cuda:
        print(
            "NO CUDA: GPU figures need CUDA. These are CPU timings at a toy size (Triton "
            "interpreter, torch CPU backend, SDPA on CPU): they check the code path, not speed."
        )
    impls = _impls(cuda)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    failures, errs, tflops_at = 0, {}, {}
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        print(_HEADER)
        for cfg in _configs(args):
            sdpa_p50 = None
            for impl, (attn, bhsd) in impls.items():
                try:
                    err = None
                    if impl != "sdpa_flash":
                        key = (impl, cfg.B, cfg.S, cfg.H, cfg.d, cfg.causal)  # per shape, not mode
                        if key not in errs:
                            errs[key] = _max_err_vs_sdpa(attn, bhsd, cfg, device)
                        err = errs[key]
                    ms = _measure(attn, bhsd, cfg, device, cuda, args)
                except Exception as e:  # one bad config (OOM, unsupported shape) must not end the sweep
                    failures += 1
                    print(f"FAILED {impl} {cfg}: {type(e).__name__}: {e}", file=sys.stderr)
                    if cuda:
                        torch.cuda.empty_cache()
                    writer.writerow(_error_row(meta, impl, cfg, error_text(e)))  # a row, with its error
                    f.flush()
                    continue
                tflops = attention_flops(cfg) / (ms[1] * 1e-3) / 1e12
                tflops_at[(impl, cfg.mode, cfg.S, cfg.d, cfg.causal)] = tflops
                if impl == "sdpa_flash":
                    sdpa_p50 = ms[1]
                ratio = sdpa_p50 / ms[1] if sdpa_p50 and impl != "sdpa_flash" else None
                print(_format_row(cfg, impl, ms, tflops, ratio, err), flush=True)
                writer.writerow(_csv_row(meta, impl, cfg, ms, tflops, err))
                f.flush()  # rows survive a timeout that cuts the sweep short
    if cuda:
        for impl in ("ours_triton", "ours_triton_fused"):
            print_targets(tflops_at, impl + _ours_suffix())
    print(f"wrote {out_path}" + (f"; {failures} measurement(s) FAILED" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
