"""Which tensors make the device peak of a training step grow with the sequence length.

Runs one training step (after a warm-up step) of a model on one rank at two or more lengths with
the same chunk size, each under a recording memory tracker, and lists every storage live at the
device peak: the op and the code that allocated it, its shape and dtype, whether autograd saved
it for the backward. Storages are grouped by allocation site; a group whose bytes grow between
the lengths is a per-token term, reported in bytes per token. The total slope is printed beside
the design's bound: 4 ``[S, h]`` fp32 tensors per token (the layer input, the residual inside the
layer and two gradients; everything else on the device is per chunk or per tile) plus the step's
token ids, labels and positions (3 int64 per token, whatever ``h``)::

    python -m experiments.bench.memory_report                                   # llama-tiny, fpdt, C=1024
    python -m experiments.bench.memory_report --model llama3.2-1b --n-layers 2 --seq-lens 8192 16384 \\
        --chunk-tokens 4096 --precision bf16-mixed
    python -m experiments.bench.memory_report --model llama3.2-1b --seq-lens 131072 262144 \\
        --chunk-tokens 32768 --precision bf16-mixed --fake-tensors          # the real depth, no compute

On CPU the device is simulated (every tensor not kept on the host counts); on CUDA the CUDA
tensors are recorded the same way. ``--fake-tensors`` runs the steps on fake tensors: the same
allocations as a CPU run without any compute, so a model's full depth at the lengths a GPU trains
is reported in minutes. One process, one rank, ``gpus=1`` of ``--strategy`` (default ``fpdt``,
with ``chunks = S / chunk_tokens``; a strategy that takes no chunks runs one). The exit status is 1
when an FPDT slope exceeds the bound (saying so), else 0; other strategies are reported, not held
to it.
"""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass

import torch

from models import get_config
from parallel import get_strategy, strategy_names

from ..core.memory import Allocation, RecordingMemoryTracker, ShapesOnly
from ..core.point import Point
from ..core.units import format_bytes
from ..training.precision import PRECISIONS
from .cli import check_divides, model_name, positive_int, usage_errors


@dataclass(frozen=True)
class SiteGrowth:
    """One allocation site's bytes live at the peak, per length, and its slope."""

    site: str
    op: str
    shapes: str  # at the longest length
    dtype: str
    saved: bool
    bytes_by_len: dict
    per_token: float  # bytes per token between the shortest and the longest length


