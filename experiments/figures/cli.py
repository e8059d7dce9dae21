"""Write the figures for one or more sweeps: ``python -m experiments.plot RESULTS... [--out DIR]``.

``RESULTS`` are ``results.csv`` files or sweep directories (searched recursively),
``max_seqlen.csv`` files or ``max_seqlen`` sweep directories, and ``train.csv`` files or
training run directories. Writes ``memory_mfu``, ``chunks``, ``max_seqlen`` (when there are
max-length rows) and ``train_loss`` (every run's curve, labelled by its directory) figures as
PNG, plus PDF with ``--pdf``::

    python -m experiments.plot results/sweeps/demo
    python -m experiments.plot results/sweeps/seqlen results/sweeps/chunks --out figures --pdf --both-conventions
    python -m experiments.plot results/train/local results/train/fpdt --out figures
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ..core.tables import read_csv
from .plots import (
    chunks_figure,
    load_max_seqlen,
    load_results,
    max_seqlen_figure,
    strategy_takes_chunks,
    summary_figure,
    training_figure,
)


def _table_kind(path: Path) -> str:
    """``sweep``, ``max_seqlen`` or ``train``: what a CSV holds, told by its columns (so renamed or
    combined copies, e.g. under ``experiments/results/``, plot like the originals)."""
    with path.open(newline="") as f:
        header = set(next(csv.reader(f), []))
    if "max_seq_len" in header:
        return "max_seqlen"
    if "seq_len" in header:
        return "sweep"
    if {"step", "loss"} <= header:
        return "train"
    raise FileNotFoundError(
        f"{path} is not a results.csv (no seq_len column), max_seqlen.csv (max_seq_len) or train.csv (step, loss)"
    )


def _split(paths):
    """Separate sweep results, max-length results and training runs (``train.csv``)."""
    sweeps, maxlens, trains = [], [], []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if p.is_file():
            {"max_seqlen": maxlens, "train": trains, "sweep": sweeps}[_table_kind(p)].append(p)
            continue
        if (p / "train.csv").exists():
            trains.append(p / "train.csv")
        elif (p / "max_seqlen.csv").exists() or any(p.glob("*/max_seqlen.csv")):
            maxlens.append(p)
        elif any(p.rglob("results.csv")):
            sweeps.append(p)
        else:
            raise FileNotFoundError(f"no results.csv, max_seqlen.csv or train.csv under {p}")
    return sweeps, maxlens, trains


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.split("\n")[0])
    what = "results.csv / max_seqlen.csv / train.csv files, sweep or training run directories"
    parser.add_argument("results", nargs="+", help=what)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: next to the first input)")
    parser.add_argument("--pdf", action="store_true", help="also write PDF")
    parser.add_argument("--both-conventions", action="store_true", help="MFU with causal and full-square attention")
    parser.add_argument("--device-memory", type=float, default=None, help="GiB line on the memory plot")
    args = parser.parse_args(argv)
    try:
        sweeps, maxlens, trains = _split(args.results)
    except FileNotFoundError as exc:  # a wrong path is a usage error: one line, exit status 2
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    first = Path(args.results[0])
    out = args.out or (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    formats = ("png", "pdf") if args.pdf else ("png",)
    written = []
    if sweeps:
        rows = load_results(*sweeps)
        written += summary_figure(rows, out / "memory_mfu", args.device_memory, formats, args.both_conventions)
        if any(strategy_takes_chunks(r.get("strategy")) and r.get("status") == "ok" for r in rows):
            written += chunks_figure(rows, out / "chunks", formats=formats)
    if maxlens:
        written += max_seqlen_figure(load_max_seqlen(*maxlens), out / "max_seqlen", formats)
    if trains:  # each run's loss curve on one figure, labelled by its directory
        runs = {(path.parent.name if path.name == "train.csv" else path.stem): read_csv(path) for path in trains}
        written += training_figure(runs, out / "train_loss", formats)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
