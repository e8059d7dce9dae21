"""Device memory per rank of one attention layer under each multi-rank strategy, on CPU.

``--ranks`` gloo processes each run one forward + backward of one attention layer (QKV
projection, RoPE, attention, output projection) under every strategy asked for, on the same
weights and the same full-length input (each strategy takes its own shard of it), and measure
the rank's simulated device peak with :class:`experiments.core.memory.MemoryTracker`. Every
strategy's output and input gradient are checked against the single-process ``local`` oracle's
(fp32, 1e-5 relative). Default: ``P = 2``, ``S = 4096``, ``H = 8`` heads of ``d = 64``, one
layer with ``Hkv = 8`` (MHA) and one with ``Hkv = 2`` (GQA)::

    python -m experiments.bench.strategy_memory
    python -m experiments.bench.strategy_memory --kv-heads 8 --strategies ring ulysses
    python -m experiments.bench.strategy_memory --at-peak ring     # what is live at ring's peak

It prints a table (peak per rank, worst rank, and its ratio to ulysses') and writes
``experiments/results/strategy_memory_cpu.csv``.

What is counted: every tensor storage created during the step and still alive (the device);
the layer's input, its output gradient and the weights exist before the step and are not, and
the FPDT host store's buffers are host memory. Each strategy runs one warm-up step first, so the
store's buffers (made once, as in training) are outside the measured step.

When ``deepspeed`` is importable, DeepSpeed-Ulysses' ``DistributedAttention``
(``deepspeed.sequence.layer``) runs the same layer too (``deepspeed-ulysses``): our QKV and
output projections around its all-to-alls, its RoPE on full-length tables and the kernel our
``ulysses`` runs (``fpdt_kernels.flash_attention``) as its local attention. Its RoPE tables are
built once per model by its caller, so, like the weights, they are not counted. DeepSpeed is
not a dependency of this project; without it that row is left out.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.paths import RESULTS_DIR
from ..core.tables import write_csv
from ..core.units import MIB
from .cli import out_file, positive_int

ROPE_BASE = 500000.0  # Llama 3's
TOLERANCE = 1e-5  # relative, fp32
DEEPSPEED = "deepspeed-ulysses"
DEFAULT_CSV = RESULTS_DIR / "strategy_memory_cpu.csv"


@dataclass(frozen=True)
class Shape:
    """One attention layer's work: ``B`` rows of ``S`` tokens, ``H`` query and ``Hkv`` KV heads of ``d``."""

    S: int = 4096
    H: int = 8
    Hkv: int = 8
    d: int = 64
    B: int = 1

    @property
    def hidden(self) -> int:
        return self.H * self.d


def multi_rank_strategies() -> list[str]:
    from parallel.strategies import multi_rank_names

    return list(multi_rank_names())


