"""Compile every Triton kernel for NVIDIA GPUs on a machine without one, and check the result.

Triton compiles for a target it is not running on: source -> ttir -> ttgir -> llir -> ptx ->
cubin, with the ``ptxas`` that ships in the triton wheel. For every kernel x every config
autotune may choose there (after pruning by head dim, dtype and target), this prints registers,
spill bytes, shared memory and what the PTX contains (``wgmma``/``mma.sync``, ``cp.async``
pipelining, 16-byte loads, TMA copies, ``setmaxnreg`` for warp specialisation, wgmma groups left
in flight, atomics, the copy engine's bulk reductions), and exits non-zero on a compile error, a
spill, or shared memory over the target's limit. The launches are built by the same functions
the GPU path uses (``forward_launch``, ``backward_launches``) on meta tensors, so what is checked
is what runs.
Every kernel's tensor-descriptor tiles (``tma``, ``tma ws``) are checked on sm_90 wherever the
launch allows them (``TMA_OK``, and for ``ws`` the kernel's ``ws_applies``), whether or not
``FPDT_TMA`` lets autotune pick them.

Usage (the interpreter must be off: ``TRITON_INTERPRET`` unset or 0)::

    python -m fpdt_kernels.compile_check                      # full matrix: sm_90, sm_80; bf16, fp16;
                                                         # d 64, 128, 256, 40, 59, 111; causal or not;
                                                         # MHA, GQA, accumulate (the chunk API),
                                                         # docs (varlen, GQA), docs-accumulate (the
                                                         # chunk API with cu_seqlens)
    python -m fpdt_kernels.compile_check --quick              # the CI subset (tests/test_compile_check.py)
    python -m fpdt_kernels.compile_check --arch 90 --dtype bf16 --head-dim 128 --causal true --csv out.csv
    python -m fpdt_kernels.compile_check --variant docs docs-accumulate      # the packed-document kernels
    python -m fpdt_kernels.compile_check --all-configs        # also the configs pruning drops (tuning)

Runs on every core (``--jobs``); a compile takes 1-5 s per config on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields

ARCHS = (90, 80)
DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 128, 256, 40, 59, 111)
# What a launch may vary beyond dtype, head dim and causality. ``docs``: packed documents as
# ``flash_attention_varlen`` runs them (GQA, written gradients); ``docs-accumulate``: as the chunk
# API runs them with ``cu_seqlens`` (merged output, accumulated gradients).
VARIANTS = ("mha", "gqa", "accumulate", "docs", "docs-accumulate")
KERNELS = ("fwd", "dkdv", "dq", "delta", "fused")


@dataclass
class Case:
    """What one compile is: a kernel, variant, target, dtype, head dim, mask and tile config."""

    kernel: str  # fwd | dkdv | dq | delta (the split backward) | fused (the fused backward)
    variant: str
    arch: int
    dtype: str
    d: int
    causal: bool
    config: str
    pruned: bool  # autotune would not pick it on this target (compiled only with --all-configs)


@dataclass
class Job(Case):
    """A case and what ``triton.compile`` needs for it."""

    module: str = ""
    name: str = ""
    signature: tuple = ()
    constexprs: tuple = ()
    attrs: tuple = ()
    options: tuple = ()


@dataclass
class Result(Case):
    """A case and what its compile gave."""

    status: str = "ok"  # ok | spill | smem | error
    regs: int = -1
    spill: int = -1  # bytes of spill stores + loads
    smem: int = -1  # bytes of shared memory
    mma: str = ""  # wgmma | mma | fma
    cp_async: int = 0  # cp.async instructions (software pipelining)
    vec16: int = 0  # 16-byte global loads and cp.async copies
    scalar: int = 0  # global loads narrower than 8 bytes
    tma: int = 0  # tensor-memory-accelerator copies (cp.async.bulk.tensor)
    setmaxnreg: int = 0  # register reallocation between warp groups (warp specialisation)
    wgmma_pending: int = 0  # most wgmma groups left in flight at a wait (>0: asynchronous wgmma)
    atomics: int = 0  # global reductions/atomics (red/atom), e.g. the fused backward's dQ adds
    bulk_reduce: int = 0  # the copy engine's tile reductions (cp.reduce.async.bulk), its TMA tiles' dQ adds
    seconds: float = 0.0
    error: str = ""


def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _launches(kernel: str, variant: str, dtype: str, d: int, causal: bool):
    """The ``Launch`` records of one case, built on meta tensors by the GPU path's own code."""
    import torch

    from .attention import triton_bwd, triton_fwd

    dt = _dtype(dtype)
    # GQA: 8 query heads on 2 KV heads (dK/dV adds the group's parts with atomics).
    gqa = variant in ("gqa", "docs")
    B, S, H, Hkv = 2, 1024, (8 if gqa else 4), (2 if gqa else 4)
    accumulate = variant in ("accumulate", "docs-accumulate")
    meta = dict(device="meta")
    # Document spans (int32 [B, 2, S], rows' and keys'), as documents.py builds them.
    spans = (torch.empty(B, 2, S, dtype=torch.int32, **meta),) * 2 if variant.startswith("docs") else None
    q = torch.empty(B, S, H, d, dtype=dt, **meta)
    k = torch.empty(B, S, Hkv, d, dtype=dt, **meta)
    v = torch.empty(B, S, Hkv, d, dtype=dt, **meta)
    lse = torch.empty(B, H, S, dtype=torch.float32, **meta)
    q, k, v = triton_fwd.pad_inputs(q, k, v)
    acc = torch.float32 if accumulate else dt
    if kernel == "fwd":
        out = torch.empty(B, S, H, d, dtype=acc, **meta)
        rows = None if spans is None else spans[0]
        return [triton_fwd.forward_launch(q, k, v, 0, 0, causal, d**-0.5, out, lse, accumulate, rows)]
    out = torch.empty(B, S, H, d, dtype=dt, **meta)
    (do,) = triton_fwd.pad_inputs(torch.empty(B, S, H, d, dtype=dt, **meta))
    dp = q.shape[-1]
    fused = kernel == "fused"
    if accumulate:  # the chunk API: the caller's fp32 buffers, as chunk_backward aligns them
        dq, dk, dv = (
            triton_bwd._work_buffer(torch.empty(t.shape[:-1] + (d,), dtype=torch.float32, **meta), dp)
            for t in (q, k, v)
        )
    else:  # flash_attention's buffers, as flash_backward allocates them
        dq = torch.empty(B, S, H, dp, dtype=torch.float32 if fused else dt, **meta)
        gk = torch.float32 if H > Hkv else dt
        dk, dv = (torch.empty(B, S, Hkv, dp, dtype=gk, **meta) for _ in range(2))
    launches = triton_bwd.backward_launches(
        do, q, k, v, out, lse, None, 0, 0, causal, d**-0.5, dq, dk, dv, accumulate, spans, fused=fused
    )  # [delta, dkdv, dq] or [delta, fused]
    return [launches[{"delta": 0, "dkdv": 1, "dq": 2, "fused": 1}[kernel]]]


