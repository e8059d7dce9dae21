"""Figures from sweep results (``results.csv``): memory and MFU curves, the chunk trade-off;
and from ``max_seqlen.csv``, ``train.csv`` and pipeline timelines.

The sweep figures take rows as returned by :func:`load_results` (dicts with numbers already
parsed) and draw on matplotlib axes, so notebooks can compose them; :func:`summary_figure`
is the memory + MFU figure the sweeps write as PNG. Colours mark the strategy, line styles the
chunk count, markers the GPU count. Every point that failed breaks its curve and is a hollow
marker of its status in its strategy's colour at the foot of each panel, except that an ``oom`` on
the device-memory panel is an ``x`` on the device-memory line. Tables are read and checked by
:mod:`experiments.figures.inputs`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to Agg; notebooks keep their inline backend
from matplotlib.ticker import FixedLocator, FuncFormatter, MultipleLocator

from parallel import get_strategy, strategy_names

from ..core.hardware import load_preset
from ..core.units import GIB, byte_unit, format_tokens
from .inputs import FigureSpec, read_tables

# Rows of a strategy no longer registered (an old sweep) are drawn in this colour.
UNKNOWN_STRATEGY_COLOR = "#bcbd22"


def _spec(strategy):
    """The registered strategy a row names, or ``None`` for a name no longer registered."""
    return get_strategy(strategy) if strategy in strategy_names() else None


def strategy_color(strategy) -> str:
    """A strategy's colour, from the registry (every figure colours a strategy the same)."""
    spec = _spec(strategy)
    return spec.color if spec is not None else UNKNOWN_STRATEGY_COLOR


def strategy_takes_chunks(strategy) -> bool:
    """Whether a row's strategy takes chunks (its rows make the chunk trade-off figure)."""
    spec = _spec(strategy)
    return spec is not None and spec.takes_chunks


def _is_baseline(strategy) -> bool:
    spec = _spec(strategy)
    return spec is not None and spec.baseline


CHUNK_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
GPU_MARKERS = {1: "o", 2: "s", 4: "^", 8: "D", 16: "v", 32: "P"}
# Failed points have no value: a hollow marker of their status at the foot of the panel. (On the
# device-memory panel an ``oom`` is an ``x`` on the device-memory line instead: where it ran out.)
FAILURE_MARKERS = {"oom": "x", "error": "*", "timeout": "h"}
FAILURE_LABELS = {"oom": "out of memory (no value)", "error": "error (no value)", "timeout": "timed out (no value)"}


def describe_row(r) -> str:
    """A result row in a note: ``fpdt u=1 gpus=2 S=2048 timeout (the error's first line)``."""
    text = str(r.get("strategy"))
    text += f" u={r['chunks']}" if strategy_takes_chunks(r.get("strategy")) and r.get("chunks") is not None else ""
    text += f" gpus={r['gpus']}" if r.get("gpus") is not None else ""
    text += f" S={r['seq_len']}" if r.get("seq_len") is not None else ""
    text += f" {r.get('status')}"
    error = str(r.get("error") or "").strip().splitlines()
    return text + (f" ({error[0][:80]})" if error else "")


# What each figure needs of its tables (checked by experiments.figures.inputs.check_figure).
MEMORY_MFU = FigureSpec(
    "memory_mfu", keys=("seq_len", "status", "strategy"), values=("device_mem_peak_gib",),
    optional={"host_mem_gib": "the host-memory panel", "mfu": "the MFU panel"}, noted=("oom", "error", "timeout"),
    positive=("seq_len",), describe=describe_row,
)  # fmt: skip
CHUNKS = FigureSpec(
    "chunks", keys=("seq_len", "status", "strategy", "chunks"), values=("device_mem_peak_gib", "step_time_s"),
    positive=("seq_len", "chunks"), select=lambda r: strategy_takes_chunks(r.get("strategy")),
    describe=describe_row,
)  # fmt: skip
MAX_SEQLEN = FigureSpec(
    "max_seqlen", keys=("status", "strategy"), values=("max_seq_len",), drawn=("ok", "limit"), noted=("error",),
    describe=describe_row,
)  # fmt: skip
TRAIN_LOSS = FigureSpec(
    "train_loss", keys=("step",), values=("loss",), optional={"lr": "the learning-rate panel"}, drawn=None,
    describe=lambda r: f"{r.get('source')} step {r.get('step')} loss={r.get('loss')}",
)  # fmt: skip


