"""``python -m experiments.max_seqlen``: the longest trainable sequence (the body is
:mod:`experiments.sweep.max_seqlen`)."""

from .sweep.max_seqlen import main, search

__all__ = ["main", "search"]

if __name__ == "__main__":
    main()
