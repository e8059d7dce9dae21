"""Where things are in the repository, defined once."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"  # Hydra configs: config.yaml, plan.yaml, model/, parallel/, hardware/, sweep/
RESULTS_DIR = REPO / "experiments" / "results"  # committed measurements (CSV, PNG, logs)
# Where benchmarks write without --out: untracked, so a run never replaces a committed table
# (those are written with --out experiments/results/<name>).
BENCH_DIR = REPO / "results" / "bench"

# The jobs read conf/ beside this package (configs, hardware presets) and write results into the
# tree, so they run from a clone: a plain `pip install .` copies the packages without conf/.
if not (CONF_DIR / "config.yaml").is_file():
    raise ImportError(
        f"experiments runs from a clone of the repository: it reads its configs from {CONF_DIR}, which "
        "this installation lacks (a plain `pip install .` copies the packages only). Install with "
        "`pip install -e .` from the clone, or run from its root; fpdt_kernels, parallel and models work "
        "from any install"
    )
