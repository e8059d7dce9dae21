"""Side by side with DeepSpeed's FPDT attention on CPU: one attention layer, the same weights.

Two gloo ranks each run one forward + backward of one attention layer (QKV projection, RoPE,
chunked attention, output projection) under ``parallel.fpdt_attention`` (offload on) and under
DeepSpeed's ``deepspeed.sequence.fpdt_layer.FPDT_Attention`` (its offloading implementation),
measuring each rank's simulated device peak with ``experiments.core.memory.MemoryTracker``, and
check that both give the single-process oracle's output and gradients. Default: ``S = 4096``,
``u = 4`` chunks per rank (global chunk ``C = 1024``), ``H = 8`` heads of ``d = 64``, fp32::

    pip install deepspeed
    python -m experiments.bench.deepspeed_compare
    python -m experiments.bench.deepspeed_compare --seq-len 8192 --chunks 8

It prints a table and writes ``results/bench/deepspeed_compare_cpu.csv`` (``--out`` to change). An implementation
that fails on a rank (raises, or the rank dies) is a row with ``status=error`` and its ``error``;
the other is still measured, and the script exits non-zero after writing the CSV.

What is counted, on both sides: every tensor storage created during the step and still alive
(the device); storages made before it (the input, its output gradient, the weights, and
DeepSpeed's full-length ``[S, d]`` RoPE tables, which its caller builds once per model) are not.
The tables stay on the device for DeepSpeed's backward, so the table also shows its peak with
them (``+ RoPE tables``); our pipeline builds per-chunk tables in its own scratch, which is
counted. Host buffers (our store, DeepSpeed's pinned ``SequenceChunk`` copies) are host memory.
Both run the same attention kernel (``fpdt_kernels``' CPU flash attention), so the difference
is what each design keeps alive around it.

DeepSpeed's layer is written for CUDA and flash-attn; the few patches that run it on CPU are in
:func:`_patch_deepspeed_for_cpu`, each with its reason (written against deepspeed 0.19.8).
``deepspeed`` is not a dependency of this project: install it to run this script.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types
import weakref

import torch

from ..core.paths import BENCH_DIR
from ..core.tables import write_csv
from ..core.units import MIB
from .cli import out_file, positive_int, usage_errors
from .strategy_memory import RankRows, failed_rows, failure_summary, injected_failure, spawn_items

ROPE_BASE = 500000.0
FIELDS = ["impl", "rank", "P", "S", "u", "C", "B", "H", "d", "dtype", "device_peak_mib", "rope_tables_mib", "host_mib",
          "act_mib", "out_rel_err", "dx_rel_err", "dw_rel_err_vs_ours", "status", "error"]  # fmt: skip


def _require_deepspeed() -> None:
    """Select DeepSpeed's CPU accelerator and check that the package is there."""
    accel = os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if accel != "cpu":
        raise SystemExit(f"DS_ACCELERATOR={accel}: this comparison runs DeepSpeed on CPU; unset it or set it to cpu")
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"DeepSpeed is not installed ({exc}); it is not a dependency of this project. "
            "Install it with `pip install deepspeed` to run this comparison."
        ) from None