def _jit_function(kernel):
    """The ``JITFunction`` under ``@triton.autotune`` (or the kernel itself)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _tiles(kernel):
    from .attention import triton_bwd, triton_fwd

    tables = {"fwd": triton_fwd.TILES, "dkdv": triton_bwd.DKDV_TILES, "dq": triton_bwd.DQ_TILES}
    return dict(tables, fused=triton_bwd.FUSED_TILES).get(kernel)


def _jobs_for(kernel, variant, arch, dtype, d, causal, all_configs, limit=None) -> list[Job]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import native_specialize_impl

    from .attention.triton_common import tile_name

    backend = type(make_backend(GPUTarget("cuda", arch, 32)))
    jobs = []
    for launch in _launches(kernel, variant, dtype, d, causal):
        fn = _jit_function(launch.kernel)
        tiles = _tiles(kernel)
        if tiles is None:
            configs, usable = [triton.Config({})], None
        else:
            usable = tiles.launch_usable(tiles.configs, launch.args, arch)
            configs = tiles.configs if all_configs else usable[:limit]
        for config in configs:
            args = dict(launch.args, **config.kwargs)
            signature, constexprs, attrs = {}, {}, {}
            for i, name in enumerate(fn.arg_names):
                value = args[name]
                if i in fn.constexprs:
                    signature[name], constexprs[name] = "constexpr", value
                    continue
                # Triton's own specialization: the type, and 'D' for 16-divisible ints/pointers
                # (and a constexpr for ints equal to 1), exactly as at a real launch.
                ty, key = native_specialize_impl(backend, value, False, True, True)[:2]
                if ty == "constexpr":
                    signature[name], constexprs[name] = "constexpr", key
                    continue
                signature[name] = ty
                if key:
                    attrs[(i,)] = backend.parse_attr(key)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            jobs.append(
                Job(
                    kernel,
                    variant,
                    arch,
                    dtype,
                    d,
                    causal,
                    tile_name(config) if tiles is not None else "default",
                    usable is not None and config not in usable,
                    fn.__module__,
                    fn.__name__,
                    tuple(signature.items()),
                    tuple(constexprs.items()),
                    tuple((k, tuple(tuple(a) for a in v)) for k, v in attrs.items()),
                    tuple(options.items()),
                )  # fmt: skip
            )
    return jobs


def _ptx_features(ptx: str) -> dict:
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma"
    else:
        mma = "fma"
    cp_async = len(re.findall(r"^\s*(?:@%p\d+\s+)?cp\.async\.c[ag]\.shared", ptx, re.M))
    cp16 = len(re.findall(r"cp\.async\.c[ag]\.shared\S*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*0x10", ptx))
    vec16 = len(re.findall(r"ld\.global\S*\.v4\.b32|ld\.global\S*\.v2\.b64|ld\.global\S*\.v4\.f32", ptx)) + cp16
    scalar = len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b16|b32|u16|f32)\s", ptx))
    tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    setmaxnreg = len(re.findall(r"setmaxnreg", ptx))
    pending = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    atomics = len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:red|atom)\.global", ptx, re.M))
    bulk_reduce = len(re.findall(r"cp\.reduce\.async\.bulk", ptx))
    return dict(
        mma=mma, cp_async=cp_async, vec16=vec16, scalar=scalar, tma=tma, setmaxnreg=setmaxnreg,
        wgmma_pending=max(pending, default=0), atomics=atomics, bulk_reduce=bulk_reduce,
    )  # fmt: skip


def _compile(job: Job) -> Result:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    from .attention.triton_common import SHARED_MEMORY_LIMIT

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # the ptxas log is printed only on a real compile
    res = Result(**{f.name: getattr(job, f.name) for f in fields(Case)})
    fn = _jit_function(getattr(importlib.import_module(job.module), job.name))
    src = triton.compiler.ASTSource(
        fn=fn,
        signature=dict(job.signature),
        constexprs=dict(job.constexprs),
        attrs={k: [list(a) for a in v] for k, v in job.attrs},
    )
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
    except Exception as e:  # a compile error is a result to report, not a crash of the check
        res.status, res.error = "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        res.seconds = time.perf_counter() - start
        return res
    res.seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    res.regs = int(regs[-1]) if regs else -1
    res.spill = sum(int(a) + int(b) for a, b in spills) if spills else -1
    res.smem = int(compiled.metadata.shared)
    for k, v in _ptx_features(compiled.asm["ptx"]).items():
        setattr(res, k, v)
    if res.spill != 0:
        res.status = "spill"
    elif res.smem > SHARED_MEMORY_LIMIT[job.arch]:
        res.status = "smem"
    return res


def build_jobs(archs, dtypes, head_dims, causals, variants, kernels, all_configs, limit=None) -> list[Job]:
    """The compiles of a selection; ``limit``: only the first usable configs of each launch."""
    jobs, seen = [], set()
    for arch in archs:
        for dtype in dtypes:
            for d in head_dims:
                for causal in causals:
                    for kernel in kernels:
                        for variant in variants:
                            if not _applies(kernel, variant):
                                continue
                            for job in _jobs_for(kernel, variant, arch, dtype, d, causal, all_configs, limit):
                                # Identical compiles (e.g. delta is the same causal or not) run once.
                                key = (
                                    job.module,
                                    job.name,
                                    job.signature,
                                    job.constexprs,
                                    job.attrs,
                                    job.options,
                                    arch,
                                )
                                if key not in seen:
                                    seen.add(key)
                                    jobs.append(job)
    return jobs


def _applies(kernel, variant):
    if kernel == "delta":
        return variant == "mha"
    return True


# The CI subset (about a minute on 2 cores): sm_90, bf16, causal; every tile of the forward,
# dK/dV and dQ kernels at d=128 (their TMA and ws tiles too), the first two at d=64; the forward's
# first three at the odd d=40 (16-byte loads through the head-dim mask, a TMA box wider than the
# rows); the packed-document kernels' first (preferred) tile at d=128 (and the chunk API's at
# d=64); the split dK/dV at d=256; the fused backward's first two tiles (MHA, accumulating) and
# every fused tile for GQA (its TMA tiles add dQ by bulk reductions), at d=128.
QUICK = (
    dict(archs=(90,), dtypes=("bf16",), head_dims=(128,), causals=(True,), variants=("mha",),
         kernels=("fwd", "dkdv", "dq", "delta")),
    dict(archs=(90,), dtypes=("bf16",), head_dims=(64,), causals=(True,), variants=("mha",),
         kernels=("fwd", "dkdv", "dq", "delta"), limit=2),
    dict(archs=(90,), dtypes=("bf16",), head_dims=(40,), causals=(True,), variants=("mha",), kernels=("fwd",),
         limit=3),
    dict(archs=(90,), dtypes=("bf16",), head_dims=(128,), causals=(True,), variants=("docs", "docs-accumulate"),
         kernels=("fwd", "dkdv", "dq"), limit=1),
    dict(archs=(90,), dtypes=("bf16",), head_dims=(64,), causals=(True,), variants=("docs-accumulate",),
         kernels=("fwd", "dkdv", "dq"), limit=1),
    dict(archs=(90,), dtypes=("bf16",), head_dims=(256,), causals=(True,), variants=("gqa",), kernels=("dkdv",),
         limit=1),  # the split dK/dV (wgmma at d=256)
    dict(archs=(90,), dtypes=("bf16",), head_dims=(128,), causals=(True,), variants=("mha", "accumulate"),
         kernels=("fused",), limit=2),  # the fused backward's preferred tiles
    dict(archs=(90,), dtypes=("bf16",), head_dims=(128,), causals=(True,), variants=("gqa",), kernels=("fused",)),
)  # fmt: skip

_COLUMNS = ("arch", "kernel", "variant", "dtype", "d", "causal", "config", "regs", "spill", "smem", "mma", "cp_async",
            "vec16", "scalar", "tma", "setmaxnreg", "wgmma_pending", "atomics", "bulk_reduce", "seconds",
            "status")  # fmt: skip


def _row(r: Result) -> str:
    status = r.status + (" (pruned)" if r.pruned else "")
    if r.status == "error":
        status += f": {r.error}"
    return (
        f"sm_{r.arch} {r.kernel:5} {r.variant:15} {r.dtype:4} d={r.d:<3} {'causal' if r.causal else 'full  '} "
        f"{r.config:13} regs={r.regs:<3} spill={r.spill:<5} smem={r.smem / 1024:6.1f}K {r.mma:5} "
        f"cp.async={r.cp_async:<3} vec16={r.vec16:<3} scalar={r.scalar:<4} tma={r.tma:<3} setmaxnreg={r.setmaxnreg} "
        f"wgmma-pending={r.wgmma_pending} atomics={r.atomics:<4} bulk-reduce={r.bulk_reduce} "
        f"{r.seconds:5.1f}s  {status}"
    )


def run(jobs: list[Job], workers: int, out=sys.stdout) -> list[Result]:
    results = []
    if workers <= 1:
        it = map(_compile, jobs)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        it = pool.map(_compile, jobs)
    for r in it:
        results.append(r)
        print(_row(r), file=out, flush=True)
    if workers > 1:
        pool.shutdown()
    return results


def failures(results: list[Result]) -> list[Result]:
    """Results that fail the check: configs autotune may pick that did not compile cleanly."""
    return [r for r in results if r.status != "ok" and not r.pruned]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the CI subset (QUICK); other selections are ignored")
    p.add_argument("--arch", type=int, nargs="+", choices=ARCHS, help=f"targets (default {ARCHS})")
    p.add_argument("--dtype", nargs="+", choices=("bf16", "fp16", "fp32"), help=f"default {DTYPES}")
    p.add_argument("--head-dim", type=int, nargs="+", help=f"default {HEAD_DIMS}")
    p.add_argument("--causal", choices=("true", "false", "both"), default="both")
    p.add_argument("--variant", nargs="+", choices=VARIANTS, help=f"default {VARIANTS}")
    p.add_argument("--kernel", nargs="+", choices=KERNELS, help="default: all")
    p.add_argument(
        "--all-configs", action="store_true", help="also compile configs pruning drops (reported, not failed)"
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: every core)")
    p.add_argument("--csv", help="also write one row per compile to this CSV file")
    a = p.parse_args(argv)

    from .backend import triton_interpreter_on

    if triton_interpreter_on():
        p.error("TRITON_INTERPRET is on: the interpreter does not compile; run with TRITON_INTERPRET=0")
    causals = {"true": (True,), "false": (False,), "both": (False, True)}[a.causal]
    full = dict(
        archs=a.arch or ARCHS,
        dtypes=a.dtype or DTYPES,
        head_dims=a.head_dim or HEAD_DIMS,
        causals=causals,
        variants=a.variant or VARIANTS,
        kernels=a.kernel or KERNELS,
    )
    jobs = []
    for sel in QUICK if a.quick else (full,):
        jobs += build_jobs(**sel, all_configs=a.all_configs)
    import triton

    print(f"# triton {triton.__version__}: {len(jobs)} compiles on {a.jobs} workers", flush=True)
    start = time.perf_counter()
    results = run(jobs, a.jobs)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(asdict(results[0]).keys()) if results else _COLUMNS)
            w.writeheader()
            w.writerows(asdict(r) for r in results)
    bad = failures(results)
    counts = {s: sum(r.status == s and not r.pruned for r in results) for s in ("ok", "spill", "smem", "error")}
    print(
        f"# {len(results)} compiles in {time.perf_counter() - start:.0f}s: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f"; {sum(r.pruned for r in results)} pruned configs (not failed)"
    )
    for r in bad:
        print(f"FAIL {_row(r)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