def _in_unit(rows, keys, extra_gib=()):
    """Rows with ``<key>_shown`` = the GiB value of each of ``keys`` in one readable unit for all
    of them (GiB from 1 GiB up, else MiB or KiB); returns ``(rows, unit name, GiB -> unit factor)``."""
    values = [r.get(k) * GIB for r in rows for k in keys if isinstance(r.get(k), int | float)]
    values += [g * GIB for g in extra_gib if g]
    unit, size = byte_unit(values)
    factor = GIB / size
    shown = [dict(r, **{f"{k}_shown": r[k] * factor for k in keys if isinstance(r.get(k), int | float)}) for r in rows]
    return shown, unit, factor


def _load(paths, kind) -> list[dict]:
    rows = []
    for p in paths:
        for table in read_tables(p, kind):
            for note in table.notes:
                warnings.warn(note, stacklevel=3)
            rows += table.rows
    return rows


def load_results(*paths) -> list[dict]:
    """Rows of one or more ``results.csv`` files or sweep directories (searched recursively).

    In a sweep directory the per-point files (``points/*.json``) are the record and ``results.csv``
    is rebuilt from them; rows are read from the points where they exist, so a stale table cannot
    break a figure; a point file that cannot be read is left out, as not run (a warning says how
    many rows of ``results.csv`` go with it). A cell that is not a number in a number column raises
    :class:`~experiments.figures.inputs.PlotInputError` naming the file and line.
    """
    return _load(paths, "sweep")


def load_max_seqlen(*paths) -> list[dict]:
    """Rows of ``max_seqlen.csv`` files (``python -m experiments.max_seqlen``) or their directories.

    A sweep directory holds one aggregated table and one per job: only the aggregate is read.
    """
    return _load(paths, "max_seqlen")


