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
``results/bench/strategy_memory_cpu.csv`` (``--out``). A strategy that fails on a rank (raises, or the
rank dies) is a row with ``status=error`` and its ``error``; the others are still measured, and
the script exits non-zero after writing the CSV, naming the failed strategies.

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
import json
import os
import signal
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.paths import BENCH_DIR
from ..core.tables import write_atomic, write_csv
from ..core.units import MIB
from .cli import error_text, out_file, positive_int

ROPE_BASE = 500000.0  # Llama 3's
TOLERANCE = 1e-5  # relative, fp32
DEEPSPEED = "deepspeed-ulysses"
DEFAULT_CSV = BENCH_DIR / "strategy_memory_cpu.csv"
FIELDS = ["strategy", "rank", "P", "S", "H", "Hkv", "d", "B", "dtype", "device_peak_mib", "host_peak_mib", "act_mib",
          "out_rel_err", "dx_rel_err", "chunks", "ulysses_degree", "status", "error"]  # fmt: skip


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


# --- the ranks: one gloo world, a fresh one for what is left after a failure --------------------
# A strategy that raises on one rank can leave its peers waiting inside one of its collectives
# (an all-to-all, a ring exchange) that the failed rank will never join. Agreeing on success with
# a flag all-reduce cannot reach them: gloo pairs collectives by their order, so the flag would be
# paired with the collective they wait in. So a failing rank writes its error row and leaves; the
# parent stops the rest of that world after a grace period (in which peers that failed too write
# their own rows) and starts a fresh world for the measurements after the failed one. A run with
# no failure costs one world, as before; each failure costs one more, and a rank that dies (a
# signal) is handled the same way. Every rank writes each measurement's rows to a file as soon as
# it has them, so what finished before a failure is kept whatever happens to the processes.
FAIL_ENV = "FPDT_BENCH_FAIL"
GRACE_S = 5.0  # after one rank fails: how long the others get to fail on their own and say why


def injected_failure(name: str, rank: int) -> None:
    """Test hook: ``FPDT_BENCH_FAIL=<name>[@<rank>][:kill]`` makes the measurement ``name`` (a
    strategy, an implementation) fail on ``rank`` (every rank without ``@``) before it starts:
    raise, or with ``:kill`` end the process by SIGKILL, as a crash would. The tests use it to
    check that a failure is a row; without the variable nothing happens."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    target, _, how = spec.partition(":")
    target_name, _, target_rank = target.partition("@")
    if how not in ("", "kill") or (target_rank and not target_rank.isdigit()):
        raise ValueError(f"{FAIL_ENV}={spec!r} is not <name>[@<rank>][:kill]; use e.g. ring, ring@1 or ring@1:kill")
    if target_name != name or (target_rank and int(target_rank) != rank):
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"{FAIL_ENV}={spec}: injected failure of {name} on rank {rank}")


def _rows_file(out_dir, index: int, rank: int) -> Path:
    return Path(out_dir) / f"item{index}_rank{rank}.json"


def _read_rows(out_dir, index: int, rank: int) -> list[dict] | None:
    path = _rows_file(out_dir, index, rank)
    return json.loads(path.read_text()) if path.exists() else None


ErrorRow = Callable[[object, int, int, str], dict]  # (item, rank, world, error text) -> the item's row


class RankRows:
    """One rank's side of :func:`spawn_items`: iterating gives the items of ``todo`` (``(index,
    item)`` pairs) in order; :meth:`write` writes the current item's rows; an exception inside
    the ``with`` (setup included: it counts against the first item) is written as the current
    item's ``error_row`` and raised again, so the process ends and the parent stops the world."""

    def __init__(self, rank: int, world: int, out_dir: str, todo: list, error_row: ErrorRow):
        self.rank, self.world, self.out_dir, self.todo, self.error_row = rank, world, out_dir, todo, error_row
        self.current = todo[0] if todo else None

    def __iter__(self):
        for index, item in self.todo:
            self.current = (index, item)
            yield item

    def write(self, rows: list[dict]) -> None:
        index, _ = self.current
        write_atomic(_rows_file(self.out_dir, index, self.rank), json.dumps(rows))
        self.current = None  # its rows are out: what fails from here on is not this item's
        # Every rank has this item's rows before any starts the next one: a world's files are
        # then whole items, then at most one item the world failed in.
        torch.distributed.barrier()

    def __enter__(self) -> RankRows:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, Exception) and self.current is not None:
            traceback.print_exc()  # where it failed; the row keeps the first line
            index, item = self.current
            row = self.error_row(item, self.rank, self.world, error_text(exc))
            write_atomic(_rows_file(self.out_dir, index, self.rank), json.dumps([row]))
        return False


