"""Hydra callbacks: count a sweep's points up front (for progress lines) and summarise at the end."""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def count_points(config: DictConfig) -> int:
    """Number of jobs a multirun will launch: the product of each swept key's value count."""
    sweeps = {}
    for key, value in (config.hydra.sweeper.get("params") or {}).items():
        sweeps[key] = f"{key}={value}"
    for override in config.hydra.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        sweeps[key] = override
    parser = OverridesParser.create()
    total = 1
    for override in parser.parse_overrides(list(sweeps.values())):
        if override.is_sweep_override():
            total *= len(list(override.sweep_iterator()))
    return total


class SweepTable(Callback):
    """Writes ``.total_points`` when a multirun starts; at the end, the memory/MFU figure."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / ".total_points").write_text(str(count_points(config)))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        csv_path = sweep_dir / config.results_csv
        if not csv_path.exists():
            return
        try:
            from .plots import load_results, summary_figure
        except ImportError as exc:  # matplotlib missing: the table is the record
            print(f"sweep table: {csv_path} (figure skipped: {exc})", flush=True)
            return
        rows = load_results(csv_path)
        ok = sum(r.get("status") == "ok" for r in rows)
        print(f"sweep table: {csv_path} ({len(rows)} points, {ok} ok)", flush=True)
        if ok:
            for path in summary_figure(rows, sweep_dir / "memory_mfu"):
                print(f"figure: {path}", flush=True)
