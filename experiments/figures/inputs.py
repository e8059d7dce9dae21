"""The tables figures are drawn from, read and checked in one place.

:func:`read_tables` reads ``results.csv``, ``max_seqlen.csv`` and ``train.csv`` tables (files, or
a sweep's ``points/*.json``) into rows with numbers parsed, and refuses what no figure can use: a
file that is not text, a row with more or fewer cells than the header, a number column holding
something else (``X line 3: mfu='abc' is not a number``), an unknown ``status``. Empty cells stay
``None``: a failed point has no time or MFU.

:func:`check_figure` checks the tables of one figure against its :class:`FigureSpec`: the columns
it needs (``X: column device_mem_peak_gib is missing (needed for the chunks figure)``), a value in
every row's key columns, at least one row to draw (``no ok rows to plot in X (3 rows: 2 error,
1 timeout)``), and it words notes on what a figure leaves out or only marks (failed points, an
absent optional panel). Every problem is a :class:`PlotInputError` raised before a figure is drawn.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..sweep.results import ROW_FIELDS, find_point

__all__ = ["NUMERIC", "STATUSES", "FigureSpec", "PlotInputError", "Table", "check_figure", "read_header",
           "read_tables"]  # fmt: skip

# Columns that hold numbers (an empty cell is None; "True"/"False" stay booleans).
NUMERIC = {
    "seq_len", "chunks", "gpus", "batch_size", "n_layers", "step_time_s", "step_time_p20_s",
    "step_time_p80_s", "tokens_per_s", "tflops_per_gpu", "mfu", "mfu_full_attention", "peak_tflops",
    "device_mem_peak_gib", "device_mem_reserved_gib", "host_mem_gib", "host_mem_node_gib",
    "rss_peak_gib", "max_device_memory", "device_mem_total_gib", "loss", "max_seq_len", "first_failure",
    "probes", "chunk_tokens",
}  # fmt: skip
_NUMERIC_BY_KIND = {"sweep": NUMERIC, "max_seqlen": NUMERIC, "train": NUMERIC | {"step", "lr"}}

# The statuses each kind of table may hold (a train.csv has no status).
STATUSES = {"sweep": ("ok", "oom", "error", "timeout"), "max_seqlen": ("ok", "limit", "error")}

_MAX_LISTED = 5  # problems or failed rows listed by name; the rest are counted


class PlotInputError(ValueError):
    """A table no figure can be drawn from; each line of the message says where and what is wrong."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Table:
    """The rows of one file (or one sweep directory's points), numbers parsed."""

    name: str  # the file or directory, for messages
    kind: str  # "sweep", "max_seqlen" or "train"
    columns: frozenset
    rows: list[dict]
    notes: list[str] = field(default_factory=list)  # what was not read, and why
    lines: dict = field(default_factory=dict, repr=False)  # id(row) -> "file line N" or the point's file

    def where(self, row) -> str:
        return self.lines.get(id(row), self.name)


@dataclass(frozen=True)
class FigureSpec:
    """What one figure needs of its tables."""

    name: str
    keys: tuple  # columns every drawn row needs a value in
    values: tuple  # columns the figure plots; a row is drawn when it has a number in one of them
    optional: dict = field(default_factory=dict)  # column -> the panel drawn only where tables have it
    drawn: tuple | None = ("ok",)  # statuses whose values are plotted (None: the table has no status)
    noted: tuple = ()  # statuses of rows the figure marks without a value: listed in a note
    positive: tuple = ()  # number columns that must be > 0 (logarithmic axes)
    select: Callable | None = None  # the rows the figure is drawn from (default: all)
    describe: Callable = repr  # a row, in a note


def _text(path: Path) -> str:
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PlotInputError(
            f"{path} is not a text CSV table: byte {data[exc.start]:#04x} at offset {exc.start} is not UTF-8"
        ) from None
    if "\x00" in text:
        raise PlotInputError(f"{path} is not a text CSV table: it holds NUL bytes")
    return text


def read_header(path) -> list[str]:
    """The column names of a CSV file (a :class:`PlotInputError` for an empty or binary one)."""
    header = next(csv.reader(io.StringIO(_text(path), newline="")), None)
    if not header or not any(h.strip() for h in header):
        raise PlotInputError(f"{path} is empty: a CSV table starts with a header line of column names")
    return header