def _wait(ctx) -> int | None:
    """Wait for a world's ranks; the rank that failed first (the others then stopped), or None."""
    import torch.multiprocessing as mp

    try:
        while not ctx.join(grace_period=GRACE_S):
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        return exc.error_index
    return None


def _no_rows(rank: int, code: int | None, first: int | None) -> str:
    """The error of a rank that wrote no row for the item its world failed in."""
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    if first is None or first == rank:
        return f"rank {rank} died ({how}) without writing its result"
    return f"rank {rank} was stopped ({how}) after rank {first} failed; no result"


def _ok(rows: list[dict] | None) -> bool:
    return rows is not None and all(r.get("status") == "ok" for r in rows)


def _collect(out_dir, todo: list, ranks: int, codes: list, first: int | None, error_row: ErrorRow):
    """One world's rows, item by item, up to the first item some rank has no ok rows for (the one
    the world failed in: a rank without rows gets an error row saying how it ended); and the index
    of the item after the last one collected."""
    rows, end = [], todo[0][0]
    for index, item in todo:
        got = [_read_rows(out_dir, index, r) for r in range(ranks)]
        for r in range(ranks):
            rows += got[r] or [error_row(item, r, ranks, _no_rows(r, codes[r], first))]
        end = index + 1
        if not all(map(_ok, got)):
            break
    return rows, end


def spawn_items(worker, items: list, ranks: int, args: tuple, error_row: ErrorRow, label=str) -> list[dict]:
    """Every rank's rows for each of ``items``, in order: ``worker(rank, ranks, rdzv, todo, *args,
    out_dir)`` runs the ``(index, item)`` pairs of ``todo`` on one gloo world of ``ranks`` processes
    (through :class:`RankRows`). A rank that fails or dies makes its item's rows ``status=error``
    ones (``error_row``), and the items after it run in a fresh world. ``label(item)`` names an
    item in what is printed."""
    from ..core.ranks import start_ranks

    rows, start = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        while start < len(items):
            todo = list(enumerate(items))[start:]
            ctx = start_ranks(worker, (ranks, f"{tmp}/rdzv{start}", todo, *args, tmp), ranks)
            first = _wait(ctx)
            done, start = _collect(tmp, todo, ranks, [p.exitcode for p in ctx.processes], first, error_row)
            rows += done
            if first is not None and start < len(items):
                print(f"{label(items[start - 1])} failed (rank {first} first): measuring the {len(items) - start} "
                      "left in a fresh set of ranks", flush=True)  # fmt: skip
    return rows


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


