"""Peak memory of a full training step (forward, backward, optimizer) of a model, per strategy.

Each row is a real sweep point (fresh worker processes, as ``experiments.run`` runs them): the
``local`` model, ``ulysses`` and ``fpdt`` with ``u`` in {1, 2, 4, 8} on ``--gpus`` ranks, the
FPDT points both as the paper's recipe (chunked MLP and loss, host-kept checkpoints) and with
those switched off. On CPU the device is simulated (live tensor bytes excluding host memory);
on CUDA it is ``torch.cuda.max_memory_allocated``. Prints a table and writes a CSV::

    python -m experiments.bench_model_memory                       # llama-tiny, S=16384, 2 ranks
    python -m experiments.bench_model_memory --model gpt-tiny --seq-len 8192
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from ..core.paths import BENCH_DIR, CONF_DIR
from ..core.tables import write_csv
from ..core.units import GIB, format_bytes
from ..sweep import config as _schema  # noqa: F401  (registers the structured configs)
from ..sweep.controller import measure
from ..sweep.points import check_point, resolve_point
from ..sweep.results import ROW_FIELDS, point_key
from .cli import model_name, out_file, positive_int, usage_errors


def _variants(gpus: int, chunks: list[int]):
    yield "local", ["parallel=local", "gpus=1"]
    yield "ulysses", ["parallel=ulysses", f"gpus={gpus}"]
    for recipe in (True, False):
        for u in chunks:
            switches = [f"parallel.{k}={recipe}" for k in ("chunked_mlp", "chunked_loss", "checkpoint_on_host")]
            yield ("fpdt" if recipe else "fpdt-plain"), ["parallel=fpdt", f"gpus={gpus}", f"chunks={u}", *switches]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=model_name, default="llama-tiny")
    parser.add_argument("--seq-len", type=positive_int, default=16384)
    parser.add_argument("--gpus", type=positive_int, default=2)
    parser.add_argument("--chunks", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--out", type=out_file, default=None)
    args = parser.parse_args(argv)
    variants = []  # every variant's point checked before the first worker starts
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for label, overrides in _variants(args.gpus, args.chunks):
            cfg = compose("config", overrides=[f"model={args.model}", f"seq_len={args.seq_len}", f"steps={args.steps}",
                                               "warmup_steps=1", "hardware=auto", *overrides])  # fmt: skip
            with usage_errors(parser, f"variant {label} ({' '.join(overrides)}) at --seq-len {args.seq_len}"):
                point = resolve_point(cfg)
                check_point(point)
            variants.append((label, point))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, point in variants:
            row = measure(point, Path(tmp) / point_key(point))
            row["variant"] = label
            rows.append(row)
            print(_line(row), flush=True)
    device = rows[0].get("device_name") or "?"
    out = args.out or BENCH_DIR / f"model_memory_{'cpu' if 'cpu' in device else 'gpu'}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out, ROW_FIELDS)
    print(f"wrote {out}")
    if not any(r["status"] == "ok" for r in rows):
        raise SystemExit(f"every variant failed (the error column of {out}); first: {rows[0].get('error')}")
    return rows


def _line(r: dict) -> str:
    head = f"{r['variant']:<11}{r['strategy']:<8} P={r['gpus']} u={r['chunks']:<2} "
    head += f"chunked={'y' if r['chunked_mlp'] else 'n'} host-ckpt={'y' if r['checkpoint_on_host'] else 'n'}  "
    if r["status"] != "ok":
        return head + f"{r['status']}: {r['error']}"
    dev = "simulated " if r.get("device_mem_simulated") else ""
    return head + (
        f"{dev}device peak {format_bytes(r['device_mem_peak_gib'] * GIB):>10}  "
        f"host {format_bytes(r['host_mem_gib'] * GIB):>10}  "
        f"step {r['step_time_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