# --- DeepSpeed on CPU ------------------------------------------------------------------------
class _NoStream:
    """A stream on a device whose work runs in order: waiting and synchronising do nothing."""

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _flash_attn_standin() -> types.ModuleType:
    """A ``flash_attn`` module whose ``_flash_attn_forward``/``_flash_attn_backward`` (flash-attn
    2.7's signatures, the ones DeepSpeed calls) run ``fpdt_kernels``' CPU kernels: the kernels our
    pipeline runs, so neither side's peak owes anything to a different kernel's temporaries."""
    import fpdt_kernels

    def forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                softcap=0.0, alibi_slopes=None, return_softmax=False):  # fmt: skip
        assert dropout_p == 0.0 and window_size_left == window_size_right == -1 and alibi_slopes is None
        out, lse = fpdt_kernels.attention_chunk_forward(
            q, k, v, q_start=0, k_start=0, causal=causal, softmax_scale=softmax_scale
        )
        return out.to(q.dtype), lse, None, None  # out in q's dtype, lse [B, H, C] fp32: as flash-attn

    def backward(dout, q, k, v, out, lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size_left=-1,
                 window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False,
                 rng_state=None):  # fmt: skip
        # flash-attn writes the block's gradients into dq, dk, dv; DeepSpeed passes zeros, so
        # accumulating into them (the kernel's contract) writes them.
        direct = all(g.dtype == torch.float32 for g in (dq, dk, dv))
        grads = fpdt_kernels.attention_chunk_backward(
            dout, q, k, v, out, lse, q_start=0, k_start=0, causal=causal, softmax_scale=softmax_scale,
            **(dict(dq=dq, dk=dk, dv=dv) if direct else {}),
        )  # fmt: skip
        if not direct:
            for dst, g in zip((dq, dk, dv), grads, strict=True):
                dst.copy_(g)
        return dq, dk, dv, None

    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = "2.7.0"
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_forward, iface._flash_attn_backward = forward, backward
    pkg.flash_attn_interface = iface
    return pkg


