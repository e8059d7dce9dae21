"""What a sequence-parallel strategy is to the rest of the project, and the registry of them.

A strategy is one module under ``parallel/strategies/`` holding a :class:`Strategy` subclass
decorated with :func:`register`, plus a ``conf/parallel/<name>.yaml`` preset. The rest of the
project asks the registry (``get_strategy(name)``) for what it needs and never compares strategy
names: the model and :func:`parallel.parallelize` for the attention call and the token layout, the
sweep for the checks and whether chunks count, the planner for the degrees it models (heads split
by all-to-all, sequence split by the ring, the FPDT chunk pipeline), the plots for the colour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..all_to_all import check_heads
from ..distributed import SPGroup

if TYPE_CHECKING:
    from ..attention import AttentionStrategy
    from ..rotary import RotaryEmbedding
    from ..weights import AttentionWeights


class Strategy:
    """A sequence-parallel strategy over ``sp`` ranks.

    Class attributes say what it is; the methods check a setup, give its token layout and run its
    attention block. The planner models a strategy by :meth:`degrees` (how the ``sp`` ranks split
    into a head degree, served by all-to-alls, and a ring degree, served by K/V passed around a
    ring), :attr:`takes_chunks` (the FPDT chunk pipeline) and :attr:`offloads` (its chunks in host
    memory), so a new strategy that is a combination of these needs no planner edit.
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what it does
    use_when: ClassVar[str]  # one line: when to pick it
    color: ClassVar[str]  # the plots' colour for it
    takes_chunks: ClassVar[bool] = False  # the FPDT chunk pipeline: ``chunks`` (u) counts
    offloads: ClassVar[bool] = False  # can keep its saved attention chunks in host memory
    single_process: ClassVar[bool] = False  # runs on exactly one rank (the oracle)
    uses_ulysses_degree: ClassVar[bool] = False  # ``parallel.ulysses_degree`` counts
    baseline: ClassVar[bool] = False  # the one others are compared to in figures (ulysses)

    # --- the degrees --------------------------------------------------------------------------

    def head_degree(self, sp: int, ulysses_degree: int | None, n_heads: int, n_kv_heads: int) -> int:
        """Ranks whose all-to-all splits the heads (Ulysses' degree). Default: all of them."""
        return sp

    def degrees(self, sp: int, ulysses_degree: int | None, n_heads: int, n_kv_heads: int) -> tuple[int, int]:
        """``(head degree U, ring degree R)`` with ``U * R == sp``."""
        u = self.head_degree(sp, ulysses_degree, n_heads, n_kv_heads)
        return u, sp // u

    # --- checks -------------------------------------------------------------------------------

    def check_ranks(self, sp: int | None) -> None:
        """Raise ``ValueError`` unless this strategy runs on ``sp`` ranks (``None``: unknown yet)."""
        if self.single_process and sp not in (None, 1):
            raise ValueError(f"strategy {self.name!r} runs in one process; got {sp} ranks (use {multi_rank_names()})")

    def granule(self, sp: int, chunks: int, ulysses_degree: int | None = None) -> int:
        """``seq_len`` must be a multiple of this (equal pieces for every rank and chunk)."""
        return sp * (chunks if self.takes_chunks else 1)

    def check(self, seq_len: int, sp: int, chunks: int, n_heads: int, n_kv_heads: int,
              ulysses_degree: int | None = None) -> None:  # fmt: skip
        """Every check before a run, in the order a user should fix them: the rank count, the
        head split, then the token layout."""
        for name, value in (("seq_len", seq_len), ("sp", sp), ("chunks", chunks)):
            if value < 1:  # before anything divides by them
                what = " (sequence-parallel ranks)" if name == "sp" else ""
                raise ValueError(f"{name}={value}{what} must be >= 1")
        self.check_ranks(sp)
        if ulysses_degree is not None and not self.uses_ulysses_degree:
            raise ValueError(f"parallel.ulysses_degree={ulysses_degree} is for usp; strategy {self.name!r} "
                             "takes none (leave it null)")  # fmt: skip
        u, _ = self.degrees(sp, ulysses_degree, n_heads, n_kv_heads)
        check_heads(n_heads, n_kv_heads, u)
        g = self.granule(sp, chunks, ulysses_degree)
        if seq_len % g:
            parts = f"sp*chunks={g}" if self.takes_chunks else f"the {self.name} layout's {g} equal pieces"
            raise ValueError(f"seq_len={seq_len} is not divisible by {parts}; use a multiple of {g} (sp: the "
                             "sequence-parallel ranks, gpus unless sp is set)")  # fmt: skip

    # --- layout and attention -----------------------------------------------------------------

    def permutation(self, seq_len: int, sp: int, chunks: int, ulysses_degree: int | None = None) -> torch.Tensor:
        """Global token index of every position in rank-major order (rank 0's tokens first)."""
        raise NotImplementedError

    def subgroups(self, group: SPGroup, ulysses_degree: int | None) -> tuple:
        """Process groups the attention needs besides ``group`` (created on every rank at setup)."""
        return ()

    def attend(
        self,
        strategy: AttentionStrategy,
        x: torch.Tensor,
        w: AttentionWeights,
        rope: RotaryEmbedding | None,
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        """This rank's attention block: ``[B, S/P, h]`` in the layout -> ``[B, S/P, h]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


_REGISTRY: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy to the registry under ``cls.name`` (a duplicate name raises)."""
    for attr in ("name", "summary", "use_when", "color"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"strategy class {cls.__name__} must set the class attribute {attr!r} (a str)")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"a strategy named {cls.name!r} is already registered ({type(_REGISTRY[cls.name]).__name__})")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a strategy (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def strategy_names() -> tuple[str, ...]:
    """The registered strategies, in registration order."""
    return tuple(_REGISTRY)


def multi_rank_names() -> tuple[str, ...]:
    return tuple(n for n, s in _REGISTRY.items() if not s.single_process)


def get_strategy(name: str | Strategy) -> Strategy:
    """The registered strategy called ``name`` (``ValueError`` naming the choices otherwise)."""
    if isinstance(name, Strategy):
        return name
    try:
        return _REGISTRY[str(name)]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; use one of {strategy_names()}") from None
