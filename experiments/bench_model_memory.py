"""``python -m experiments.bench_model_memory``: the body is :mod:`experiments.bench.model_memory`."""

from .bench.model_memory import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
