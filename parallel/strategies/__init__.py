"""Sequence-parallel strategies as registered objects (see :mod:`.base`).

    from parallel.strategies import get_strategy, strategy_names
    get_strategy("fpdt").takes_chunks        # True
    strategy_names()                         # ('local', 'ulysses', 'fpdt', 'ring', 'usp')

A new strategy is one module here (a :class:`Strategy` subclass under ``@register``) imported
below, plus ``conf/parallel/<name>.yaml``.
"""

from .base import Strategy, get_strategy, multi_rank_names, register, strategy_names, unregister

# Registration order is the order strategies are listed in (tables, plots, the planner's default).
# isort: off
from .local import local_attention
from .ulysses import ulysses_attention
from .fpdt import fpdt_attention
from .ring import Ring  # noqa: F401  (registers)
from .usp import USP, default_ulysses_degree
# isort: on

__all__ = [
    "USP",
    "Strategy",
    "default_ulysses_degree",
    "fpdt_attention",
    "get_strategy",
    "local_attention",
    "multi_rank_names",
    "register",
    "strategy_names",
    "ulysses_attention",
    "unregister",
]
