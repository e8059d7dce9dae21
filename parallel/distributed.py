"""Process groups for sequence parallelism.

One process per GPU: NCCL on CUDA (device ``LOCAL_RANK``), gloo on CPU. Initialise from the
``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``) or
from an explicit rank/world for ``torch.multiprocessing`` workers::

    group = init_distributed()                                    # under torchrun
    group = init_distributed(rank, 4, init_method="file:///tmp/rdzv")   # spawned worker

The attention blocks take an :class:`SPGroup`; ``SPGroup.single()`` runs everything in one
process without ``torch.distributed``. Data x sequence parallelism: :func:`init_mesh` splits the
world into ``dp`` data-parallel replicas of ``sp`` sequence-parallel ranks (:class:`Mesh`).
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


@dataclass(frozen=True)
class Mesh:
    """``world = dp * sp`` ranks: ``dp`` data-parallel groups, each of ``sp`` sequence-parallel ranks.

    Global rank ``r`` is sequence rank ``r % sp`` of data-parallel replica ``r // sp``: a
    sequence-parallel group is ``sp`` consecutive ranks, so its all-to-alls stay inside a node
    when ``sp`` divides the GPUs per node. ``sp`` is this rank's sequence-parallel group, ``dp``
    the group of ranks with the same sequence rank (one per replica), ``world`` everyone.
    ``device_mesh`` is the ``(dp, sp)`` :class:`~torch.distributed.device_mesh.DeviceMesh`
    (``None`` on one process); with a Ulysses degree ``U`` (``usp``) it is ``(dp, ring, ulysses)``,
    sequence rank ``ring * U + ulysses``, and ``ulysses``/``ring`` are this rank's groups along the
    two axes of ``sp`` (``None`` without).
    """

    sp: SPGroup
    dp: SPGroup
    world: SPGroup
    device_mesh: object | None = None
    ulysses: SPGroup | None = None
    ring: SPGroup | None = None

    @classmethod
    def single(cls) -> Mesh:
        one = SPGroup.single()
        return cls(one, one, one)

    @property
    def replica(self) -> int:
        """This rank's data-parallel replica (which sequences it trains on)."""
        return self.dp.rank


def check_mesh(world: int, sp: int) -> None:
    """Raise ``ValueError`` unless ``world`` ranks split into data-parallel groups of ``sp``."""
    if sp < 1 or world % sp:
        raise ValueError(f"sp={sp} must divide gpus={world} (gpus = dp * sp); use sp in {divisors(world)}")


def check_ulysses_degree(sp: int, ulysses: int) -> None:
    """Raise ``ValueError`` unless ``ulysses`` (``parallel.ulysses_degree``, U) splits the ``sp``
    ranks of one sequence into groups of U: ``sp = U * R`` with ``R`` ring positions."""
    if ulysses < 1 or sp % ulysses:
        raise ValueError(
            f"parallel.ulysses_degree={ulysses} must divide the sp={sp} sequence-parallel ranks "
            f"(sp = ulysses_degree * ring); use one of {divisors(sp)}"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def init_mesh(sp: int | None = None, ulysses: int | None = None) -> Mesh:
    """The ``(dp, sp)`` mesh over the initialised world (``sp`` defaults to the whole world: one
    sequence-parallel group, ``dp = 1``); with ``ulysses`` (``U``, dividing ``sp``) the ``sp`` axis
    is itself split into ``(ring, ulysses)``: groups of ``U`` consecutive ranks. Every rank must
    call it. Without ``torch.distributed`` (one process) returns :meth:`Mesh.single`."""
    for name, value in (("sp", sp), ("ulysses", ulysses)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be >= 1 (or None)")
    if not dist.is_initialized():
        wanted = [f"{name}={value} needs {value} ranks" for name, value in (("sp", sp), ("ulysses", ulysses))
                  if value not in (None, 1)]  # fmt: skip
        if wanted:
            raise ValueError(f"{'; '.join(wanted)}; torch.distributed is not initialised (one process): start "
                             "the ranks with torchrun, or call init_distributed first")  # fmt: skip
        one = SPGroup.single()
        return Mesh(one, one, one) if ulysses is None else Mesh(one, one, one, ulysses=one, ring=one)
    world = dist.get_world_size()
    sp = world if sp is None else sp
    check_mesh(world, sp)
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if ulysses is None:
        mesh = init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    else:
        check_ulysses_degree(sp, ulysses)
        mesh = init_device_mesh(device_type, (world // sp, sp // ulysses, ulysses),
                                mesh_dim_names=("dp", "ring", "ulysses"))  # fmt: skip
    rank = dist.get_rank()

    def group(sub) -> SPGroup:
        size = sub.size()
        if size == 1:
            return SPGroup.single()
        return SPGroup(sub.get_group(), sub.get_local_rank(), size)

    world_group = SPGroup(dist.group.WORLD, rank, world)
    if ulysses is None:
        return Mesh(sp=group(mesh["sp"]), dp=group(mesh["dp"]), world=world_group, device_mesh=mesh)
    sp_group = group(mesh["ring", "ulysses"]._flatten("sp"))  # sequence rank ring * U + ulysses
    return Mesh(sp=sp_group, dp=group(mesh["dp"]), world=world_group, device_mesh=mesh,
                ulysses=group(mesh["ulysses"]), ring=group(mesh["ring"]))  # fmt: skip


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

    ``rank``/``world_size`` default to ``RANK``/``WORLD_SIZE`` (torchrun); without a world size,
    returns ``SPGroup.single()`` without initialising anything (a rank alone is ignored).
    ``backend`` defaults to NCCL when CUDA is available (the device is ``LOCAL_RANK``, or
    ``rank % device_count``), gloo otherwise. ``init_method`` defaults to ``env://``.
    ``timeout_s``: the process group's timeout for its collectives.
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