def newest_sweep(root="results/sweeps") -> Path:
    """The most recently written sweep directory under ``root`` (the default output location)."""
    candidates = sorted(Path(root).glob("*/results.csv"), key=lambda f: f.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no sweep with a results.csv under {root}; run python -m experiments.run -m ...")
    return candidates[-1].parent


def table(rows, columns, floatfmt="{:.3g}", max_width: int = 60) -> str:
    """A fixed-width text table of ``columns`` (for notebooks and the CLI); a cell longer than
    ``max_width`` characters (an error message) is cut there and ends in ``...``."""

    def cell(value) -> str:
        text = "" if value is None else floatfmt.format(value) if isinstance(value, float) else str(value)
        text = " ".join(text.split())  # a multi-line message stays on its row
        return text if len(text) <= max_width else text[: max_width - 3] + "..."

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _series(rows, x_key):
    """Group rows into curves by (model, strategy, chunks, gpus), sorted along ``x_key``."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("model"), r.get("strategy"), r.get("chunks"), r.get("gpus"))].append(r)
    return {k: sorted(v, key=lambda r: r[x_key]) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def _style(strategy, chunks, gpus, all_chunks):
    order = sorted(all_chunks)
    return dict(
        color=strategy_color(strategy),
        linestyle=CHUNK_STYLES[order.index(chunks) % len(CHUNK_STYLES)] if chunks in order else "-",
        marker=GPU_MARKERS.get(gpus, "o"),
    )


def _label(key, multi_model):
    model, strategy, chunks, gpus = key
    text = (
        f"{strategy}"
        + (f" u={chunks}" if strategy_takes_chunks(strategy) else "")
        + f", {gpus} GPU"
        + ("s" if gpus != 1 else "")
    )
    return f"{model}: {text}" if multi_model else text


def _seq_axis(ax, values):
    ax.set_xscale("log", base=2)
    ticks = sorted({v for v in values if v})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: format_tokens(x)))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlabel("sequence length (tokens)")


def _with_gaps(pts, x_key, y_key):
    """A curve's ``ok`` values along ``x_key`` (``pts`` sorted along it); each failed row at an x with
    no ``ok`` value, after the first value and before the last, breaks the line there (a NaN)."""
    valued = {r[x_key] for r in pts if r.get("status") == "ok" and r.get(y_key) is not None}
    xs, ys = [], []
    for r in pts:
        if r.get("status") == "ok" and r.get(y_key) is not None:
            xs.append(r[x_key])
            ys.append(r[y_key])
        elif r.get("status") in FAILURE_MARKERS and r[x_key] not in valued and ys:
            xs.append(r[x_key])
            ys.append(math.nan)
    while ys and math.isnan(ys[-1]):
        xs.pop()
        ys.pop()
    return xs, ys


def _mark_failures(ax, rows, x_key, markers, legend=True):
    """Rows that failed without a value: a hollow marker of their status (``markers``) and their
    strategy's colour at their x at the foot of ``ax``; with ``legend``, one legend entry per status."""
    seen = []
    for r in rows:
        marker = markers.get(r.get("status"))
        if marker is None:
            continue
        ax.plot([r[x_key]], [0], transform=ax.get_xaxis_transform(), linestyle="none", marker=marker,
                color=strategy_color(r.get("strategy")), markerfacecolor="none", markersize=11,
                markeredgewidth=2, clip_on=False, zorder=6)  # fmt: skip
        seen += [r["status"]] if r["status"] not in seen else []
    for status in (s for s in markers if s in seen and legend):
        ax.plot([], [], linestyle="none", marker=markers[status], color="gray", markerfacecolor="none",
                markeredgewidth=2, label=FAILURE_LABELS[status])  # fmt: skip


def _draw_curves(ax, rows, y_key, x_key="seq_len", oom_y=None):
    """One line per (model, strategy, chunks, gpus) over its ``ok`` rows, broken at every point that
    failed; each failed point is a hollow marker of its status at the foot of ``ax``.

    With ``oom_y`` set, each ``oom`` point is instead an ``x`` of its curve's colour at that height
    (the device limit): where the strategy ran out.
    """
    curves = _series(rows, x_key)
    all_chunks = {k[2] for k in curves}
    multi_model = len({k[0] for k in curves}) > 1
    for key, pts in curves.items():
        xs, ys = _with_gaps(pts, x_key, y_key)
        style = _style(key[1], key[2], key[3], all_chunks)
        if xs:
            ax.plot(xs, ys, label=_label(key, multi_model), **style)
        for r in [r for r in pts if r.get("status") == "oom"] if oom_y is not None else []:
            ax.plot([r[x_key]], [oom_y], linestyle="none", marker="x", color=style["color"], markersize=12,
                    markeredgewidth=3, zorder=5)  # fmt: skip
    # Without an oom line, an oom is marked at the foot like any other failure.
    foot = FAILURE_MARKERS if oom_y is None else {s: m for s, m in FAILURE_MARKERS.items() if s != "oom"}
    _mark_failures(ax, [r for pts in curves.values() for r in pts], x_key, foot)
    return curves


def _device_limit(rows):
    """The device memory to draw: a ``max_device_memory`` cap, else the hardware preset's size."""
    caps = {r["max_device_memory"] for r in rows if r.get("max_device_memory")}
    if caps:
        return min(caps)
    sizes = set()
    for name in {r.get("hardware") for r in rows if r.get("hardware") not in (None, "cpu")}:
        try:
            sizes.add(load_preset(name).get("device_memory_gib"))
        except ValueError:
            continue
    sizes.discard(None)
    return min(sizes) if sizes else None


def plot_memory(rows, ax_device, ax_host=None, device_memory_gib=None):
    """Peak device memory (and host offload memory) vs ``seq_len``, in GiB, or MiB for small runs.

    The dashed line is ``device_memory_gib``, else the rows' ``max_device_memory`` cap, else the
    device size of their hardware preset; an ``x`` on it (in the curve's colour) marks each
    ``seq_len`` at which a curve ran out of memory.
    """
    limit = device_memory_gib or _device_limit(rows)
    shown, unit, factor = _in_unit(rows, ["device_mem_peak_gib"], [limit])
    any_oom = any(r.get("status") == "oom" for r in rows)
    peaks = [r.get("device_mem_peak_gib_shown") or 0 for r in shown]
    oom_y = limit * factor if limit else (max(peaks) if any_oom else None)
    curves = _draw_curves(ax_device, shown, "device_mem_peak_gib_shown", oom_y=oom_y)
    simulated = any(r.get("device_mem_simulated") in (True, "True") for r in rows)
    ax_device.set_ylabel(("simulated " if simulated else "") + f"peak device memory per GPU ({unit})")
    ax_device.set_title("device memory" + (" (x: out of memory)" if any_oom else ""))
    if limit:
        ax_device.axhline(limit * factor, color="black", linestyle="--", linewidth=1)
        ax_device.annotate(f"device memory {limit * factor:g} {unit}", (0.01, limit * factor),
                           xycoords=("axes fraction", "data"), va="bottom", fontsize=8)  # fmt: skip
    ax_device.set_ylim(bottom=0)
    _seq_axis(ax_device, [r["seq_len"] for r in rows])
    if ax_host is not None:
        host, host_unit, _ = _in_unit(rows, ["host_mem_gib"])
        _draw_curves(ax_host, host, "host_mem_gib_shown")
        ax_host.set_ylabel(f"peak host memory per GPU for offload ({host_unit})")
        ax_host.set_title("host memory (offloaded chunks + checkpoints)")
        ax_host.set_ylim(bottom=0)
        _seq_axis(ax_host, [r["seq_len"] for r in rows])
    return curves


def plot_mfu(rows, ax, both_conventions=False):
    """MFU (%) vs ``seq_len``: causal attention counted as half the square; with
    ``both_conventions`` also the full-square MFU as faded dotted lines of the same colour."""
    pct = [dict(r, mfu_pct=100 * r["mfu"] if r.get("mfu") is not None else None,
                mfu_full_pct=100 * r["mfu_full_attention"] if r.get("mfu_full_attention") is not None else None)
           for r in rows]  # fmt: skip
    _draw_curves(ax, pct, "mfu_pct")
    if both_conventions:
        for key, pts in _series(pct, "seq_len").items():
            ok = [r for r in pts if r.get("status") == "ok" and r.get("mfu_full_pct") is not None]
            if ok:
                ax.plot([r["seq_len"] for r in ok], [r["mfu_full_pct"] for r in ok], linestyle=":", alpha=0.5,
                        color=strategy_color(key[1]))  # fmt: skip
    ax.set_ylabel("MFU (%)\n(model FLOPs, causal attention = half square, no recompute)", fontsize=9)
    ax.set_title("model FLOPs utilisation" + (" (dotted: full-square attention)" if both_conventions else ""))
    ax.set_ylim(bottom=0)
    _seq_axis(ax, [r["seq_len"] for r in rows])


def plot_chunks(rows, ax_time, ax_mem, seq_len=None):
    """FPDT chunk trade-off at one ``seq_len`` (default: the longest with several ``ok`` chunk
    counts): step time and device memory vs ``chunks``, one line per (model, strategy, gpus) of
    the strategies that take chunks."""
    fpdt = [r for r in rows if strategy_takes_chunks(r.get("strategy")) and r.get("status") == "ok"]
    if seq_len is None:
        counts = defaultdict(set)
        for r in fpdt:
            counts[r["seq_len"]].add(r["chunks"])
        several = [s for s, c in counts.items() if len(c) > 1]
        seq_len = max(several or counts or [None])
    _, unit, factor = _in_unit(fpdt, ["device_mem_peak_gib"])
    # Every row at this seq_len, failed ones included: a line breaks at each chunk count that failed.
    at = sorted((r for r in rows if strategy_takes_chunks(r.get("strategy")) and r.get("seq_len") == seq_len
                 and r.get("chunks")), key=lambda r: r["chunks"])  # fmt: skip
    groups = defaultdict(list)
    for r in at:
        mem = r.get("device_mem_peak_gib")
        shown = dict(r, mem_shown=None if mem is None else mem * factor)
        groups[(r.get("model"), r.get("strategy"), r.get("gpus"))].append(shown)
    for (model, strategy, gpus), pts in sorted(groups.items(), key=str):
        if not any(r.get("status") == "ok" for r in pts):
            continue  # nothing ran: its failed chunk counts are marked below
        label = f"{model} {strategy}, {gpus} GPU" + ("s" if gpus != 1 else "")
        kw = dict(color=strategy_color(strategy), marker=GPU_MARKERS.get(gpus, "o"), label=label)
        ax_time.plot(*_with_gaps(pts, "chunks", "step_time_s"), **kw)
        ax_mem.plot(*_with_gaps(pts, "chunks", "mem_shown"), **kw)
    # The chunk counts that failed at this seq_len: a marker of their status at the foot of each panel.
    failed = [r for r in at if r.get("status") in FAILURE_MARKERS]
    _mark_failures(ax_time, failed, "chunks", FAILURE_MARKERS)
    _mark_failures(ax_mem, failed, "chunks", FAILURE_MARKERS, legend=False)
    ticks = sorted({r["chunks"] for r in at})
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ticks or [1]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{int(x)}"))
        ax.xaxis.set_minor_locator(FixedLocator([]))
        ax.set_xlabel("chunks u")
        ax.set_ylim(bottom=0)
    ax_time.set_ylabel("step time p50 (s)")
    simulated = any(r.get("device_mem_simulated") in (True, "True") for r in fpdt)
    ax_mem.set_ylabel(("simulated " if simulated else "") + f"peak device memory per GPU ({unit})")
    where = f"seq_len={format_tokens(seq_len)}" if seq_len else "(no fpdt rows)"
    ax_time.set_title(f"FPDT at {where}: step time")
    ax_mem.set_title(f"FPDT at {where}: device memory")
    return seq_len


def plot_predicted_vs_measured(rows, ax, device_memory_gib=None):
    """Measured peak device memory (markers) against the planner's prediction (lines) for the
    same configurations, over every ``seq_len`` each curve tried (including ``oom`` points, where
    the prediction should cross the device's memory). As in the other figures, colour is the
    strategy, line style the chunk count and the marker the GPU count; a legend entry shows all three."""
    from ..planner.estimate import estimate_row

    predicted = []
    for r in rows:
        if r.get("status") not in ("ok", "oom"):  # an error or a timeout measured no memory
            continue
        try:
            predicted.append(dict(r, predicted_gib=estimate_row(r).device_peak / GIB))
        except ValueError as exc:  # a configuration the planner does not model: said, not drawn
            warnings.warn(f"no prediction for {r.get('strategy')} seq_len={r.get('seq_len')}: {exc}", stacklevel=2)
    if not any(r.get("status") == "ok" for r in predicted):
        ax.set_title("no ok rows to compare with the planner's prediction")
        return predicted
    limit = device_memory_gib or _device_limit(rows)
    shown, unit, factor = _in_unit(predicted, ["device_mem_peak_gib", "predicted_gib"], [limit])
    curves = _series(shown, "seq_len")
    all_chunks = {k[2] for k in curves}
    multi_model = len({k[0] for k in curves}) > 1
    for key, pts in curves.items():
        style = _style(key[1], key[2], key[3], all_chunks)
        ok = [r for r in pts if r.get("status") == "ok"]
        if ok:
            ax.plot([r["seq_len"] for r in ok], [r["device_mem_peak_gib_shown"] for r in ok], linestyle="none",
                    marker=style["marker"], color=style["color"])  # fmt: skip
        ax.plot([r["seq_len"] for r in pts], [r["predicted_gib_shown"] for r in pts], linestyle=style["linestyle"],
                color=style["color"], linewidth=1)  # fmt: skip
        ax.plot([], [], linestyle=style["linestyle"], marker=style["marker"], color=style["color"], linewidth=1,
                label=_label(key, multi_model))  # fmt: skip
    if limit:
        ax.axhline(limit * factor, color="black", linestyle="--", linewidth=1)
    simulated = any(r.get("device_mem_simulated") in (True, "True") for r in rows)
    ax.set_ylabel(("simulated " if simulated else "") + f"peak device memory per GPU ({unit})")
    ax.set_title("measured (markers) vs predicted by experiments.plan (lines)")
    ax.set_ylim(bottom=0)
    _seq_axis(ax, [r["seq_len"] for r in rows])
    return predicted


def plot_max_seqlen(rows, ax):
    """Longest trainable ``seq_len`` per strategy (bars), grouped by (model, gpus); each bar says
    its ratio to the group's baseline bar (``ulysses``; else its shortest bar). A search that
    stopped with an ``error`` is a hatched bar (the longest length that fit before it) saying so."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("model"), r.get("gpus"))].append(r)
    x, labels, centers = 0, [], []
    width = 0.8
    failed = False
    for (model, gpus), pts in sorted(groups.items(), key=str):
        pts.sort(key=lambda r: (not _is_baseline(r["strategy"]), r.get("chunks") or 0, r.get("chunk_tokens") or 0))
        found = [r for r in pts if r.get("status") != "error"]
        base = next((r["max_seq_len"] for r in found if _is_baseline(r["strategy"]) and r["max_seq_len"]), None)
        base = base or min((r["max_seq_len"] for r in found if r["max_seq_len"]), default=None)
        start = x
        for r in pts:
            value = r["max_seq_len"] or 0
            if r.get("status") == "error":
                ax.bar(x, value, width=width, color="white", edgecolor=strategy_color(r["strategy"]), hatch="//")
                failed = True
                text = "error" + (f"\n>= {format_tokens(value)}" if value else "")
            else:
                ax.bar(x, value, width=width, color=strategy_color(r["strategy"]), edgecolor="black")
                text = f"{format_tokens(value)}" + (f"\n{value / base:.1f}x" if base and value else "")
            ax.annotate(
                text, (x, value), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points"
            )
            suffix = f" u={r['chunks']}" if strategy_takes_chunks(r["strategy"]) and r.get("chunks") else ""
            suffix += f" C={format_tokens(r['chunk_tokens'])}" if r.get("chunk_tokens") else ""
            labels.append((x, f"{r['strategy']}{suffix}"))
            x += 1
        centers.append(((start + x - 1) / 2, f"{model}, {gpus} GPU" + ("s" if gpus != 1 else "")))
        x += 0.6
    ax.set_xticks([p for p, _ in labels], [t for _, t in labels], rotation=30, ha="right", fontsize=8)
    for c, text in centers:
        ax.annotate(text, (c, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=9)
    top = max([r["max_seq_len"] or 0 for r in rows] + [1])
    ax.yaxis.set_major_locator(MultipleLocator(2 ** math.ceil(math.log2(max(1, top / 5)))))  # ~5 round ticks
    ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _p: format_tokens(x)))
    ax.set_ylabel("longest trainable sequence (tokens)")
    ax.margins(y=0.15)
    if failed:
        proxy = plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="gray", hatch="//")
        ax.legend([proxy], ["error: the search stopped (bar: the longest length that fit)"], fontsize=8,
                  frameon=False, loc="upper left")  # fmt: skip


def _legend(fig, axes):
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=False):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(4, len(labels)),
                   frameon=False, bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    return math.ceil(len(labels) / 4)


def summary_figure(rows, path, device_memory_gib=None, formats=("png",), both_conventions=False,
                   panels=("device", "host", "mfu")):  # fmt: skip
    """Device memory, host memory and MFU vs ``seq_len`` side by side; saved as PNG (and PDF).
    ``panels`` leaves out the host-memory or MFU panel (for tables without that column)."""
    if "device" not in panels or not set(panels) <= {"device", "host", "mfu"}:
        raise ValueError(f"panels must be 'device' and any of 'host', 'mfu'; got {panels}")
    panels = [p for p in ("device", "host", "mfu") if p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(17 * len(panels) / 3, 5.2), squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))
    plot_memory(rows, axes["device"], axes.get("host"), device_memory_gib)
    if "mfu" in axes:
        plot_mfu(rows, axes["mfu"], both_conventions)
    axes = list(axes.values())
    models = sorted({str(r.get("model")) for r in rows})
    fig.suptitle(f"{', '.join(models)}: memory and MFU vs sequence length")
    legend_rows = _legend(fig, axes)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * legend_rows, 1, 1))
    return _save(fig, path, formats)


def chunks_figure(rows, path, seq_len=None, formats=("png",)):
    """The chunk trade-off (step time and memory vs ``chunks``) as a saved figure."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    plot_chunks(rows, axes[0], axes[1], seq_len)
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, formats)


