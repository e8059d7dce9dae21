"""``python -m experiments.train``: real training with checkpoints (the body is
:mod:`experiments.training.job`)."""

from .training.job import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
