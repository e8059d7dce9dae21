"""Figures from sweep results (``results.csv``): memory and MFU curves, the chunk trade-off.

Every function takes rows as returned by :func:`load_results` (dicts with numbers already
parsed) and draws on matplotlib axes, so notebooks can compose them; :func:`summary_figure`
is the memory + MFU figure the sweeps write as PNG. Colours mark the strategy, line styles the
chunk count, markers the GPU count; points that ran out of memory are drawn as a red ``x`` at
the last ``seq_len`` each curve tried.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: E402

STRATEGY_COLORS = {"local": "#555555", "ulysses": "#1f77b4", "fpdt": "#d62728"}
CHUNK_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
GPU_MARKERS = {1: "o", 2: "s", 4: "^", 8: "D", 16: "v", 32: "P"}
_NUMERIC = {
    "seq_len", "chunks", "gpus", "batch_size", "n_layers", "step_time_s", "step_time_p20_s",
    "step_time_p80_s", "tokens_per_s", "tflops_per_gpu", "mfu", "mfu_full_attention", "peak_tflops",
    "device_mem_peak_gib", "device_mem_reserved_gib", "host_mem_gib", "host_mem_node_gib",
    "rss_peak_gib", "max_device_memory", "device_mem_total_gib", "loss", "max_seq_len",
}  # fmt: skip


def _parse(value: str):
    if value in ("", "None", None):
        return None
    if value in ("True", "False"):
        return value == "True"
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def load_results(*paths) -> list[dict]:
    """Rows of one or more ``results.csv`` files or sweep directories (``<dir>/results.csv``)."""
    rows = []
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(p.rglob("results.csv"))
        if not files:
            raise FileNotFoundError(f"no results.csv at {p}")
        for f in files:
            with f.open(newline="") as fh:
                for raw in csv.DictReader(fh):
                    row = {k: (_parse(v) if k in _NUMERIC or v in ("True", "False", "") else v) for k, v in raw.items()}
                    row["source"] = str(f)
                    rows.append(row)
    return rows


def _series(rows, x_key):
    """Group rows into curves by (model, strategy, chunks, gpus), sorted along ``x_key``."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("model"), r.get("strategy"), r.get("chunks"), r.get("gpus"))].append(r)
    return {k: sorted(v, key=lambda r: r[x_key]) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def _style(strategy, chunks, gpus, all_chunks):
    order = sorted(all_chunks)
    return dict(
        color=STRATEGY_COLORS.get(strategy, "#2ca02c"),
        linestyle=CHUNK_STYLES[order.index(chunks) % len(CHUNK_STYLES)] if chunks in order else "-",
        marker=GPU_MARKERS.get(gpus, "o"),
    )


def _label(key, multi_model):
    model, strategy, chunks, gpus = key
    text = f"{strategy}" + (f" u={chunks}" if strategy == "fpdt" else "") + f", {gpus} GPU" + ("s" if gpus != 1 else "")
    return f"{model}: {text}" if multi_model else text


def _tokens(x, _pos=None):
    x = int(x)
    if x >= 1 << 20 and x % (1 << 20) == 0:
        return f"{x >> 20}M"
    if x >= 1 << 10 and x % (1 << 10) == 0:
        return f"{x >> 10}K"
    return str(x)


def _seq_axis(ax, values):
    ax.set_xscale("log", base=2)
    ticks = sorted({v for v in values if v})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlabel("sequence length (tokens)")


def _draw_curves(ax, rows, y_key, x_key="seq_len", mark_oom=True):
    curves = _series(rows, x_key)
    all_chunks = {k[2] for k in curves}
    multi_model = len({k[0] for k in curves}) > 1
    for key, pts in curves.items():
        ok = [r for r in pts if r.get("status") == "ok" and r.get(y_key) is not None]
        style = _style(key[1], key[2], key[3], all_chunks)
        if ok:
            ax.plot([r[x_key] for r in ok], [r[y_key] for r in ok], label=_label(key, multi_model), **style)
        failed = [r for r in pts if r.get("status") == "oom"]
        if mark_oom and failed:
            first = min(failed, key=lambda r: r[x_key])
            y = ok[-1][y_key] if ok else (ax.get_ylim()[1] if ax.has_data() else 0)
            ax.plot([first[x_key]], [y], linestyle="none", marker="x", color="red", markersize=11, markeredgewidth=2.5)
    return curves


def plot_memory(rows, ax_device, ax_host=None, device_memory_gib=None):
    """Peak device memory (and host offload memory) vs ``seq_len``; OOM points as red ``x``."""
    curves = _draw_curves(ax_device, rows, "device_mem_peak_gib")
    simulated = any(r.get("device_mem_simulated") in (True, "True") for r in rows)
    ax_device.set_ylabel(("simulated " if simulated else "") + "peak device memory per GPU (GiB)")
    ax_device.set_title("device memory")
    limit = device_memory_gib or next((r.get("max_device_memory") for r in rows if r.get("max_device_memory")), None)
    if limit:
        ax_device.axhline(limit, color="black", linestyle="--", linewidth=1)
        ax_device.annotate(f"device memory {limit:g} GiB", (0.01, limit), xycoords=("axes fraction", "data"),
                           va="bottom", fontsize=8)  # fmt: skip
    _seq_axis(ax_device, [r["seq_len"] for r in rows])
    if ax_host is not None:
        _draw_curves(ax_host, rows, "host_mem_gib", mark_oom=False)
        ax_host.set_ylabel("peak host memory per GPU for offload (GiB)")
        ax_host.set_title("host memory (offloaded chunks + checkpoints)")
        _seq_axis(ax_host, [r["seq_len"] for r in rows])
    return curves


def plot_mfu(rows, ax, both_conventions=False):
    """MFU (%) vs ``seq_len``; causal attention counted as half the square (and optionally full)."""
    pct = [dict(r, mfu_pct=None if r.get("mfu") is None else 100 * r["mfu"],
                mfu_full_pct=None if r.get("mfu_full_attention") is None else 100 * r["mfu_full_attention"])
           for r in rows]  # fmt: skip
    _draw_curves(ax, pct, "mfu_pct", mark_oom=False)
    if both_conventions:
        for line in list(ax.get_lines()):
            line.set_alpha(1.0)
        faded = [dict(r, strategy=r.get("strategy")) for r in pct]
        curves = _series(faded, "seq_len")
        for key, pts in curves.items():
            ok = [r for r in pts if r.get("status") == "ok" and r.get("mfu_full_pct") is not None]
            if ok:
                ax.plot([r["seq_len"] for r in ok], [r["mfu_full_pct"] for r in ok], color=STRATEGY_COLORS.get(key[1]),
                        alpha=0.35, linestyle=":", marker=None)  # fmt: skip
    ax.set_ylabel("MFU (%)\nmodel FLOPs, causal attention = half square, no recompute")
    ax.set_title("model FLOPs utilisation" + (" (dotted: full-square attention)" if both_conventions else ""))
    _seq_axis(ax, [r["seq_len"] for r in rows])


def plot_chunks(rows, ax_time, ax_mem, seq_len=None):
    """FPDT chunk trade-off at one ``seq_len``: step time and device memory vs ``chunks``."""
    fpdt = [r for r in rows if r.get("strategy") == "fpdt" and r.get("status") == "ok"]
    if seq_len is None and fpdt:
        seq_len = max(r["seq_len"] for r in fpdt)
    fpdt = [r for r in fpdt if r["seq_len"] == seq_len]
    groups = defaultdict(list)
    for r in fpdt:
        groups[(r.get("model"), r.get("gpus"))].append(r)
    for (model, gpus), pts in sorted(groups.items(), key=str):
        pts.sort(key=lambda r: r["chunks"])
        xs = [r["chunks"] for r in pts]
        kw = dict(color=STRATEGY_COLORS["fpdt"], marker=GPU_MARKERS.get(gpus, "o"), label=f"{model}, {gpus} GPUs")
        ax_time.plot(xs, [r["step_time_s"] for r in pts], **kw)
        ax_mem.plot(xs, [r["device_mem_peak_gib"] for r in pts], **kw)
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{int(x)}"))
        ax.set_xlabel("chunks u")
    ax_time.set_ylabel("step time p50 (s)")
    ax_mem.set_ylabel("peak device memory per GPU (GiB)")
    title = f"FPDT at seq_len={_tokens(seq_len)}" if seq_len else "FPDT (no rows)"
    ax_time.set_title(title + ": step time")
    ax_mem.set_title(title + ": device memory")


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


def summary_figure(rows, path, device_memory_gib=None, formats=("png",)):
    """Device memory, host memory and MFU vs ``seq_len`` side by side; saved as PNG (and PDF)."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    plot_memory(rows, axes[0], axes[1], device_memory_gib)
    plot_mfu(rows, axes[2])
    models = sorted({str(r.get("model")) for r in rows})
    fig.suptitle(f"{', '.join(models)}: memory and MFU vs sequence length")
    legend_rows = _legend(fig, axes)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * legend_rows, 1, 1))
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
