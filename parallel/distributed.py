"""Process groups for sequence parallelism.

One process per GPU: NCCL on CUDA (device ``LOCAL_RANK``), gloo on CPU. Initialise from the
``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``) or
from an explicit rank/world for ``torch.multiprocessing`` workers::

    group = init_distributed()                                    # under torchrun
    group = init_distributed(rank, 4, init_method="file:///tmp/rdzv")   # spawned worker

The attention blocks take an :class:`SPGroup`; ``SPGroup.single()`` runs everything in one
process without ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SPGroup:
    """The sequence-parallel group: ``size`` ranks (``P``), this process is ``rank``.

    ``group`` is the ``torch.distributed`` process group (``None`` when ``size == 1``).
    """

    group: object | None
    rank: int
    size: int

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid group: rank={self.rank}, size={self.size}")

    @classmethod
    def single(cls) -> SPGroup:
        """A one-rank group: every collective is the identity, no process group needed."""
        return cls(None, 0, 1)

    @classmethod
    def world(cls) -> SPGroup:
        """The default (world) process group, or ``single()`` if none is initialised."""
        if not dist.is_initialized():
            return cls.single()
        return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size())

    @classmethod
    def from_ranks(cls, ranks: list[int]) -> SPGroup:
        """A sub-group over global ``ranks``; every process must call it (``dist.new_group``)."""
        pg = dist.new_group(ranks=sorted(ranks))
        me = dist.get_rank()
        if me not in ranks:
            raise ValueError(f"rank {me} is not in the requested group {sorted(ranks)}")
        return cls(pg, sorted(ranks).index(me), len(ranks))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def init_distributed(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    backend: str | None = None,
    init_method: str | None = None,
    timeout_s: float = 600.0,
) -> SPGroup:
    """Initialise ``torch.distributed`` once and return the world :class:`SPGroup`.

    ``rank``/``world_size`` default to ``RANK``/``WORLD_SIZE`` (torchrun); with neither given,
    returns ``SPGroup.single()`` without initialising anything. ``backend`` defaults to NCCL
    when CUDA is available (the device is ``LOCAL_RANK``, or ``rank % device_count``), gloo
    otherwise. ``init_method`` defaults to ``env://``.
    """
    if dist.is_initialized():
        return SPGroup.world()
    rank = _env_int("RANK") if rank is None else rank
    world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    if world_size is None:
        return SPGroup.single()
    if rank is None:
        raise ValueError(f"world_size={world_size} given without a rank; pass rank= or set RANK")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        local_rank = _env_int("LOCAL_RANK")
        torch.cuda.set_device(rank % torch.cuda.device_count() if local_rank is None else local_rank)
    dist.init_process_group(
        backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return SPGroup.world()


def current_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (the one ``init_distributed`` set) or CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_distributed() -> None:
    """Tear down the default process group if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()