def _reference(shape: Shape, rank: int, world: int) -> dict:
    """The layer's weights, input, output gradient and the single-process oracle's output and input
    gradient, the same on every rank (the strategies' shared context, less the host store)."""
    from parallel import AttentionWeights, RotaryEmbedding, local_attention

    torch.manual_seed(0)  # the same weights and data on every rank
    w = AttentionWeights.random(shape.hidden, shape.H, shape.Hkv, shape.d)
    rope = RotaryEmbedding(shape.d, ROPE_BASE)
    x_full, dy_full = torch.randn(shape.B, shape.S, shape.hidden), torch.randn(shape.B, shape.S, shape.hidden)
    x_ref = x_full.clone().requires_grad_(True)
    y_ref = _step(lambda x: local_attention(x, w, rope), x_ref, dy_full, w.parameters())
    return dict(shape=shape, rank=rank, world=world, w=w, rope=rope, params=w.parameters(), x_full=x_full,
                dy_full=dy_full, y_ref=y_ref, dx_ref=x_ref.grad)  # fmt: skip


def _our_layer(name: str, group, ctx: dict, opts: dict, usp_groups: dict):
    """``name``'s layer, its layout (ulysses': contiguous slices), no extra tensors, and its columns."""
    from parallel import AttentionStrategy
    from parallel.strategies import get_strategy

    shape, w, rope = ctx["shape"], ctx["w"], ctx["rope"]
    spec, degree = get_strategy(name), None
    if spec.uses_ulysses_degree:
        degree = opts["ulysses_degree"] or spec.head_degree(ctx["world"], None, shape.H, shape.Hkv)
    chunks = opts["chunks"] if spec.takes_chunks else 1
    strategy = AttentionStrategy(name, group, chunks=chunks, offload=True, store=ctx["store"],
                                 ulysses_degree=degree, subgroups=usp_groups.get(degree, ()))  # fmt: skip
    if spec.uses_ulysses_degree:  # process groups are made once per degree, by every rank
        usp_groups[degree] = strategy.process_groups()
    return lambda x: strategy(x, w, rope), strategy.shard, [], dict(chunks=chunks, ulysses_degree=degree)


def _deepspeed_layer(ctx: dict):
    """DeepSpeed-Ulysses' layer, its layout (contiguous slices), its RoPE tables, no more columns."""
    from parallel.layout import shard

    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed.comm as ds_dist

    # Over the world already initialised; once its backend exists, a call for another shape is a no-op.
    ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    fn, extra = _deepspeed_block(ctx["w"], ctx["rope"], ctx["shape"])
    world, rank = ctx["world"], ctx["rank"]
    return fn, lambda t: shard(t, world, 1, rank), extra, {}


def _error_row(item: tuple, rank: int, world: int, error: str) -> dict:
    shape, name = item
    return dict(strategy=name, rank=rank, P=world, **asdict(shape), dtype="fp32", status="error", error=error)


def _row_label(r: dict) -> str:
    return f"{r['strategy']} (S={r['S']} H={r['H']} Hkv={r['Hkv']})"


def _label(item: tuple) -> str:
    shape, name = item
    return _row_label(dict(asdict(shape), strategy=name))


def _rank_worker(rank: int, world: int, rdzv: str, todo: list, opts: dict, out_dir: str) -> None:
    """Measure the ``(shape, strategy)`` items of ``todo`` in order on this rank (see :class:`RankRows`)."""
    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    with RankRows(rank, world, out_dir, todo, _error_row) as out:
        import fpdt_kernels
        from parallel import HostStore
        from parallel.distributed import init_distributed

        fpdt_kernels.set_backend("torch")
        group = init_distributed(rank, world, backend="gloo", init_method=f"file://{rdzv}", timeout_s=300)
        ctx, usp_groups = None, {}
        for shape, name in out:
            injected_failure(name, rank)
            if ctx is None or ctx["shape"] != shape:
                ctx = _reference(shape, rank, world)
            ctx["store"] = HostStore()
            if name == DEEPSPEED:
                fn, layout, extra, columns = _deepspeed_layer(ctx)
            else:
                fn, layout, extra, columns = _our_layer(name, group, ctx, opts, usp_groups)
            row = _measure_layer(name, fn, layout, extra, ctx, opts)
            out.write([dict(row, **columns, status="ok", error=None)])
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
    """One row per shape, strategy and rank, ``status`` ok or error (with its ``error``); one gloo
    world of ``ranks`` processes for all, a fresh one after a failure (:func:`spawn_items`).
    DeepSpeed-Ulysses is left out of the layers with fewer KV heads than ranks (its all-to-all
    does not replicate KV heads)."""
    opts = dict(chunks=chunks, ulysses_degree=ulysses_degree, at_peak=at_peak)
    items = [(shape, name) for shape in shapes for name in strategies if name != DEEPSPEED or shape.Hkv >= ranks]
    return spawn_items(_rank_worker, items, ranks, (opts,), _error_row, label=_label)


