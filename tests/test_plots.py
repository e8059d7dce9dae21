"""Figures and notebooks from a results fixture produced by a real CPU sweep (tests/fixtures/)."""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from experiments import plot
from experiments.figures import plots

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SWEEP = FIXTURES / "sweep_cpu"
MAX_SEQLEN = FIXTURES / "max_seqlen_cpu"
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def rows():
    return plots.load_results(SWEEP)


def test_fixture_has_what_the_figures_need(rows):
    assert {r["strategy"] for r in rows} == {"ulysses", "fpdt"}
    assert {r["status"] for r in rows} == {"ok", "oom"}
    assert {r["gpus"] for r in rows} == {1, 2} and {r["chunks"] for r in rows} == {1, 2, 4}
    assert all(isinstance(r["seq_len"], int) and r["device_mem_simulated"] is True for r in rows)


def test_memory_plot_marks_limit_and_out_of_memory(rows):
    fig, (ax, ax_host) = plt.subplots(1, 2)
    curves = plots.plot_memory(rows, ax, ax_host)
    limit = rows[0]["max_device_memory"] * 1024  # a 0.007 GiB cap is drawn in MiB
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--" and set(line.get_ydata()) == {limit}]
    assert dashed, "the device-memory line is missing"
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    ooms = sorted((k, r["seq_len"]) for k, pts in curves.items() for r in pts if r["status"] == "oom")
    assert len(ooms) > len({k for k, _ in ooms}), "the fixture has a curve with several oom points"
    # One x per oom point (not one per curve), at its seq_len on the device-memory line.
    assert sorted(line.get_xdata()[0] for line in crosses) == sorted(s for _, s in ooms)
    assert all(line.get_ydata()[0] == limit for line in crosses)
    assert ax.get_xscale() == "log" and "K" in "".join(t.get_text() for t in ax.get_xticklabels())
    assert "simulated" in ax.get_ylabel() and "(MiB)" in ax.get_ylabel()
    plt.close(fig)


def test_mfu_and_chunk_plots(rows):
    fig, axes = plt.subplots(1, 3)
    plots.plot_mfu(rows, axes[0], both_conventions=True)
    assert "half square" in axes[0].get_ylabel()
    seq_len = plots.plot_chunks(rows, axes[1], axes[2])
    assert seq_len in {r["seq_len"] for r in rows}
    assert axes[1].get_lines() and axes[2].get_lines()
    plt.close(fig)


def test_max_seqlen_bars_carry_ratios():
    maxlen = plots.load_max_seqlen(MAX_SEQLEN)
    assert {r["strategy"] for r in maxlen} == {"ulysses", "fpdt"}
    fig, ax = plt.subplots()
    plots.plot_max_seqlen(maxlen, ax)
    texts = [t.get_text() for t in ax.texts]
    assert any(t.endswith("1.0x") for t in texts) and any("x" in t and not t.endswith("1.0x") for t in texts)
    plt.close(fig)


def test_plot_cli_writes_png_and_pdf(tmp_path):
    written = plot.main([str(SWEEP), str(MAX_SEQLEN), "--out", str(tmp_path), "--pdf", "--both-conventions"])
    names = sorted(p.name for p in written)
    assert names == sorted(f"{n}.{ext}" for n in ("memory_mfu", "chunks", "max_seqlen") for ext in ("png", "pdf"))
    assert all(p.stat().st_size > 5_000 for p in written)


def test_plot_cli_reads_renamed_tables_by_their_columns(tmp_path):
    # Combined copies as they are committed under experiments/results/ keep no canonical name.
    sweep = tmp_path / "strategies_cpu.csv"
    sweep.write_text(next(SWEEP.rglob("results.csv")).read_text())
    maxlen = tmp_path / "max_seqlen_strategies_cpu.csv"
    maxlen.write_text(next(MAX_SEQLEN.rglob("max_seqlen.csv")).read_text())
    written = plot.main([str(sweep), str(maxlen), "--out", str(tmp_path / "figs")])
    assert {p.stem for p in written} >= {"memory_mfu", "max_seqlen"}


def test_plot_cli_bad_path_is_one_line_and_exit_2(tmp_path, capsys):
    stray = tmp_path / "notes.csv"
    stray.write_text("a,b\n1,2\n")
    for path in (tmp_path, tmp_path / "no-such-dir", stray):
        with pytest.raises(SystemExit) as exc:
            plot.main([str(path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert NOTEBOOKS, "notebooks/ has no notebook"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FPDT_RESULTS", str(SWEEP))
    monkeypatch.setenv("FPDT_MAX_SEQLEN", str(MAX_SEQLEN))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", str(path.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5, f"{path.name} drew {len(images)} figures"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors


def test_plot_cli_overlays_training_runs(tmp_path):
    for run, offset in (("local", 0.0), ("fpdt", 0.01)):
        (tmp_path / run).mkdir()
        lines = ["step,loss,lr"] + [f"{s},{4.5 - 0.01 * s + offset},{1e-3}" for s in range(20)]
        (tmp_path / run / "train.csv").write_text("\n".join(lines) + "\n")
    written = plot.main([str(tmp_path / "local"), str(tmp_path / "fpdt" / "train.csv"), "--out", str(tmp_path)])
    assert [p.name for p in written] == ["train_loss.png"] and written[0].stat().st_size > 5_000


def test_predicted_vs_measured_skips_what_measured_no_memory():
    import warnings

    rows = plots.load_results(SWEEP)
    ok = next(r for r in rows if r["status"] == "ok" and int(r["gpus"]) * int(r["chunks"]) > 1)
    bad = [dict(ok, status="error", seq_len=511), dict(ok, status="oom", seq_len=511)]  # 511: splits no layout
    fig, ax = plt.subplots()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shown = plots.plot_predicted_vs_measured(rows + bad, ax)
    assert len(shown) == sum(r["status"] in ("ok", "oom") for r in rows)  # the error row is skipped
    assert any("no prediction for" in str(w.message) and "seq_len=511" in str(w.message) for w in caught)
    # Each curve's legend entry can be told apart: colour, line style (chunks) and marker (GPUs).
    handles, labels = ax.get_legend_handles_labels()
    looks = {(h.get_color(), h.get_linestyle(), h.get_marker()) for h in handles}
    assert len(labels) > 1 and len(looks) == len(set(labels)) == len(labels), labels
    fig, ax = plt.subplots()
    assert plots.plot_predicted_vs_measured([dict(ok, status="oom")], ax) and "no ok rows" in ax.get_title()
    plt.close("all")


def test_table_keeps_a_failed_rows_error_on_one_short_line():
    rows = [{"status": "ok", "seq_len": 4096, "mfu": 0.123456, "error": None},
            {"status": "error", "seq_len": 8192, "mfu": None, "error": "RuntimeError: boom\n" + "x" * 200}]  # fmt: skip
    lines = plots.table(rows, ["status", "seq_len", "mfu", "error"], max_width=30).splitlines()
    assert len(lines) == 3 and "0.123" in lines[1]
    assert lines[2].endswith("RuntimeError: boom xxxxxxxx...") and len(lines[2].split()[-1]) < 30