def _point(args, seq_len: int) -> Point:
    from hydra import compose, initialize_config_dir

    from ..core.paths import CONF_DIR
    from ..sweep import config as _schema  # noqa: F401  (registers the structured configs)
    from ..sweep.points import resolve_point

    chunks = max(1, seq_len // args.chunk_tokens) if get_strategy(args.strategy).takes_chunks else 1
    overrides = [
        f"model={args.model}", f"parallel={args.strategy}", "gpus=1", f"seq_len={seq_len}", f"chunks={chunks}",
        f"precision={args.precision}", "steps=1", "warmup_steps=1", "hardware=auto",
        f"residual_fp32={args.residual_fp32}", f"fake_tensors={args.fake_tensors}",
    ]  # fmt: skip
    if args.n_layers is not None:
        overrides.append(f"model.n_layers={args.n_layers}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return resolve_point(compose("config", overrides=overrides))


def peak_allocations(point: Point) -> tuple[int, list[Allocation]]:
    """The device peak of one training step (after one warm-up step) and what was live there."""
    from parallel.host_store import allocating_on_host, default_host_store

    from ..training.data import data_spec, replica_batch
    from ..training.loop import build_model, build_optimizer, clip_and_step, forward_backward, model_config, setup_rank

    me = setup_rank(point)
    data = data_spec(point, model_config(point).vocab_size)
    with ShapesOnly(point.fake_tensors) as shapes:
        model = build_model(point, me.mesh, me.device, me.precision)
        optimizer = build_optimizer(model, point)
        for step in range(2):
            # The data loader's batch is host memory on a GPU: made before the device is tracked.
            # The step's own token ids (moved to the device by forward_backward) are counted.
            tokens, labels, cu_seqlens = shapes.batch(replica_batch, data, step, 1, 0)
            # The host store's buffers outlive a step: made in the first, host memory in the second.
            tracker = RecordingMemoryTracker(
                simulate_device=not me.cuda, on_host=allocating_on_host, exclude=default_host_store().owns
            )
            tracker.track(p for p in model.parameters())
            tracker.track(s for st in optimizer.state.values() for s in st.values() if isinstance(s, torch.Tensor))
            with tracker:
                forward_backward(model, point, me.mesh, me.precision, me.device, tokens, labels, cu_seqlens)
                clip_and_step(model, optimizer, None)
    return tracker.peak["device"], tracker.at_peak


def growth(peaks: dict[int, list[Allocation]]) -> list[SiteGrowth]:
    """Group each length's peak storages by (site, op, dtype); the groups, steepest first."""
    lens = sorted(peaks)
    by_site: dict[tuple, dict[int, list[Allocation]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for n, allocs in peaks.items():
        for a in allocs:
            by_site[(a.site, a.op, a.dtype)][n].append(a)
    rows = []
    for (site, op, dtype), per_len in by_site.items():
        sizes = {n: sum(a.nbytes for a in per_len.get(n, [])) for n in lens}
        last = per_len.get(lens[-1], [])
        shapes = ", ".join(sorted({"x".join(map(str, a.shape)) for a in last})[:3]) + (" ..." if len(last) > 3 else "")
        slope = (sizes[lens[-1]] - sizes[lens[0]]) / (lens[-1] - lens[0])
        rows.append(SiteGrowth(site, op, f"{len(last)} x [{shapes}]", dtype, any(a.saved for a in last), sizes, slope))
    return sorted(rows, key=lambda r: -r.per_token)


def slope_bound(hidden: int) -> int:
    """Device bytes per token the design allows at a fixed chunk size (module docstring)."""
    return 4 * hidden * 4 + 3 * 8


def check_points(args) -> dict[int, Point]:
    """The point of every length, each through the sweep's own checks (``ValueError``)."""
    from ..sweep.points import check_point

    points = {}
    for n in args.seq_lens:
        points[n] = _point(args, n)
        check_point(points[n])
    return points


def report(args, points: dict[int, Point] | None = None) -> dict:
    """Measure every length (``points``: as :func:`check_points` made them) and print the report."""
    peaks, totals = {}, {}
    for n in args.seq_lens:
        point = points[n] if points else _point(args, n)
        totals[n], peaks[n] = peak_allocations(point)
        print(f"S={n}: chunks={point.chunks}, device peak {format_bytes(totals[n])}", flush=True)
    lens = sorted(peaks)
    hidden = get_config(args.model).hidden
    slope = (totals[lens[-1]] - totals[lens[0]]) / (lens[-1] - lens[0])
    bound = slope_bound(hidden)
    rows = growth(peaks)
    print(f"\ndevice peak slope {slope:.0f} B/token (bound {bound} B/token: 4 fp32 [S, h] tensors, h={hidden}, "
          f"and 3 int64 token ids)")  # fmt: skip
    print(f"{'B/token':>9} {'saved':>5}  {'bytes at each S':<28} {'dtype':<9} {'op':<24} shapes at S={lens[-1]}; site")
    for r in rows:
        if r.per_token <= 0 and not args.all:
            continue
        sizes = " / ".join(format_bytes(r.bytes_by_len[n]) for n in lens)
        print(f"{r.per_token:>9.1f} {'yes' if r.saved else '':>5}  {sizes:<28} {r.dtype:<9} {r.op:<24} {r.shapes}")
        print(f"{'':>17}{r.site}")
    return {"slope": slope, "bound": bound, "rows": rows, "totals": totals}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=model_name, default="llama-tiny")
    p.add_argument("--n-layers", type=positive_int, default=None)
    p.add_argument("--strategy", choices=strategy_names(), default="fpdt")
    p.add_argument("--seq-lens", type=positive_int, nargs="+", default=[4096, 8192])
    p.add_argument("--chunk-tokens", type=positive_int, default=1024,
                   help="fpdt: the chunk size C kept fixed, dividing every --seq-lens")  # fmt: skip
    p.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto")
    p.add_argument("--residual-fp32", action="store_true", help="bf16-mixed with an fp32 residual stream")
    p.add_argument("--all", action="store_true", help="also the sites that do not grow")
    p.add_argument("--fake-tensors", action="store_true",
                   help="fake tensors: the same allocations, no compute (lengths a CPU cannot run)")  # fmt: skip
    args = p.parse_args(argv)
    if len(set(args.seq_lens)) < 2:
        p.error("give at least two different --seq-lens (the slope is between the shortest and the longest)")
    if get_strategy(args.strategy).takes_chunks:
        for n in args.seq_lens:
            check_divides(p, "--chunk-tokens", args.chunk_tokens, "--seq-lens", n)
    with usage_errors(p, f"--model {args.model} --strategy {args.strategy}"):
        points = check_points(args)  # every length's point, before the first is measured
    result = report(args, points)
    if not get_strategy(args.strategy).takes_chunks:
        print(f"(the bound is FPDT's chunked design; {args.strategy}, which keeps whole-sequence activations, "
              "is not held to it)")  # fmt: skip
        return 0
    if result["slope"] > result["bound"]:
        print(f"the device peak grows {result['slope']:.0f} B/token, above the bound of {result['bound']}: exit 1",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