def deepspeed_available() -> bool:
    """True when DeepSpeed's sequence-parallel layer imports (on its CPU accelerator)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed.sequence.layer  # noqa: F401
    except Exception:  # not installed, or installed without what its import needs
        return False
    return True


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _deepspeed_block(w, rope, shape: Shape):
    """``x [B, S/P, h]`` (contiguous slice ``rank``) -> ``[B, S/P, h]`` through DeepSpeed-Ulysses'
    ``DistributedAttention``, and the full-length RoPE tables it is given (made here, once)."""
    import deepspeed.comm as ds_dist
    from deepspeed.sequence.layer import DistributedAttention

    import fpdt_kernels
    from parallel.weights import project_out, project_qkv

    def local_attn(q, k, v):
        return fpdt_kernels.flash_attention(q, k, v, causal=True)

    # Batch-first [B, S, heads, d]: scatter the heads (dim 2), gather the sequence (dim 1).
    layer = DistributedAttention(local_attn, ds_dist.get_world_group(), scatter_idx=2, gather_idx=1)
    cos, sin = rope.span(0, shape.S)
    # DeepSpeed permutes the tables' first two dims to broadcast them over [B, S, heads, d].
    tables = (cos[:, None, None, :].contiguous(), sin[:, None, None, :].contiguous())

    def block(x):
        q, k, v = project_qkv(x, w)
        return project_out(layer(q, k, v, 0, tables), w)

    return block, list(tables)


def _step(fn, x: torch.Tensor, dy: torch.Tensor, params) -> torch.Tensor:
    """One forward + backward of ``fn`` from fresh gradients; the output, detached."""
    x.grad = None
    for p in params:
        p.grad = None
    y = fn(x)
    y.backward(dy)
    return y.detach()


def _measure_layer(name: str, fn, layout, extra: list, ctx: dict, opts: dict) -> dict:
    """One strategy's row on this rank: warm-up step, then the measured step."""
    from parallel.host_store import allocating_on_host

    from ..core.memory import MemoryTracker, RecordingMemoryTracker

    shape, rank, world, store, params = ctx["shape"], ctx["rank"], ctx["world"], ctx["store"], ctx["params"]
    x = layout(ctx["x_full"]).contiguous().requires_grad_(True)
    dy = layout(ctx["dy_full"]).contiguous()
    record = opts["at_peak"] == name
    kind = RecordingMemoryTracker if record else MemoryTracker

    def new_tracker():
        return kind(on_host=allocating_on_host, exclude=store.owns, ignore=[x, dy, *params, *extra])

    # Warm-up: the host store makes its buffers once, as in training, and what runs only the first
    # time under a tracker (lazy imports) runs here. Such a one-off leaves reference cycles that
    # hold the frames on its stack, and the tensors in them, until the collector runs.
    with new_tracker():
        _step(fn, x, dy, params)
    # So the measured step starts with no cyclic garbage and the collector stays off during it:
    # its peak does not depend on when the collector would have run (cyclic garbage a step makes
    # is counted until the step ends, as a GPU would hold it).
    gc.collect()
    tracker = new_tracker()
    gc.disable()
    try:
        with tracker:
            y = _step(fn, x, dy, params)
    finally:
        gc.enable()
    if record:
        _print_at_peak(f"{name}, rank {rank}, S={shape.S} H={shape.H} Hkv={shape.Hkv}", tracker)
    return dict(
        strategy=name, rank=rank, P=world, **asdict(shape), dtype="fp32",
        device_peak_mib=tracker.peak["device"] / MIB,
        host_peak_mib=(tracker.peak["host"] + store.peak_bytes_in_use) / MIB,
        act_mib=shape.B * (shape.S // world) * shape.hidden * 4 / MIB,
        out_rel_err=_max_rel_err(y, layout(ctx["y_ref"])),
        dx_rel_err=_max_rel_err(x.grad, layout(ctx["dx_ref"])),
    )  # fmt: skip


def _rank_worker(rank: int, world: int, rdzv: str, shapes, strategies, opts: dict, out_dir: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    use_deepspeed = DEEPSPEED in strategies
    if use_deepspeed:
        os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed.comm as ds_dist

    import fpdt_kernels
    from parallel import AttentionStrategy, AttentionWeights, HostStore, RotaryEmbedding, local_attention
    from parallel.distributed import init_distributed
    from parallel.layout import shard
    from parallel.strategies import get_strategy

    fpdt_kernels.set_backend("torch")
    group = init_distributed(rank, world, backend="gloo", init_method=f"file://{rdzv}", timeout_s=300)
    if use_deepspeed:
        ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    rows, usp_groups = [], {}
    for shape in shapes:
        torch.manual_seed(0)  # the same weights and data on every rank
        w = AttentionWeights.random(shape.hidden, shape.H, shape.Hkv, shape.d)
        rope = RotaryEmbedding(shape.d, ROPE_BASE)
        x_full, dy_full = torch.randn(shape.B, shape.S, shape.hidden), torch.randn(shape.B, shape.S, shape.hidden)
        x_ref = x_full.clone().requires_grad_(True)
        y_ref = _step(lambda x, w=w, rope=rope: local_attention(x, w, rope), x_ref, dy_full, w.parameters())
        ctx = dict(shape=shape, rank=rank, world=world, params=w.parameters(), x_full=x_full, dy_full=dy_full,
                   y_ref=y_ref, dx_ref=x_ref.grad)  # fmt: skip
        for name in strategies:
            ctx["store"] = HostStore()
            if name == DEEPSPEED:
                if shape.Hkv < world:  # its all-to-all does not replicate KV heads
                    continue
                fn, extra = _deepspeed_block(w, rope, shape)
                row = _measure_layer(name, fn, lambda t: shard(t, world, 1, rank), extra, ctx, opts)
            else:  # ulysses' layout: contiguous slices
                spec, degree = get_strategy(name), None
                if spec.uses_ulysses_degree:
                    degree = opts["ulysses_degree"] or spec.head_degree(world, None, shape.H, shape.Hkv)
                chunks = opts["chunks"] if spec.takes_chunks else 1
                strategy = AttentionStrategy(name, group, chunks=chunks, offload=True, store=ctx["store"],
                                             ulysses_degree=degree, subgroups=usp_groups.get(degree, ()))  # fmt: skip
                if spec.uses_ulysses_degree:  # process groups are made once per degree, by every rank
                    usp_groups[degree] = strategy.process_groups()
                fn = lambda x, s=strategy, w=w, rope=rope: s(x, w, rope)
                row = _measure_layer(name, fn, strategy.shard, [], ctx, opts)
                row.update(chunks=chunks, ulysses_degree=degree)
            rows.append(row)
    torch.save(rows, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _print_at_peak(title: str, tracker) -> None:
    """The storages live at ``tracker``'s device peak, largest first."""
    print(f"\n{title}: device peak {tracker.peak['device'] / MIB:.2f} MiB; live there:", flush=True)
    for a in sorted(tracker.at_peak, key=lambda a: -a.nbytes):
        shape = "x".join(map(str, a.shape))
        print(f"  {a.nbytes / MIB:7.3f} MiB {'saved' if a.saved else '':5} {a.dtype:8} {shape:<18} {a.op:<28} {a.site}")


def measure(shapes, strategies, ranks: int = 2, chunks: int = 4, ulysses_degree: int | None = None,
            at_peak: str | None = None) -> list[dict]:  # fmt: skip
    """One row per shape, strategy and rank (one gloo world of ``ranks`` processes for all)."""
    import torch.multiprocessing as mp

    opts = dict(chunks=chunks, ulysses_degree=ulysses_degree, at_peak=at_peak)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_worker, args=(ranks, f"{tmp}/rdzv", list(shapes), list(strategies), opts, tmp), nprocs=ranks,
                 join=True)  # fmt: skip
        return [r for k in range(ranks) for r in torch.load(Path(tmp) / f"rank{k}.pt")]


def peaks(rows: list[dict]) -> dict[tuple, float]:
    """The worst rank's device peak (MiB) per ``(strategy, S, H, Hkv, d, B)``."""
    out: dict[tuple, float] = {}
    for r in rows:
        key = (r["strategy"], r["S"], r["H"], r["Hkv"], r["d"], r["B"])
        out[key] = max(out.get(key, 0.0), r["device_peak_mib"])
    return out


def report(rows: list[dict]) -> float:
    """Print one table per shape; return the largest relative error."""
    worst = peaks(rows)
    for shape in dict.fromkeys((r["S"], r["H"], r["Hkv"], r["d"], r["B"]) for r in rows):
        S, H, Hkv, d, B = shape
        mine = [r for r in rows if (r["S"], r["H"], r["Hkv"], r["d"], r["B"]) == shape]
        P, act = mine[0]["P"], mine[0]["act_mib"]
        print(f"\none attention layer fwd+bwd, P={P} gloo ranks, S={S}, B={B}, H={H}, Hkv={Hkv}, d={d}, fp32 "
              f"(CPU, simulated device); act = one [B, S/P, h] activation = {act:.2f} MiB")  # fmt: skip
        base = worst.get(("ulysses", *shape))
        print(f"{'strategy':<19}{'peak MiB/rank':>14}{'/ act':>8}{'vs ulysses':>12}{'max rel err':>13}")
        for name in dict.fromkeys(r["strategy"] for r in mine):
            peak = worst[(name, *shape)]
            err = max(max(r["out_rel_err"], r["dx_rel_err"]) for r in mine if r["strategy"] == name)
            ratio = f"{peak / base:.3f}" if base else "-"
            print(f"{name:<19}{peak:>14.2f}{peak / act:>8.2f}{ratio:>12}{err:>13.1e}")
    return max(max(r["out_rel_err"], r["dx_rel_err"]) for r in rows)


def main(argv=None) -> list[dict]:
    names = multi_rank_strategies()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=positive_int, default=4096)
    p.add_argument("--ranks", type=positive_int, default=2)
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--kv-heads", type=positive_int, nargs="+", default=None,
                   help="one layer per value (default: --heads and --heads/4, MHA and GQA)")  # fmt: skip
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--chunks", type=positive_int, default=4, help="fpdt: chunks per rank")
    p.add_argument("--ulysses-degree", type=positive_int, default=None,
                   help="usp: default the largest that splits the heads")  # fmt: skip
    p.add_argument("--strategies", nargs="+", choices=names, default=names)
    p.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed-Ulysses out even if installed")
    p.add_argument("--at-peak", choices=[*names, DEEPSPEED], default=None,
                   help="list the storages live at this strategy's device peak, on every rank")  # fmt: skip
    p.add_argument("--out", type=out_file, default=DEFAULT_CSV)
    args = p.parse_args(argv)
    kv_heads = args.kv_heads or sorted({args.heads, max(1, args.heads // 4)}, reverse=True)
    shapes = [Shape(args.seq_len, args.heads, n, args.head_dim, args.batch) for n in kv_heads]
    strategies = list(args.strategies)
    if not args.no_deepspeed:
        if deepspeed_available():
            strategies.append(DEEPSPEED)
        else:
            print("deepspeed is not importable: DeepSpeed-Ulysses is left out (pip install deepspeed to add it)")
    if args.at_peak is not None and args.at_peak not in strategies:
        why = " (--no-deepspeed, or deepspeed not importable)" if args.at_peak == DEEPSPEED else ""
        p.error(f"--at-peak {args.at_peak} is not one of the strategies measured{why}; use one of {strategies} "
                "or add it to --strategies")  # fmt: skip
    from parallel import check_setup, get_strategy

    for shape in shapes:
        for name in strategies:
            if name == DEEPSPEED:
                if shape.Hkv < args.ranks:
                    print(f"Hkv={shape.Hkv} < {args.ranks} ranks: DeepSpeed-Ulysses does not replicate KV heads; "
                          "left out of that layer")  # fmt: skip
                continue
            degree = args.ulysses_degree if get_strategy(name).uses_ulysses_degree else None
            try:
                check_setup(name, shape.S, args.ranks, args.chunks, shape.H, shape.Hkv, ulysses_degree=degree)
            except ValueError as e:
                p.error(f"{name}, Hkv={shape.Hkv}: {e}")
    rows = measure(shapes, strategies, args.ranks, args.chunks, args.ulysses_degree, args.at_peak)
    err = report(rows)
    if err > TOLERANCE:
        raise SystemExit(f"a strategy disagrees with the local oracle (relative error {err:.1e} > {TOLERANCE:g})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
