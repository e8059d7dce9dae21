"""The matmul FLOPs a training step executes, beside the FLOPs its MFU counts, per recipe.

MFU counts a step as 3x the forward with no recompute (``experiments.core.flops``). What runs
is more: activation checkpointing runs each layer's forward again in the backward, and the
chunked MLP recomputes its tiles' inner activations there. This counts every matmul of one real
training step (``torch.utils.flop_counter``, one process, the torch attention backend, so the
attention's matmuls are counted too), split by where it ran, and prints ``executed / model``:
the factor between the hardware's FLOP rate and the MFU a run reports, and how much of a
strategy's step time over another's is extra work rather than lost efficiency::

    python -m experiments.bench.step_flops                          # llama-tiny, S=2048
    python -m experiments.bench.step_flops --model llama3.2-1b --n-layers 1 --seq-len 1024
    python -m experiments.bench.step_flops --model llama3.2-1b --n-layers 2 --recipes local fpdt --time-steps 3

Causal attention is counted by the pairs each call attends (a causal block on the diagonal: the
triangle with its diagonal, so a little above the convention's half square).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import traceback

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import fpdt_kernels
import models
from parallel.distributed import SPGroup
from parallel.parallelize import parallelize, shard_batch

from ..core.flops import step_flops
from ..core.paths import BENCH_DIR, CONF_DIR
from ..core.point import Point
from ..core.tables import write_csv
from ..sweep import config as _schema  # noqa: F401  (registers the structured configs)
from ..sweep.points import check_point, resolve_point
from ..training.loop import model_config
from .cli import error_text, non_negative_int, out_file, positive_int, usage_errors
from .cli import model_name as model_preset


def _visible_pairs(sq: int, sk: int, causal: bool) -> int:
    """Query-key pairs a top-left causal (or unmasked) ``[sq, sk]`` block attends: row ``m`` sees
    ``min(m + 1, sk)`` keys."""
    if not causal:
        return sq * sk
    full = max(0, sq - sk)  # rows past the last key's diagonal see every key
    tri = min(sq, sk)
    return tri * (tri + 1) // 2 + full * sk


# PyTorch's flop counter has no formula for its CPU flash-attention kernel, which the torch
# backend runs; these count what it computes: QK^T and PV in the forward (4 FLOPs per pair and
# head dimension), S, dP, dV, dK and dQ in the backward (2.5x the forward).
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_forward_flops(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *a, **k) -> int:
    B, H, sq, d = query_shape
    return 4 * B * H * d * _visible_pairs(sq, key_shape[2], is_causal)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_backward_flops(grad_shape, query_shape, key_shape, *a, **k) -> int:
    is_causal = a[4] if len(a) > 4 else k.get("is_causal", False)  # after value, out, lse, dropout_p
    B, H, sq, d = query_shape
    return 10 * B * H * d * _visible_pairs(sq, key_shape[2], is_causal)


# Nor for the in-place matmuls that accumulate into a buffer (FPDT's QKV projection backward).
@register_flop_formula([torch.ops.aten.addmm_, torch.ops.aten.baddbmm_])
def _inplace_matmul_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    *batch, m, k = a_shape
    return 2 * math.prod(batch) * m * k * b_shape[-1]


# name: the Hydra overrides of the run it stands for (the presets of conf/parallel/, one process).
RECIPES = {
    "local": ["parallel=local"],
    "local-no-ckpt": ["parallel=local", "parallel.activation_checkpointing=false"],
    "fpdt": ["parallel=fpdt", "chunks=4"],
}
FIELDS = ["recipe", "model", "n_layers", "seq_len", "chunks", "loss_tile", "model_flops", "executed_flops",
          "executed_over_model", "model_attention_flops", "attention_flops", "model_dense_flops", "dense_flops",
          "step_s"]  # fmt: skip
_ATTENTION_OPS = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)  # fmt: skip


def resolve_recipe(model_name: str, recipe: str, seq_len: int, n_layers: int | None = None,
                   loss_tile: int | None = None) -> Point:  # fmt: skip
    """The sweep point ``experiments.run`` would run for ``recipe`` (a key of :data:`RECIPES`) on
    one process. ``loss_tile`` sets the chunked loss's tile where the recipe has one. A point that
    cannot run (``seq_len`` not in the recipe's chunks, a bad size) is the ``ValueError`` of
    :func:`experiments.sweep.points.check_point`, as ``experiments.run`` would say it."""
    overrides = [f"model={model_name}", f"seq_len={seq_len}", "gpus=1", "hardware=auto", *RECIPES[recipe]]
    overrides += [f"model.n_layers={n_layers}"] if n_layers is not None else []
    overrides += [f"parallel.loss_tile={loss_tile}"] if loss_tile is not None else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        point = resolve_point(compose("config", overrides=overrides))
    check_point(point)
    return point


def count_step(point: Point, recipe: str, seed: int = 0, time_steps: int = 0) -> dict:
    """One training step of ``point`` on one process: its model FLOPs (the MFU convention) and the
    matmul FLOPs it executed, in all, in the attention kernel and outside it. ``time_steps``: then
    time that many more steps (the counted one was the warm-up) and add their median wall time,
    ``step_s``."""
    cfg = model_config(point)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, point.seq_len), generator=g)
    times = []
    kw = dict(group=SPGroup.single(), chunks=point.chunks)
    with fpdt_kernels.use_backend("torch"):
        model = parallelize(models.Transformer(cfg), point.strategy, offload=point.offload, **kw)
        t, labels, positions = shard_batch(tokens, tokens, point.strategy, **kw)
        with FlopCounterMode(display=False) as counter:
            model(t, labels=labels, positions=positions).backward()
        for _ in range(time_steps):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(t, labels=labels, positions=positions).backward()
            times.append(time.perf_counter() - start)
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(n for op, n in by_op.items() if op in _ATTENTION_OPS)
    total = counter.get_total_flops()
    flops = step_flops(cfg, point.seq_len)
    return {
        "recipe": recipe,
        "model": point.model,
        "n_layers": cfg.n_layers,
        "seq_len": point.seq_len,
        "chunks": point.chunks,
        "model_flops": flops.causal,
        "executed_flops": total,
        "executed_over_model": total / flops.causal,
        "model_attention_flops": flops.attention_causal,
        "attention_flops": attention,
        "model_dense_flops": flops.dense,
        "dense_flops": total - attention,
        "loss_tile": cfg.loss_tile,
        "step_s": statistics.median(times) if times else None,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=model_preset, default="llama-tiny")
    parser.add_argument("--n-layers", type=positive_int, default=None)
    parser.add_argument("--seq-len", type=positive_int, default=2048)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--loss-tile", type=positive_int, default=None,
                        help="tokens per chunked-loss tile (default C/(32P))")  # fmt: skip
    parser.add_argument("--time-steps", type=non_negative_int, default=0,
                        help="also time this many steps per recipe, side by side")  # fmt: skip
    parser.add_argument("--out", type=out_file, default=None)
    args = parser.parse_args(argv)
    points = {}
    for recipe in args.recipes:  # every recipe's point checked before the first is counted
        with usage_errors(parser, f"--recipes {recipe} ({' '.join(RECIPES[recipe])}) at --seq-len {args.seq_len}"):
            points[recipe] = resolve_recipe(args.model, recipe, args.seq_len, args.n_layers, args.loss_tile)
    rows = []
    for recipe, point in points.items():
        try:
            rows.append(count_step(point, recipe, time_steps=args.time_steps))
        except Exception as exc:  # a failed count is a row with its error, not the end
            traceback.print_exc()
            rows.append(dict(recipe=recipe, model=point.model, n_layers=point.n_layers, seq_len=point.seq_len,
                             chunks=point.chunks, error=error_text(exc)))  # fmt: skip
    ok = [r for r in rows if not r.get("error")]
    print(f"{args.model}, S={args.seq_len}, one process; GFLOP per step (matmuls only), model (MFU's count) / executed")
    print(f"{'recipe':<14} {'step':>17} {'exec/model':>10} {'attention core':>17} {'dense + head':>17}")
    for r in rows:
        if r.get("error"):
            print(f"{r['recipe']:<14} error: {r['error']}")
            continue
        pairs = [(r["model_flops"], r["executed_flops"]), (r["model_attention_flops"], r["attention_flops"]),
                 (r["model_dense_flops"], r["dense_flops"])]  # fmt: skip
        a, b, c = (f"{m / 1e9:.3f} / {e / 1e9:.3f}" for m, e in pairs)
        print(f"{r['recipe']:<14} {a:>17} {r['executed_over_model']:>10.3f} {b:>17} {c:>17}")
    if args.time_steps and ok:
        base = ok[0]["step_s"]
        print(f"step time, median of {args.time_steps} (this machine, one after the other):")
        for r in ok:
            print(f"{r['recipe']:<14} {r['step_s']:>8.3f} s  {r['step_s'] / base:>6.2f}x {ok[0]['recipe']}")
    out = args.out or BENCH_DIR / f"step_flops_{args.model}_s{args.seq_len}_cpu.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out, FIELDS)
    print(f"wrote {out}")
    if len(ok) < len(rows):
        raise SystemExit(f"{len(rows) - len(ok)} recipe(s) failed (rows with an error in {out})")
    return rows


if __name__ == "__main__":
    main()