def _number(value):
    """A cell of a number column: None, a bool, an int or a float; raises ValueError otherwise."""
    if value in ("", "None", None):
        return None
    if value in ("True", "False"):
        return value == "True"
    if isinstance(value, bool | int | float):
        return value
    number = float(value)  # ValueError for "abc", "4k", "n/a"
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def _check_cells(raw: dict, where: str, kind: str, problems: list) -> dict:
    """A row with its number columns parsed and its status checked; problems are appended."""
    numeric = _NUMERIC_BY_KIND[kind]
    row = {}
    for k, v in raw.items():
        if k in numeric:
            try:
                row[k] = _number(v)
            except (TypeError, ValueError):
                problems.append(f"{where}: {k}={v!r} is not a number")
                row[k] = None
        elif isinstance(v, str) and v in ("True", "False", ""):
            row[k] = None if v == "" else v == "True"
        else:
            row[k] = v
    allowed = STATUSES.get(kind)
    status = row.get("status")
    if allowed and status not in (None, *allowed):
        problems.append(f"{where}: status={status!r} is not one of {', '.join(allowed)}")
    return row


def _raise(problems: list) -> None:
    if problems:
        more = len(problems) - _MAX_LISTED
        raise PlotInputError(
            problems[:_MAX_LISTED] + ([f"... and {more} more problems like these"] if more > 0 else [])
        )


def _read_csv(path: Path, kind: str) -> Table:
    text = _text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise PlotInputError(f"{path} is empty: a CSV table starts with a header line of column names")
    header = [h.strip() for h in header]
    rows, lines, problems = [], {}, []
    try:
        for cells in reader:
            if not cells:
                continue  # a blank line
            where = f"{path} line {reader.line_num}"
            if len(cells) != len(header):
                problems.append(f"{where}: {len(cells)} cells, but the header has {len(header)} columns")
                continue
            row = _check_cells(dict(zip(header, cells, strict=True)), where, kind, problems)
            row["source"] = str(path)
            rows.append(row)
            lines[id(row)] = where
    except csv.Error as exc:
        problems.append(f"{path} line {reader.line_num}: not a CSV row ({exc})")
    _raise(problems)
    return Table(str(path), kind, frozenset(header), rows, lines=lines)


def _point_order(r):
    """The order :func:`experiments.sweep.results.load_points` gives a sweep's rows."""
    return (r.get("model") or "", r.get("strategy") or "", r.get("gpus") or 0, r.get("chunks") or 0,
            r.get("seq_len") or 0)  # fmt: skip


