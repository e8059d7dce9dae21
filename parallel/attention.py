"""How a model's attention runs: :class:`AttentionStrategy`, a registered strategy (see
:mod:`parallel.strategies`) plus its settings and process groups.

Each strategy's block maps this rank's hidden states ``[B, S/P, h]`` to ``[B, S/P, h]``
(``local``: the whole ``[B, S, h]``) using :class:`~parallel.weights.AttentionWeights` and an
optional :class:`~parallel.rotary.RotaryEmbedding` applied at global positions ``0..S-1``. Tokens
are in the strategy's layout (:meth:`AttentionStrategy.shard`): contiguous ``S/P`` slices for
``ulysses``, the FPDT permutation for ``fpdt``, the zigzag for ``ring`` and ``usp``.

    strategy = AttentionStrategy("fpdt", group, chunks=4, offload=True)
    y_local = strategy(strategy.shard(x_full), weights, rope)    # this rank's part
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .distributed import SPGroup
from .host_store import HostStore
from .rotary import RotaryEmbedding
from .schedule import check_backward_order
from .strategies import fpdt_attention, get_strategy, local_attention, strategy_names, ulysses_attention
from .strategies.base import Strategy
from .weights import AttentionWeights

# The strategies registered when the package was imported (``strategies.strategy_names()`` is live).
STRATEGIES = strategy_names()

__all__ = [
    "STRATEGIES",
    "AttentionStrategy",
    "check_setup",
    "check_strategy",
    "fpdt_attention",
    "local_attention",
    "ulysses_attention",
]


def check_strategy(kind: str, world: int | None = None) -> None:
    """Raise ``ValueError`` unless ``kind`` names a registered strategy that runs on ``world``
    ranks (``None``: check the name only). ``local`` is the single-process oracle."""
    get_strategy(kind).check_ranks(world)


def check_setup(kind: str, seq_len: int, world: int, chunks: int, n_heads: int, n_kv_heads: int,
                ulysses_degree: int | None = None) -> None:  # fmt: skip
    """Every check a strategy makes before it runs, in the order a user should fix them: the
    strategy itself, the head split over its all-to-all ranks, then the token layout (``seq_len``
    in equal pieces for every rank and, for a strategy that takes them, every chunk)."""
    spec = get_strategy(kind)
    spec.check(seq_len, world, chunks if spec.takes_chunks else 1, n_heads, n_kv_heads, ulysses_degree)


@dataclass(frozen=True)
class AttentionStrategy:
    """How a model's attention runs: ``kind`` (a registered strategy's name) plus its settings.

    ``chunks``, ``offload`` and ``backward_order`` (the backward's outer loop: ``kv``, ``query`` or
    ``auto``, see :func:`parallel.fpdt_attention`) count for a strategy that takes chunks
    (``fpdt``); ``ulysses_degree`` for ``usp``. Call it as ``strategy(x, weights, rope)``; ``shard``/``positions``
    give the token layout the rest of the model (embeddings, labels, positions) must use.

    ``subgroups``: the process groups a strategy needs besides ``group`` (``usp``: its Ulysses and
    ring groups), as :func:`parallel.parallelize` takes them from the mesh. Left empty, they are
    created at the first call, which every rank of the world must then make together, each with
    its own ``group`` (``torch.distributed.new_group`` is collective over the world).
    """

    kind: str = "local"
    group: SPGroup = SPGroup.single()
    chunks: int = 1
    offload: bool = True
    causal: bool = True
    softmax_scale: float | None = None
    store: HostStore | None = None
    ulysses_degree: int | None = None
    backward_order: str = "auto"
    subgroups: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        spec = self.spec
        spec.check_ranks(self.group.size)
        if self.chunks < 1 or (not spec.takes_chunks and self.chunks != 1):
            takers = " or ".join(repr(n) for n in strategy_names() if get_strategy(n).takes_chunks)
            raise ValueError(f"chunks={self.chunks}: only {takers} takes chunks > 1 (and chunks >= 1)")
        if check_backward_order(self.backward_order) != "auto" and not spec.takes_chunks:
            raise ValueError(
                f"backward_order={self.backward_order!r} is for a chunk pipeline (fpdt), not {self.kind!r}"
            )
        if self.ulysses_degree is not None and not spec.uses_ulysses_degree:
            raise ValueError(f"ulysses_degree={self.ulysses_degree} is for usp, not {self.kind!r}")
        if spec.uses_ulysses_degree:
            if self.ulysses_degree is None:
                raise ValueError(f"{self.kind!r} needs ulysses_degree (parallel.parallelize resolves the default "
                                 "from the model's heads)")  # fmt: skip
            spec.head_degree(self.group.size, self.ulysses_degree, 1, 1)  # U must divide the group

    def process_groups(self) -> tuple:
        """The strategy's own process groups (see ``subgroups``), created once when first needed."""
        if not self.subgroups:
            groups = self.spec.subgroups(self.group, self.ulysses_degree)
            object.__setattr__(self, "subgroups", groups)  # a cache: frozen for the settings, not for this
        return self.subgroups

    @property
    def spec(self) -> Strategy:
        """The registered strategy."""
        return get_strategy(self.kind)

    @property
    def layout_chunks(self) -> int:
        return self.chunks if self.spec.takes_chunks else 1

    def check(self, seq_len: int, n_heads: int, n_kv_heads: int) -> None:
        """Raise the documented ``ValueError`` if this strategy cannot run this shape."""
        self.spec.check(seq_len, self.group.size, self.layout_chunks, n_heads, n_kv_heads, self.ulysses_degree)

    def permutation(self, seq_len: int) -> torch.Tensor:
        """Global token index of every position, rank-major (``[S]`` int64)."""
        return self.spec.permutation(seq_len, self.group.size, self.layout_chunks, self.ulysses_degree)

    def positions(self, seq_len: int) -> torch.Tensor:
        """Global positions of this rank's tokens (``[S/P]``)."""
        n = seq_len // self.group.size
        return self.permutation(seq_len)[self.group.rank * n : (self.group.rank + 1) * n]

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of a full-length tensor (inputs, labels, ...)."""
        return x.index_select(dim, self.positions(x.shape[dim]).to(x.device))

    def unshard(self, shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The full-length tensor from every rank's part (in rank order)."""
        full = torch.cat(shards, dim=dim)
        perm = self.permutation(full.shape[dim]).to(full.device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return full.index_select(dim, inv)

    def __call__(
        self,
        x: torch.Tensor,
        w: AttentionWeights,
        rope: RotaryEmbedding | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ):
        return self.spec.attend(self, x, w, rope, cu_seqlens)
