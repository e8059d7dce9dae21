"""Bad input to ``python -m experiments.plot``: a clear error and exit status 2, nothing written;
failed points are marked on the figure and named in a note (small tables written under tmp_path)."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from experiments import plot  # noqa: E402
from experiments.figures import plots  # noqa: E402
from experiments.figures.cli import _runs  # noqa: E402
from experiments.figures.inputs import PlotInputError, read_tables  # noqa: E402

COLUMNS = ["status", "error", "strategy", "model", "seq_len", "chunks", "gpus", "step_time_s", "mfu",
           "device_mem_peak_gib", "host_mem_gib", "max_device_memory", "key"]  # fmt: skip
MAX_COLUMNS = ["status", "model", "strategy", "gpus", "chunks", "chunk_tokens", "max_seq_len", "first_failure",
               "failure_status", "probes", "error"]  # fmt: skip


def _row(strategy, chunks, seq_len, status="ok", error=""):
    ok = status == "ok"
    return dict(status=status, error=error, strategy=strategy, model="llama-tiny", seq_len=seq_len, chunks=chunks,
                gpus=2, step_time_s=seq_len / 1e4 if ok else "", mfu=0.01 * chunks if ok else "",
                device_mem_peak_gib=seq_len / 1e6 / chunks if ok else "", host_mem_gib=0.001 if ok else "",
                max_device_memory=0.01, key=f"{strategy}_s{seq_len}_u{chunks}")  # fmt: skip


# fpdt u=1 timed out at 2K; ulysses ran out of memory at 4K (its failed row has no mfu: legitimate).
ROWS = [_row("fpdt", u, s, "timeout" if (u, s) == (1, 2048) else "ok", "hung" if (u, s) == (1, 2048) else "")
        for u in (1, 2) for s in (1024, 2048, 4096)]  # fmt: skip
ROWS += [_row("ulysses", 1, 1024), _row("ulysses", 1, 2048), _row("ulysses", 1, 4096, "oom", "out of memory")]
MAX_ROWS = [
    dict(status="ok", model="llama-tiny", strategy="ulysses", gpus=2, chunks=1, max_seq_len=5120, probes=6),
    dict(status="ok", model="llama-tiny", strategy="fpdt", gpus=2, chunks=4, max_seq_len=17408, probes=9),
    dict(status="error", model="llama-tiny", strategy="ring", gpus=2, chunks=1, max_seq_len=0, error="boom"),
]


def _csv(path, rows, columns=COLUMNS, header=None):
    lines = [header or ",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _edit(rows, i, **kw):
    return [dict(r, **kw) if j == i else r for j, r in enumerate(rows)]


def _run(argv, capsys):
    """``main(argv)``: (exit status, stderr, written paths)."""
    try:
        written = plot.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err, []
    return 0, capsys.readouterr().err, written


def _corrupt_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    _csv(sweep / "results.csv", ROWS)
    (sweep / "points").mkdir()
    (sweep / "points" / "x.json").write_text('{"status": "ok"\n')
    return sweep


# (id, build(tmp_path) -> inputs, expected lines: "{0}" is the first input)
BAD = [
    ("header-only", lambda t: [_csv(t / "r.csv", [])], ["no ok rows to plot in {0} (0 rows)"]),
    ("all-error", lambda t: [_csv(t / "r.csv", [dict(r, status="error", error="boom") for r in ROWS])],
     ["no ok rows to plot in {0} (9 rows: 9 error)"]),
    ("error-and-timeout", lambda t: [_csv(t / "r.csv", [_row("fpdt", 1, s, "error", "boom") for s in (1, 2, 3)]
                                          + [_row("fpdt", 1, 4, "timeout", "hung")])],
     ["no ok rows to plot in {0} (4 rows: 3 error, 1 timeout)"]),
    ("no-status", lambda t: [_csv(t / "r.csv", ROWS, [c for c in COLUMNS if c != "status"])],
     ["{0}: column status is missing (needed for the memory_mfu figure)"]),
    ("seq-len-and-strategy-only", lambda t: [_csv(t / "r.csv", ROWS, ["seq_len", "strategy"])],
     ["{0}: columns status, device_mem_peak_gib are missing (needed for the memory_mfu figure)"]),
    ("no-device-memory", lambda t: [_csv(t / "r.csv", ROWS, [c for c in COLUMNS if c != "device_mem_peak_gib"])],
     ["{0}: column device_mem_peak_gib is missing (needed for the memory_mfu figure)"]),
    ("no-chunks-column", lambda t: [_csv(t / "r.csv", ROWS, [c for c in COLUMNS if c != "chunks"])],
     ["{0}: column chunks is missing (needed for the chunks figure)"]),
    ("seq-len-4k", lambda t: [_csv(t / "r.csv", _edit(ROWS, 0, seq_len="4k"))],
     ["{0} line 2: seq_len='4k' is not a number"]),
    ("seq-len-zero", lambda t: [_csv(t / "r.csv", _edit(ROWS, 0, seq_len=0))],  # an ok row: a failed one is left out
     ["{0} line 2: seq_len=0 must be > 0 (the memory_mfu figure's axis is logarithmic)"]),
    ("empty-seq-len", lambda t: [_csv(t / "r.csv", _edit(ROWS, 2, seq_len=""))],
     ["{0} line 4: seq_len is empty (every row needs one for the memory_mfu figure)"]),
    ("mfu-abc", lambda t: [_csv(t / "r.csv", _edit(ROWS, 0, mfu="abc", device_mem_peak_gib="n/a"))],
     ["{0} line 2: mfu='abc' is not a number", "{0} line 2: device_mem_peak_gib='n/a' is not a number"]),
    ("unknown-status", lambda t: [_csv(t / "r.csv", _edit(ROWS, 3, status="OK"))],
     ["{0} line 5: status='OK' is not one of ok, oom, error, timeout"]),
    ("extra-cell", lambda t: [_csv(t / "r.csv", _edit(ROWS, 0, key="a,b"))],
     [f"{{0}} line 2: {len(COLUMNS) + 1} cells, but the header has {len(COLUMNS)} columns"]),
    ("binary", lambda t: [(t / "r.csv", (t / "r.csv").write_bytes(b"garbage\x00\xff\n"))[0]],
     ["{0} is not a text CSV table: byte 0xff at offset 8 is not UTF-8"]),
    ("empty-file", lambda t: [(t / "r.csv", (t / "r.csv").write_text(""))[0]],
     ["{0} is empty: a CSV table starts with a header line of column names"]),
    ("train-header-only", lambda t: [_csv(t / "run" / "train.csv", [], ["step", "loss"]).parent],
     ["no rows to plot in {0}/train.csv (0 rows)"]),
    ("train-loss-abc", lambda t: [_csv(t / "train.csv", [dict(step=0, loss="nan"), dict(step=1, loss="abc")],
                                       ["step", "loss"])],
     ["{0} line 3: loss='abc' is not a number"]),
    ("max-seqlen-only-errors", lambda t: [_csv(t / "m.csv", MAX_ROWS[2:], MAX_COLUMNS)],
     ["no ok rows to plot in {0} (1 row: 1 error)"]),
    ("max-seqlen-no-columns", lambda t: [_csv(t / "m.csv", [], ["max_seq_len"])],
     ["{0}: columns status, strategy are missing (needed for the max_seqlen figure)"]),
    ("only-point-corrupt", lambda t: [_corrupt_sweep(t)],
     ["no ok rows to plot in {0} (0 rows)", "note: ignoring unreadable result {0}/points/x.json",
      "9 rows of points not read, not plotted", "pass {0}/results.csv itself"]),
    # A good input before a bad one: the bad one is found before any figure is written.
    ("good-then-bad", lambda t: [_csv(t / "r.csv", ROWS), _csv(t / "bad.csv", _edit(ROWS, 0, mfu="abc"))],
     ["{1} line 2: mfu='abc' is not a number"]),
]  # fmt: skip


@pytest.mark.parametrize("build, expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_a_clear_error_and_nothing_is_written(tmp_path, capsys, build, expected):
    inputs = build(tmp_path)
    out = tmp_path / "figures"
    code, err, _ = _run([*inputs, "--out", out], capsys)
    assert code == 2, err
    for text in expected:
        assert text.format(*inputs) in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--device-memory", "-5"], "--device-memory must be > 0"),
        (["--device-memory", "0"], "--device-memory must be > 0"),
        (["--device-memory", "nan"], "--device-memory must be > 0"),
        (["--out", "{file}"], "--out must be a directory: {file} is a file"),
    ],
    ids=["negative", "zero", "nan", "out-is-a-file"],
)
def test_usage_errors(tmp_path, capsys, args, expected):
    table = _csv(tmp_path / "r.csv", ROWS)
    (tmp_path / "outfile").write_text("")
    fill = dict(file=tmp_path / "outfile")
    code, err, _ = _run([table, *[a.format(**fill) for a in args]], capsys)
    assert code == 2 and expected.format(**fill) in err and len(err.splitlines()) == 1


def test_failed_points_are_marked_and_named(tmp_path, capsys):
    table = _csv(tmp_path / "r.csv", ROWS)  # fpdt u=1 timed out at 2K; empty cells of failed rows are fine
    code, err, written = _run([table, "--out", tmp_path / "figs"], capsys)
    assert code == 0 and {p.name for p in written} == {"memory_mfu.png", "chunks.png"}
    assert (
        "2 failed rows with no value, marked on the figure by status: fpdt u=1 gpus=2 S=2048 timeout (hung); "
        "ulysses gpus=2 S=4096 oom (out of memory)"
    ) in err

    rows = plots.load_results(table)
    fig, axes = plt.subplots(1, 2)
    plots.plot_memory(rows, axes[0])
    plots.plot_mfu(rows, axes[1])
    for ax in axes:
        marks = [line for line in ax.get_lines() if line.get_marker() == plots.FAILURE_MARKERS["timeout"]]
        assert [list(line.get_xdata()) for line in marks if len(line.get_xdata())] == [[2048]]
        assert "timed out (no value)" in ax.get_legend_handles_labels()[1]
        (curve,) = [line for line in ax.get_lines() if line.get_label() == "fpdt u=1, 2 GPUs"]
        assert list(curve.get_xdata()) == [1024, 2048, 4096] and math.isnan(curve.get_ydata()[1])  # broken at 2K
    plt.close(fig)


def test_failed_points_with_settings_off_the_axes_are_left_out_and_named(tmp_path, capsys):
    """A sweep records a point that failed on its own bad setting (chunks=0, seq_len=-4) as an
    error row; the figures of the rest are drawn, and a note names what had no place on the axes."""
    bad = [_row("fpdt", 0, 1024, "error", "chunks=0 must be >= 1"), _row("fpdt", 2, -4, "error", "seq_len=-4")]
    table = _csv(tmp_path / "r.csv", ROWS + bad)
    code, err, written = _run([table, "--out", tmp_path / "figs"], capsys)
    assert code == 0 and {p.name for p in written} == {"memory_mfu.png", "chunks.png"}, err
    assert f"memory_mfu: 1 failed row left out, with no place on its axes: {table} line 12 (error): seq_len=-4" in err
    assert "chunks: 2 failed rows left out, with no place on its axes" in err and "chunks=0 must be > 0" in err


def _failure_marks(ax):
    """``(x, marker, y)`` of each failed-point marker on ``ax`` (legend proxies have no point)."""
    marks = [line for line in ax.get_lines() if line.get_marker() in plots.FAILURE_MARKERS.values()]
    return sorted((m.get_xdata()[0], m.get_marker(), m.get_ydata()[0]) for m in marks if len(m.get_xdata()))


def test_every_failed_point_of_a_curve_is_marked_and_named(tmp_path, capsys):
    # One curve: ok at 1K, oom at 2K, timeout at 4K, ok at 8K, oom at 16K.
    failures = {2048: ("oom", "out of memory"), 4096: ("timeout", "hung"), 16384: ("oom", "out of memory")}
    curve = [_row("fpdt", 1, s, *failures.get(s, ("ok", ""))) for s in (1024, 2048, 4096, 8192, 16384)]
    table = _csv(tmp_path / "r.csv", curve)
    code, err, _ = _run([table, "--out", tmp_path / "figs"], capsys)
    assert code == 0
    assert (
        "memory_mfu: 3 failed rows with no value, marked on the figure by status: fpdt u=1 gpus=2 S=2048 oom (out of "
        "memory); fpdt u=1 gpus=2 S=4096 timeout (hung); fpdt u=1 gpus=2 S=16384 oom (out of memory)"
    ) in err

    rows = plots.load_results(table)
    fig, (ax_device, ax_host, ax_mfu) = plt.subplots(1, 3)
    plots.plot_memory(rows, ax_device, ax_host)
    plots.plot_mfu(rows, ax_mfu)
    (limit,) = {line.get_ydata()[0] for line in ax_device.get_lines() if line.get_linestyle() == "--"}
    # On the device panel each oom is an x on the device-memory line; elsewhere every failure is at the foot.
    assert _failure_marks(ax_device) == [(2048, "x", limit), (4096, "h", 0), (16384, "x", limit)]
    for ax in (ax_host, ax_mfu):
        assert _failure_marks(ax) == [(2048, "x", 0), (4096, "h", 0), (16384, "x", 0)]
        assert {"out of memory (no value)", "timed out (no value)"} <= set(ax.get_legend_handles_labels()[1])
    for ax in (ax_device, ax_host, ax_mfu):
        (line,) = [line for line in ax.get_lines() if line.get_label() == "fpdt u=1, 2 GPUs"]
        assert list(line.get_xdata()) == [1024, 2048, 4096, 8192]  # the oom at 16K is after its last value
        assert [math.isnan(y) for y in line.get_ydata()] == [False, True, True, False]  # broken at each failure
    plt.close(fig)


def test_a_chunk_line_breaks_at_every_failed_chunk_count(tmp_path):
    failures = {2: ("oom", "out of memory"), 8: ("timeout", "hung")}
    at_4k = [_row("fpdt", u, 4096, *failures.get(u, ("ok", ""))) for u in (1, 2, 4, 8, 16)]
    rows = plots.load_results(_csv(tmp_path / "r.csv", at_4k))
    fig, axes = plt.subplots(1, 2)
    plots.plot_chunks(rows, *axes, seq_len=4096)
    for ax in axes:
        (line,) = [line for line in ax.get_lines() if line.get_label() == "llama-tiny fpdt, 2 GPUs"]
        assert list(line.get_xdata()) == [1, 2, 4, 8, 16]
        assert [math.isnan(y) for y in line.get_ydata()] == [False, True, False, True, False]
        assert _failure_marks(ax) == [(2, "x", 0), (8, "h", 0)]
    plt.close(fig)


def test_chunk_counts_that_failed_are_marked(tmp_path):
    rows = plots.load_results(_csv(tmp_path / "r.csv", _edit(ROWS, 2, status="oom", error="out of memory")))
    fig, (ax_time, ax_mem) = plt.subplots(1, 2)
    plots.plot_chunks(rows, ax_time, ax_mem, seq_len=4096)  # fpdt u=1 ran out of memory there, u=2 ran
    for ax in (ax_time, ax_mem):
        assert [list(line.get_xdata()) for line in ax.get_lines() if line.get_marker() == "x"][:1] == [[1]]
    assert "out of memory (no value)" in ax_time.get_legend_handles_labels()[1]
    plt.close(fig)


def test_max_seqlen_error_is_a_hatched_bar_and_a_note(tmp_path, capsys):
    table = _csv(tmp_path / "m.csv", MAX_ROWS, MAX_COLUMNS)
    code, err, written = _run([table, "--out", tmp_path], capsys)
    assert code == 0 and [p.name for p in written] == ["max_seqlen.png"]
    assert "max_seqlen: 1 failed row with no value, marked on the figure by status: ring gpus=2 error (boom)" in err
    fig, ax = plt.subplots()
    plots.plot_max_seqlen(plots.load_max_seqlen(table), ax)
    assert [p.get_hatch() for p in ax.patches if p.get_hatch()] == ["//"] and "error" in [
        t.get_text() for t in ax.texts
    ]
    plt.close(fig)


def test_optional_columns_leave_their_panel_out(tmp_path, capsys):
    # A train.csv of step and loss only (one step: drawn as a marker), a results table without mfu.
    train = _csv(tmp_path / "run" / "train.csv", [dict(step=0, loss=4.5)], ["step", "loss"])
    table = _csv(tmp_path / "r.csv", ROWS, [c for c in COLUMNS if c != "mfu"])
    code, err, written = _run([train.parent, table, "--out", tmp_path / "figs"], capsys)
    assert code == 0 and {p.name for p in written} == {"memory_mfu.png", "chunks.png", "train_loss.png"}
    assert "no lr column; the train_loss figure is drawn without the learning-rate panel" in err
    assert "no mfu column; the memory_mfu figure is drawn without the MFU panel" in err


def test_a_combined_training_table_is_one_curve_per_run(tmp_path):
    rows = [dict(run=run, step=s, loss=4.0 - s / 10, lr=1e-3) for run in ("local", "fpdt") for s in range(5)]
    table = _csv(tmp_path / "train_both.csv", rows, ["run", "step", "loss", "lr"])
    runs = _runs(read_tables(table, "train"))
    assert {k: len(v) for k, v in runs.items()} == {"local": 5, "fpdt": 5}


def test_library_readers_raise_the_same_errors(tmp_path):
    with pytest.raises(PlotInputError, match=r"line 2: mfu='abc' is not a number"):
        plots.load_results(_csv(tmp_path / "r.csv", _edit(ROWS, 0, mfu="abc")))