def _read_points(sweep_dir: Path) -> Table:
    """A sweep directory's rows from its ``points/*.json`` (the record: ``results.csv`` is rebuilt
    from them). A point file that cannot be read counts as not run, as for the sweep (which runs it
    again): it is left out, with a note that also counts the rows of ``results.csv`` left out with it."""
    rows, where, problems, notes = [], {}, [], []
    for f in sorted((sweep_dir / "points").glob("*.json")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row = find_point(sweep_dir, f.stem)
        if row is None:
            notes.append(str(caught[-1].message) if caught else f"ignoring unreadable result {f}")
            continue
        row = _check_cells(row, str(f), "sweep", problems)
        rows.append(row)
        where[id(row)] = str(f)
    table_csv = sweep_dir / "results.csv"
    if notes and table_csv.is_file():
        try:
            keys = {r.get("key") for r in _read_csv(table_csv, "sweep").rows}
        except PlotInputError:
            keys = set()
        unplotted = len(keys - {r.get("key") for r in rows})
        if unplotted:
            notes[-1] += (
                f"; {table_csv} has {_plural(unplotted, 'row')} of points not read, not plotted: the points are "
                f"the sweep's record (pass {table_csv} itself to plot the table as it stands)"
            )
    _raise(problems)
    rows.sort(key=_point_order)
    out = [dict(r, source=str(sweep_dir)) for r in rows]
    lines = {id(o): where[id(r)] for o, r in zip(out, rows, strict=True)}
    columns = frozenset(ROW_FIELDS).union(*(r.keys() for r in out))
    return Table(str(sweep_dir), "sweep", columns, out, notes, lines)


def read_tables(path, kind: str) -> list[Table]:
    """The tables of one input: a CSV file, or a directory (a sweep directory's points, or every
    ``results.csv`` under it; a ``max_seqlen`` sweep's aggregate ``max_seqlen.csv``, else every one
    under it; a training run's ``train.csv``)."""
    path = Path(path)
    if path.is_file():
        return [_read_csv(path, kind)]
    name = {"sweep": "results.csv", "max_seqlen": "max_seqlen.csv", "train": "train.csv"}[kind]
    if kind == "sweep":
        sweep_dirs = sorted({f.parent.parent for f in path.rglob("points/*.json")})
        if sweep_dirs:
            tables = [_read_points(d) for d in sweep_dirs]
            loose = sorted(f for f in path.rglob(name) if f.parent not in sweep_dirs)
            if loose:
                tables[0].notes.append(
                    f"{', '.join(map(str, loose))} not read: only the points/*.json of the sweeps under {path} "
                    "are (pass a results.csv on its own to plot it)"
                )
            return tables
    top = path / name
    files = [top] if kind != "sweep" and top.is_file() else sorted(path.rglob(name))
    if not files:
        raise FileNotFoundError(f"no {name} at {path}")
    return [_read_csv(f, kind) for f in files]


def _has_value(v) -> bool:
    return v is not None and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _listed(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return "; ".join(items[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def check_figure(spec: FigureSpec, tables: list[Table]) -> tuple[list[dict], list[str], set]:
    """The rows ``spec``'s figure is drawn from (every table's selected rows, in order), the notes
    on what it leaves out, and the optional columns present in some table (their panels are drawn).
    Raises :class:`PlotInputError` listing every problem."""
    problems, notes, unplaced = [], [], []
    context = f" (needed for the {spec.name} figure)"
    selected = {id(t): [r for r in t.rows if spec.select is None or spec.select(r)] for t in tables}
    for t in tables:
        missing = [c for c in (*spec.keys, *spec.values) if c not in t.columns]
        if missing:
            cols = f"column {missing[0]} is" if len(missing) == 1 else f"columns {', '.join(missing)} are"
            problems.append(f"{t.name}: {cols} missing{context}")
            continue
        for r in list(selected[id(t)]):
            # (what is wrong, why the figure needs it otherwise)
            bad = [(f"{k} is empty", f"every row needs one for the {spec.name} figure")
                   for k in spec.keys if r.get(k) is None]  # fmt: skip
            bad += [(f"{k}={r[k]} must be > 0", f"the {spec.name} figure's axis is logarithmic")
                    for k in spec.positive if _has_value(r.get(k)) and not r[k] > 0]  # fmt: skip
            if bad and r.get("status") not in (None, "ok"):
                # A point that failed on its own bad setting (chunks=0, seq_len=-4): the sweep
                # recorded it as it should; it has no place on the axes, and the rest still plots.
                selected[id(t)].remove(r)
                unplaced.append(f"{t.where(r)} ({r['status']}): {bad[0][0]}")
            else:
                problems += [f"{t.where(r)}: {what} ({why})" for what, why in bad]
    _raise(problems)
    if unplaced:
        notes.append(f"{spec.name}: {_plural(len(unplaced), 'failed row')} left out, with no place on its axes: "
                     + _listed(unplaced))  # fmt: skip

    present = {c for c in spec.optional if any(c in t.columns for t in tables)}
    for c, panel in spec.optional.items():
        lacking = [t.name for t in tables if c not in t.columns]
        if lacking and c in present:
            notes.append(f"{', '.join(lacking)}: no {c} column; {panel} leaves its rows out")
        elif lacking:
            notes.append(f"{', '.join(lacking)}: no {c} column; the {spec.name} figure is drawn without {panel}")

    def drawable(r):
        return (spec.drawn is None or r.get("status") in spec.drawn) and any(_has_value(r.get(c)) for c in spec.values)

    rows = [r for t in tables for r in selected[id(t)]]
    which = "rows" if spec.drawn is None else "ok rows"
    if not any(drawable(r) for r in rows):
        counts = Counter(
            str(r.get("status")) if spec.drawn is not None and r.get("status") not in spec.drawn
            else ("ok " if spec.drawn is not None else "") + "without a number in " + " or ".join(spec.values)
            for r in rows
        )  # fmt: skip
        detail = ", ".join(f"{n} {what}" for what, n in counts.most_common())
        names = ", ".join(t.name for t in tables)
        figure = "" if spec.select is None else f" for the {spec.name} figure"
        raise PlotInputError(
            f"no {which} to plot in {names}{figure} ({_plural(len(rows), 'row')}{': ' if detail else ''}{detail})"
        )
    if len(tables) > 1:  # a table that adds nothing to a figure others fill
        for t in tables:
            own = selected[id(t)]
            if (own or spec.select is None) and not any(drawable(r) for r in own):
                notes.append(f"{t.name}: no {which} to plot among its {_plural(len(own), 'row')}")
    valueless = [r for r in rows if (spec.drawn is None or r.get("status") in spec.drawn) and not drawable(r)]
    if valueless:
        notes.append(
            f"{spec.name}: {_plural(len(valueless), 'row')} with no number in {' or '.join(spec.values)}, "
            "not plotted: " + _listed([spec.describe(r) for r in valueless])
        )
    failed = [r for r in rows if r.get("status") in spec.noted]
    if failed:
        notes.append(
            f"{spec.name}: {_plural(len(failed), 'failed row')} with no value, marked on the figure by status: "
            + _listed([spec.describe(r) for r in failed])
        )
    return rows, notes, present