def _patch_deepspeed_for_cpu():
    """Import ``deepspeed.sequence.fpdt_layer`` so that it runs on CPU; returns the module.

    Each patch, and why:

    1. ``flash_attn``: the layer imports flash-attn's private forward/backward (CUDA only); a
       stand-in module runs the same block attention on CPU (:func:`_flash_attn_standin`).
    2. Streams: DeepSpeed's CPU accelerator returns ``None`` for ``Stream()`` and
       ``default_stream()``, and the layer calls ``wait_stream``/``synchronize`` on them; on CPU
       every op runs in order, so a stream whose waits do nothing is exact.
    3. Host memory: the layer makes its host copies with ``torch.empty(..., device='cpu')``
       (then pins them) and its device tensors on the accelerator's device; on CPU both are CPU
       tensors, so the literal ``'cpu'`` requests are allocated under ``host_allocation()``, which
       is how the memory tracker tells host memory from the simulated device. The accelerator's
       ``on_accelerator`` (true for every CPU tensor) then answers false for those buffers, as
       CUDA's does for a pinned host tensor, so a host buffer handed to ``SequenceChunk`` is kept
       as it is instead of copied again (as on a GPU).
    """
    sys.modules["flash_attn"] = pkg = _flash_attn_standin()
    sys.modules["flash_attn.flash_attn_interface"] = pkg.flash_attn_interface

    from deepspeed.accelerator import get_accelerator

    from parallel.host_store import host_allocation

    accel = get_accelerator()
    stream = _NoStream()
    cls = type(accel)  # `Stream` is a class property there
    cls.Stream = property(lambda self: lambda *a, **k: stream)
    cls.default_stream = cls.current_stream = lambda self, *a, **k: stream

    host: set[int] = set()

    def on_accelerator(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.untyped_storage().data_ptr() not in host

    cls.on_accelerator = lambda self, t: on_accelerator(t)

    def empty(*args, device=None, **kwargs):
        if not (isinstance(device, str) and device == "cpu"):
            return torch.empty(*args, device=device, **kwargs)
        with host_allocation():
            t = torch.empty(*args, device=device, **kwargs)
        key = t.untyped_storage().data_ptr()
        host.add(key)
        weakref.finalize(t.untyped_storage(), host.discard, key)
        return t

    import deepspeed.sequence.fpdt_layer as fpdt_layer

    proxy = types.ModuleType("torch")  # the layer's `torch`, with the host-aware `empty`
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.empty = empty
    fpdt_layer.torch = proxy
    return fpdt_layer


# --- one rank --------------------------------------------------------------------------------
def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _step(fn, x, dy, params):
    x.grad = None
    for p in params:
        p.grad = None
    y = fn(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in params]


def _print_at_peak(name: str, tracker) -> None:
    """The storages live at ``tracker``'s device peak, largest first."""
    print(f"\n{name}: device peak {tracker.peak['device'] / MIB:.2f} MiB; live there:")
    for a in sorted(tracker.at_peak, key=lambda a: -a.nbytes):
        shape = "x".join(map(str, a.shape))
        print(f"  {a.nbytes / MIB:7.3f} MiB {'saved' if a.saved else '':5} {a.dtype:8} {shape:<18} {a.op:<28} {a.site}")


def _setup(rank: int, world: int, rdzv: str, args) -> dict:
    """What both implementations share on this rank: the world, the weights, this rank's input
    and output gradient (FPDT's layout), the oracle's output and input gradient there, the store."""
    import fpdt_kernels
    from parallel import AttentionWeights, HostStore, RotaryEmbedding, local_attention
    from parallel.distributed import init_distributed
    from parallel.layout import shard

    fpdt_kernels.set_backend("torch")
    group = init_distributed(rank, world, backend="gloo", init_method=f"file://{rdzv}", timeout_s=300)
    B, S, H, d, u = args.batch, args.seq_len, args.heads, args.head_dim, args.chunks
    h = H * d
    torch.manual_seed(0)  # the same weights and data on every rank
    w = AttentionWeights.random(h, H, H, d, bias=True)  # DeepSpeed's layer needs the QKV bias
    rope = RotaryEmbedding(d, ROPE_BASE)
    x_full, dy_full = torch.randn(B, S, h), torch.randn(B, S, h)
    # The oracle: the whole sequence in one process, then this rank's tokens.
    ref = _step(lambda x: local_attention(x, w, rope), x_full.clone().requires_grad_(True), dy_full, w.parameters())
    return dict(
        rank=rank, world=world, group=group, w=w, rope=rope, params=list(w.parameters()), store=HostStore(),
        want=[shard(t, world, u, rank) for t in ref[:2]],  # output, input gradient
        x=shard(x_full, world, u, rank).contiguous().requires_grad_(True),  # [B, S/P, h], FPDT layout
        dy=shard(dy_full, world, u, rank).contiguous(),
    )  # fmt: skip


def _ours(ctx: dict, args):
    """Our layer: ``(fn, input, output gradient, parameters, tensors made before the step)``."""
    from parallel import fpdt_attention

    w, rope, group, store = ctx["w"], ctx["rope"], ctx["group"], ctx["store"]

    def ours(x):
        return fpdt_attention(x, w, rope, group=group, chunks=args.chunks, offload=True, store=store)

    return ours, ctx["x"], ctx["dy"], ctx["params"], []


def _deepspeed(ctx: dict, args):
    """DeepSpeed's layer on copies of the weights, as :func:`_ours`: sequence-first ``[S/P, B, h]``
    in the same token layout (its FPDT_InputConstruct gives rank r the chunks r, r+P, ...), RoPE
    tables ``[S, 1, 1, d]``."""
    import deepspeed.comm as ds_dist

    fpdt_layer = _patch_deepspeed_for_cpu()
    ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # over the world already there
    S, H, d = args.seq_len, args.heads, args.head_dim
    cfg = types.SimpleNamespace(kv_channels=d, num_attention_heads=H, num_key_value_heads=H, hidden_size=H * d,
                                attention_dropout=0.0)  # fmt: skip
    ds_params = [p.detach().clone().requires_grad_(True) for p in ctx["params"]]
    wqkv, bqkv, wo, bo = ds_params
    layer = fpdt_layer.FPDT_Attention(cfg, wqkv, bqkv, wo, bo, ds_dist.get_world_group(), return_bias=False,
                                      chunk_size=S // args.chunks, enable_offloading=True)  # fmt: skip
    cos, sin = ctx["rope"].span(0, S)
    tables = (cos[:, None, None, :].contiguous(), sin[:, None, None, :].contiguous())
    x_sf = ctx["x"].detach().transpose(0, 1).contiguous().requires_grad_(True)
    dy_sf = ctx["dy"].transpose(0, 1).contiguous()

    def deepspeed(x_sf):
        out, _ = layer(x_sf, None, None, tables, cpu_offloading=True)
        return out

    return deepspeed, x_sf, dy_sf, ds_params, list(tables)


LAYERS = {"ours": _ours, "deepspeed": _deepspeed}


def _measure(name: str, ctx: dict, args) -> tuple[dict, list]:
    """``name``'s row on this rank, and its output, input gradient and weight gradients."""
    from parallel.host_store import allocating_on_host

    from ..core.memory import MemoryTracker, RecordingMemoryTracker

    fn, inp, grad_out, ps, extra = LAYERS[name](ctx, args)
    store = ctx["store"]
    _step(fn, inp, grad_out, ps)  # warm-up: our store allocates its buffers once, as in training
    kind = RecordingMemoryTracker if args.at_peak else MemoryTracker
    tracker = kind(on_host=allocating_on_host, exclude=store.owns, ignore=[inp, grad_out, *ps, *extra])
    with tracker:
        out = _step(fn, inp, grad_out, ps)
    if args.at_peak and ctx["rank"] == 0:
        _print_at_peak(name, tracker)
    if name == "deepspeed":  # sequence-first -> [B, S/P, ...]
        out[0], out[1] = out[0].transpose(0, 1), out[1].transpose(0, 1)
    # Host: our store's buffers (made in the warm-up, so outside the tracker) and, for
    # DeepSpeed, the pinned copies its layer makes in every call.
    host = tracker.peak["host"] + (store.peak_bytes_in_use if name == "ours" else 0)
    want = ctx["want"]
    row = dict(
        _identity(args, name, ctx["rank"], ctx["world"]),
        device_peak_mib=tracker.peak["device"] / MIB,
        rope_tables_mib=sum(t.nbytes for t in extra) / MIB,
        host_mib=host / MIB,
        act_mib=args.batch * (args.seq_len // ctx["world"]) * args.heads * args.head_dim * 4 / MIB,
        out_rel_err=_max_rel_err(out[0], want[0]), dx_rel_err=_max_rel_err(out[1], want[1]),
    )  # fmt: skip
    return row, out


def _identity(args, impl: str, rank: int, world: int) -> dict:
    S, u = args.seq_len, args.chunks
    return dict(impl=impl, rank=rank, P=world, S=S, u=u, C=S // u, B=args.batch, H=args.heads, d=args.head_dim,
                dtype="fp32")  # fmt: skip


def _error_row(args, impl: str, rank: int, world: int, error: str) -> dict:
    return dict(_identity(args, impl, rank, world), status="error", error=error)


def _rank_worker(rank: int, world: int, rdzv: str, todo: list, args, out_dir: str) -> None:
    """Measure the implementations of ``todo`` in order on this rank (see ``RankRows``)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    with RankRows(rank, world, out_dir, todo, functools.partial(_error_row, args)) as rows:
        ctx = _setup(rank, world, rdzv, args)
        grads = {}
        for name in rows:
            injected_failure(name, rank)
            row, grads[name] = _measure(name, ctx, args)
            if name == "deepspeed" and "ours" in grads:
                # Weight gradients: this rank's part of the sum, compared between the two.
                row["dw_rel_err_vs_ours"] = max(
                    _max_rel_err(a, b) for a, b in zip(grads["deepspeed"][2:], grads["ours"][2:], strict=True)
                )
            rows.write([dict(row, status="ok", error=None)])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run(args) -> list[dict]:
    """One row per implementation and rank, ``status`` ok or error (with its ``error``): one gloo
    world of ``args.ranks`` processes, a fresh one after a failure (``spawn_items``)."""
    return spawn_items(_rank_worker, list(LAYERS), args.ranks, (args,), functools.partial(_error_row, args))


def report(rows: list[dict]) -> dict:
    """Print the table (a failed row: its error); return the worst ratios over ranks (None unless
    both implementations measured on every rank) and the largest errors of the rows that did."""
    r0 = rows[0]
    act = r0["B"] * (r0["S"] // r0["P"]) * r0["H"] * r0["d"] * 4 / MIB
    print(f"\none attention layer fwd+bwd, P={r0['P']} gloo ranks, S={r0['S']}, u={r0['u']} (C={r0['C']}), "
          f"B={r0['B']} H={r0['H']} d={r0['d']} {r0['dtype']} (CPU, simulated device); act = one [B, S/P, h] "
          f"activation = {act:.1f} MiB")  # fmt: skip
    print(f"{'impl':<10}{'rank':>5}{'device peak MiB':>17}{'+ RoPE tables':>15}{'host MiB':>10}"
          f"{'out err':>10}{'dx err':>10}")  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['impl']:<10}{r['rank']:>5}  error: {r['error']}")
            continue
        print(f"{r['impl']:<10}{r['rank']:>5}{r['device_peak_mib']:>17.2f}"
              f"{r['device_peak_mib'] + r['rope_tables_mib']:>15.2f}{r['host_mib']:>10.2f}"
              f"{r['out_rel_err']:>10.1e}{r['dx_rel_err']:>10.1e}")  # fmt: skip
    ok = [r for r in rows if r["status"] == "ok"]
    err = max((max(r["out_rel_err"], r["dx_rel_err"], r.get("dw_rel_err_vs_ours") or 0.0) for r in ok), default=0.0)
    ratio = with_tables = None
    if len(ok) == len(rows):
        by = {(r["impl"], r["rank"]): r for r in rows}
        ranks = sorted({r["rank"] for r in rows})
        ratio = max(by["ours", k]["device_peak_mib"] / by["deepspeed", k]["device_peak_mib"] for k in ranks)
        ds_with_tables = {k: by["deepspeed", k]["device_peak_mib"] + by["deepspeed", k]["rope_tables_mib"]
                          for k in ranks}  # fmt: skip
        with_tables = max(by["ours", k]["device_peak_mib"] / ds_with_tables[k] for k in ranks)
        print(f"device peak, ours / DeepSpeed: {ratio:.3f} (worst rank); {with_tables:.3f} counting DeepSpeed's "
              f"full-length RoPE tables, which its caller keeps on the device for the layer")  # fmt: skip
    else:
        print("device peak, ours / DeepSpeed: not compared (a row failed)")
    print(f"largest relative error (outputs and input gradients vs the one-process oracle, weight gradients "
          f"DeepSpeed vs ours): {err:.1e}")  # fmt: skip
    return {"ratio": ratio, "ratio_with_tables": with_tables, "max_rel_err": err}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=positive_int, default=2)
    parser.add_argument("--seq-len", type=positive_int, default=4096)
    parser.add_argument("--chunks", type=positive_int, default=4, help="u: chunks per rank (global chunk C = S/u)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--at-peak", action="store_true", help="list rank 0's storages live at each device peak")
    parser.add_argument("--out", type=out_file, default=BENCH_DIR / "deepspeed_compare_cpu.csv")
    args = parser.parse_args(argv)
    pieces = args.ranks * args.chunks
    if args.seq_len % pieces:
        parser.error(f"--seq-len {args.seq_len} must split into --ranks x --chunks = {pieces} equal pieces; "
                     f"use a multiple of {pieces}")  # fmt: skip
    from parallel import check_setup

    # Both layers split the heads over the ranks (MHA: Hkv = H), as our fpdt does.
    with usage_errors(parser, f"--heads {args.heads} --ranks {args.ranks}"):
        check_setup("fpdt", args.seq_len, args.ranks, args.chunks, args.heads, args.heads)
    _require_deepspeed()
    rows = run(args)
    # The CSV first: a failed or disagreeing measurement is a recorded row, never a lost run.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out, FIELDS)
    summary = report(rows)
    print(f"wrote {args.out}")
    if failed_rows(rows):
        raise SystemExit(failure_summary(rows, lambda r: r["impl"], args.out))
    if summary["max_rel_err"] > 1e-4:
        raise SystemExit(f"the two implementations disagree (relative error {summary['max_rel_err']:.1e}); "
                         f"rows in {args.out}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
