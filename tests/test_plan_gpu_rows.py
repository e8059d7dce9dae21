"""The planner replays the step times measured on a GPU: ``llama3.2-1b`` on one H200 (local at
64K, FPDT at 64K/128K/256K), with the efficiencies the ``h200`` preset carries, fitted to those
rows by ``fit_efficiencies``. The rows ran the code before 2026-12-06, whose checkpoint recompute
also ran the chunked MLP's forward and whose chunked loss recomputed its logits, and whose FPDT
backward always looped over KV chunks: they are replayed as that code (``legacy_recompute``,
``backward_order="kv"``)."""

import csv
from pathlib import Path

import pytest

from experiments.core.hardware import load_preset
from experiments.planner.estimate import estimate_row, fit_efficiencies

OLD_CODE = dict(legacy_recompute=True, backward_order="kv")
ROWS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "llama3.2-1b_one_gpu_nvidia_h200.csv"


def _rows():
    return [r for r in csv.DictReader(ROWS.open()) if r["status"] == "ok"]


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r['strategy']}-{r['seq_len']}-u{r['chunks']}")
def test_planner_step_time_within_15_percent_of_the_h200(row):
    est = estimate_row(row, **OLD_CODE)
    measured = float(row["step_time_s"])
    assert abs(est.step_time_s / measured - 1) <= 0.15, (est.step_time_s, measured, est.step_parts)


def test_h200_preset_holds_the_fitted_efficiencies():
    dense, attention, errors = fit_efficiencies(_rows(), **OLD_CODE)
    preset = load_preset("h200")
    assert preset["dense_efficiency"] == pytest.approx(dense, abs=0.01)
    assert preset["attention_efficiency"] == pytest.approx(attention, abs=0.01)
    assert max(abs(e) for e in errors) <= 0.15


def test_fit_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_efficiencies(_rows()[:1])
