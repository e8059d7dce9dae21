"""``python -m experiments.run``: one sweep point per Hydra job (the body is :mod:`experiments.sweep`)."""

from .sweep.controller import main, make_row, measure, run_point
from .sweep.points import check_point, resolve_point

__all__ = ["check_point", "main", "make_row", "measure", "resolve_point", "run_point"]

if __name__ == "__main__":
    main()
