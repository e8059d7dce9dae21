"""``python -m experiments.plot``: figures of sweeps (the body is :mod:`experiments.figures.cli`)."""

from .figures.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
