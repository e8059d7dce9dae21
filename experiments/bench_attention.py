"""``python -m experiments.bench_attention``: the body is :mod:`experiments.bench.attention`."""

import sys

from .bench.attention import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
