"""``python -m experiments.bench_fpdt_block``: the body is :mod:`experiments.bench.fpdt_block`."""

from .bench.fpdt_block import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