def peaks(rows: list[dict]) -> dict[tuple, float]:
    """The worst rank's device peak (MiB) per ``(strategy, S, H, Hkv, d, B)``, of the strategies
    that measured on every rank (a peak without a failed rank's is not the worst rank's)."""
    failed = {_key(r) for r in rows if r["status"] != "ok"}
    out: dict[tuple, float] = {}
    for r in rows:
        if _key(r) not in failed:
            out[_key(r)] = max(out.get(_key(r), 0.0), r["device_peak_mib"])
    return out


def _key(r: dict) -> tuple:
    return (r["strategy"], r["S"], r["H"], r["Hkv"], r["d"], r["B"])


def failed_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] != "ok"]


def report(rows: list[dict]) -> float:
    """Print one table per shape (a failed strategy: each failed rank's error); return the largest
    relative error of the rows that measured."""
    worst = peaks(rows)
    for shape in dict.fromkeys((r["S"], r["H"], r["Hkv"], r["d"], r["B"]) for r in rows):
        S, H, Hkv, d, B = shape
        mine = [r for r in rows if (r["S"], r["H"], r["Hkv"], r["d"], r["B"]) == shape]
        P = mine[0]["P"]
        act = B * (S // P) * H * d * 4 / MIB
        print(f"\none attention layer fwd+bwd, P={P} gloo ranks, S={S}, B={B}, H={H}, Hkv={Hkv}, d={d}, fp32 "
              f"(CPU, simulated device); act = one [B, S/P, h] activation = {act:.2f} MiB")  # fmt: skip
        base = worst.get(("ulysses", *shape))
        print(f"{'strategy':<19}{'peak MiB/rank':>14}{'/ act':>8}{'vs ulysses':>12}{'max rel err':>13}")
        for name in dict.fromkeys(r["strategy"] for r in mine):
            if (name, *shape) not in worst:
                for r in failed_rows([r for r in mine if r["strategy"] == name]):
                    print(f"{name:<19}rank {r['rank']} error: {r['error']}")
                continue
            peak = worst[(name, *shape)]
            err = max(max(r["out_rel_err"], r["dx_rel_err"]) for r in mine if r["strategy"] == name)
            ratio = f"{peak / base:.3f}" if base else "-"
            print(f"{name:<19}{peak:>14.2f}{peak / act:>8.2f}{ratio:>12}{err:>13.1e}")
    return max((max(r["out_rel_err"], r["dx_rel_err"]) for r in rows if r["status"] == "ok"), default=0.0)


def failure_summary(rows: list[dict], label, out: Path) -> str:
    """The one line a run with failed rows exits with: what failed, and where the rows are."""
    names = ", ".join(dict.fromkeys(label(r) for r in failed_rows(rows)))
    return f"{len(failed_rows(rows))} of {len(rows)} rows failed (status=error in {out}): {names}"


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
    # The CSV first: a failed or disagreeing measurement is a recorded row, never a lost run.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out, FIELDS)
    err = report(rows)
    print(f"wrote {args.out}")
    if failed_rows(rows):
        raise SystemExit(failure_summary(rows, _row_label, args.out))
    if err > TOLERANCE:
        raise SystemExit(f"a strategy disagrees with the local oracle (relative error {err:.1e} > {TOLERANCE:g}); "
                         f"rows in {args.out}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