def max_seqlen_figure(rows, path, formats=("png",)):
    """The longest trainable sequence per strategy as a saved bar chart."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4.8))
    plot_max_seqlen(rows, ax)
    ax.set_title("maximum sequence length", pad=18)
    fig.tight_layout()
    return _save(fig, path, formats)


def _save(fig, path, formats):
    path = Path(path)
    written = []
    for fmt in formats:
        out = path.with_suffix(f".{fmt}")
        fig.savefig(out, dpi=120)
        written.append(out)
    plt.close(fig)
    return written


STREAM_ORDER = ["compute", "comm", "h2d", "d2h"]


def plot_timeline(rows, path, title="", formats=("png",)):
    """One lane per stream, one bar per op (colour by kind): shows copies overlapping compute."""
    streams = sorted({r["stream"] for r in rows}, key=lambda s: (STREAM_ORDER.index(s) if s in STREAM_ORDER else 9, s))
    kinds = sorted({r["kind"] for r in rows})
    cmap = plt.get_cmap("tab20")
    colors = {k: cmap(i % 20) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.7 * len(streams)))
    for lane, stream in enumerate(streams):
        for r in rows:
            if r["stream"] == stream:
                ax.barh(lane, r["end_ms"] - r["start_ms"], left=r["start_ms"], height=0.6, color=colors[r["kind"]],
                        edgecolor="black", linewidth=0.2)  # fmt: skip
    ax.set_yticks(range(len(streams)), streams)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "chunk pipeline timeline")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds]
    ax.legend(handles, kinds, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=min(6, len(kinds)), frameon=False)
    fig.tight_layout()
    return _save(fig, path, formats)


def _float(value) -> float:
    return math.nan if value in (None, "") else float(value)


def plot_training(rows, ax_loss, ax_lr=None, label=None, **style):
    """Loss vs optimizer step from ``train.csv`` rows (strings or numbers); the learning rate on
    ``ax_lr`` if given and the rows have one. A run of one step is a marker."""
    steps = [int(float(r["step"])) + 1 for r in rows]
    if len(rows) == 1:
        style = {"marker": "o", **style}
    ax_loss.plot(steps, [_float(r.get("loss")) for r in rows], label=label, **style)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (mean token cross entropy)")
    if ax_lr is not None and any(r.get("lr") not in (None, "") for r in rows):
        ax_lr.plot(steps, [_float(r.get("lr")) for r in rows], color="gray", linewidth=1,
                   marker="o" if len(rows) == 1 else None)  # fmt: skip
        ax_lr.set_xlabel("optimizer step")
        ax_lr.set_ylabel("learning rate")


def training_figure(runs, path, formats=("png",)):
    """Loss curves and learning-rate schedules of one or more runs on one figure (``runs``: the
    ``train.csv`` rows of one run, or ``{label: rows}``)."""
    runs = runs if isinstance(runs, dict) else {None: runs}
    # The learning rate of the first run that has one (runs of one comparison share the schedule).
    lr_run = next((label for label, rows in runs.items() if any(r.get("lr") not in (None, "") for r in rows)), None)
    if any("lr" in r for rows in runs.values() for r in rows):
        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    else:  # no lr column: the loss alone
        fig, ax_loss = plt.subplots(figsize=(8.25, 4))
        ax_lr = None
    cmap = plt.get_cmap("tab10")
    for i, (label, rows) in enumerate(runs.items()):
        color = strategy_color(label) if _spec(label) is not None else cmap(i % 10)
        # Wide solid line first, then thinner dashed ones: runs that agree stay visible on top of each other.
        style = dict(linewidth=2.5, linestyle="-") if i == 0 else dict(linewidth=1.2, linestyle="--")
        plot_training(rows, ax_loss, ax_lr if label == lr_run else None, label=label, color=color, **style)
    if any(runs):
        ax_loss.legend(frameon=False)
    ax_loss.set_title("training loss")
    if ax_lr is not None:
        ax_lr.set_title("learning rate")
    fig.tight_layout()
    return _save(fig, path, formats)
