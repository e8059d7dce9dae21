"""Where things are in the repository, defined once."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"  # Hydra configs: config.yaml, plan.yaml, model/, parallel/, hardware/, sweep/
RESULTS_DIR = REPO / "experiments" / "results"  # committed measurements (CSV, PNG, logs)
