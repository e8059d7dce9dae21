"""Write the figures for one or more sweeps: ``python -m experiments.plot RESULTS... [--out DIR]``.

``RESULTS`` are ``results.csv`` files or sweep directories (searched recursively),
``max_seqlen.csv`` files or ``max_seqlen`` sweep directories, and ``train.csv`` files or
training run directories. Writes ``memory_mfu``, ``chunks``, ``max_seqlen`` (when there are
max-length rows) and ``train_loss`` (every run's curve, labelled by its directory) figures as
PNG, plus PDF with ``--pdf``::

    python -m experiments.plot results/sweeps/demo
    python -m experiments.plot results/sweeps/seqlen results/sweeps/chunks --out figures --pdf --both-conventions
    python -m experiments.plot results/train/local results/train/fpdt --out figures

Every input is read and checked (:mod:`experiments.figures.inputs`) before a figure is written: a
table a figure cannot be drawn from (a missing column, a cell that is not a number, no ``ok`` row)
is an error naming the file and line, exit status 2. Failed points are marked on the figures and
listed in a note on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

from .inputs import PlotInputError, check_figure, read_header, read_tables
from .plots import (
    CHUNKS,
    MAX_SEQLEN,
    MEMORY_MFU,
    TRAIN_LOSS,
    chunks_figure,
    max_seqlen_figure,
    strategy_takes_chunks,
    summary_figure,
    training_figure,
)


def _table_kind(path: Path) -> str:
    """``sweep``, ``max_seqlen`` or ``train``: what a CSV holds, told by its columns (so renamed or
    combined copies, e.g. under ``experiments/results/``, plot like the originals)."""
    header = set(read_header(path))
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


def _runs(tables) -> dict:
    """``{label: rows}`` of the training runs: a ``train.csv`` is labelled by its directory, another
    file by its name; a table with a ``run`` column of several values is one run per value."""
    runs = defaultdict(list)
    for t in tables:
        path = Path(t.name)
        label = path.parent.name if path.name == "train.csv" else path.stem
        names = list(dict.fromkeys(r.get("run") for r in t.rows))
        if len(names) > 1:  # a combined table (``run`` = local, fpdt, ...)
            for name in names:
                key = str(name) if len(tables) == 1 else f"{label}: {name}"
                runs[key] += [r for r in t.rows if r.get("run") == name]
            continue
        if label in runs:  # two runs in directories of the same name
            label = str(path.parent if path.name == "train.csv" else path)
        runs[label] += t.rows
    return dict(runs)


def _plan(sweeps, maxlens, trains, args, notes: list):
    """Every table read and every figure checked, before anything is drawn: a list of
    ``(name, draw, rows, kwargs)``; what the figures leave out is appended to ``notes``.
    Raises :class:`PlotInputError` with every problem."""
    problems = []
    tables = {"sweep": [], "max_seqlen": [], "train": []}
    for kind, paths in (("sweep", sweeps), ("max_seqlen", maxlens), ("train", trains)):
        for p in paths:
            try:
                tables[kind] += read_tables(p, kind)
            except PlotInputError as exc:
                problems += exc.problems
    if problems:
        raise PlotInputError(problems)
    for t in (t for kind in tables.values() for t in kind):
        notes += t.notes

    figures = []

    def check(spec, kind_tables):
        try:
            rows, figure_notes, present = check_figure(spec, kind_tables)
        except PlotInputError as exc:
            problems.extend(exc.problems)
            return None, set()
        notes.extend(figure_notes)
        return rows, present

    if tables["sweep"]:
        rows, present = check(MEMORY_MFU, tables["sweep"])
        if rows is not None:
            panels = ("device",) + ("host",) * ("host_mem_gib" in present) + ("mfu",) * ("mfu" in present)
            figures.append(("memory_mfu", summary_figure, rows, dict(device_memory_gib=args.device_memory,
                            both_conventions=args.both_conventions, panels=panels)))  # fmt: skip
            if any(strategy_takes_chunks(r.get("strategy")) and r.get("status") == "ok" for r in rows):
                chunk_rows, _ = check(CHUNKS, tables["sweep"])
                if chunk_rows is not None:
                    figures.append(("chunks", chunks_figure, chunk_rows, {}))
    elif args.device_memory is not None or args.both_conventions:
        notes.append("--device-memory and --both-conventions are for the memory_mfu figure: no results.csv given")
    if tables["max_seqlen"]:
        rows, _ = check(MAX_SEQLEN, tables["max_seqlen"])
        if rows is not None:
            figures.append(("max_seqlen", max_seqlen_figure, rows, {}))
    if tables["train"]:  # each run's loss curve on one figure, labelled by its directory
        rows, _ = check(TRAIN_LOSS, tables["train"])
        if rows is not None:
            figures.append(("train_loss", training_figure, _runs(tables["train"]), {}))
    if problems:
        raise PlotInputError(problems)
    return figures


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.split("\n")[0])
    what = "results.csv / max_seqlen.csv / train.csv files, sweep or training run directories"
    parser.add_argument("results", nargs="+", help=what)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: next to the first input)")
    parser.add_argument("--pdf", action="store_true", help="also write PDF")
    parser.add_argument("--both-conventions", action="store_true", help="MFU with causal and full-square attention")
    parser.add_argument("--device-memory", type=float, default=None, help="GiB line on the memory plot")
    args = parser.parse_args(argv)

    def fail(*lines):  # bad input is a usage error: one line per problem, exit status 2
        parser.exit(2, "".join(f"{parser.prog}: error: {line}\n" for line in lines))

    if args.device_memory is not None and not (math.isfinite(args.device_memory) and args.device_memory > 0):
        fail(f"--device-memory must be > 0 (the device's memory in GiB), got {args.device_memory:g}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        fail(f"--out must be a directory: {args.out} is a file")
    notes = []
    try:
        sweeps, maxlens, trains = _split(args.results)
        figures = _plan(sweeps, maxlens, trains, args, notes)
    except (FileNotFoundError, PlotInputError) as exc:  # a wrong path, a table no figure can be drawn from
        for note in notes:  # what was not read (an unreadable point) often says why
            print(f"{parser.prog}: note: {note}", file=sys.stderr)
        fail(*getattr(exc, "problems", [str(exc)]))
    for note in notes:
        print(f"{parser.prog}: note: {note}", file=sys.stderr)
    first = Path(args.results[0])
    out = args.out or (first if first.is_dir() else first.parent)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"--out must be a directory that can be made: {out} ({exc.strerror or exc})")
    formats = ("png", "pdf") if args.pdf else ("png",)
    written = []
    for name, draw, rows, kwargs in figures:
        written += draw(rows, out / name, formats=formats, **kwargs)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
