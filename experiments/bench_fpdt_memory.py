"""``python -m experiments.bench_fpdt_memory``: the body is :mod:`experiments.bench.fpdt_memory`."""

from .bench.fpdt_memory import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
