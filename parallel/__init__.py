"""Sequence parallelism: Ulysses all-to-alls, the FPDT chunk pipeline with host offload, ring
attention and Ulysses x ring (USP), each a registered strategy (:mod:`parallel.strategies`).

Public API::

    from parallel import (
        init_distributed, init_mesh, SPGroup, Mesh,                 # process groups
        AttentionWeights, RotaryEmbedding, AttentionStrategy,       # blocks
        local_attention, ulysses_attention, fpdt_attention, ring_attention, usp_attention,
        Strategy, register, get_strategy, strategy_names,           # the registry
        HostStore, Timeline, forward_schedule, backward_schedule, check_schedule,
        cheaper_backward_order,                                     # the backward's loop order
        parallelize, shard_batch,                                   # apply to a model
    )
"""

from .all_to_all import check_heads, head_to_seq, kv_seq_to_head, seq_to_head
from .attention import (
    STRATEGIES,
    AttentionStrategy,
    check_setup,
    check_strategy,
    fpdt_attention,
    local_attention,
    ulysses_attention,
)
from .distributed import Mesh, SPGroup, check_mesh, current_device, destroy_distributed, init_distributed, init_mesh
from .executor import Timeline, run_schedule
from .host_store import HostStore, default_host_store, host_allocation, saved_tensors_on_host
from .layout import (
    check_cu_seqlens,
    check_layout,
    document_positions,
    inverse_permutation,
    local_positions,
    permutation,
    shard,
    unshard,
)
from .parallelize import parallelize, shard_batch
from .ring import ring_attention, ring_permutation, split_sp_group, usp_attention
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_backward
from .schedule import (
    BACKWARD_ORDERS,
    Kind,
    Op,
    Schedule,
    ScheduleError,
    Stream,
    backward_schedule,
    cheaper_backward_order,
    check_backward_order,
    check_schedule,
    copy_counts,
    document_pairs,
    forward_schedule,
)
from .strategies import Strategy, get_strategy, register, strategy_names, unregister
from .weights import AttentionWeights

__all__ = [
    "BACKWARD_ORDERS",
    "STRATEGIES",
    "AttentionStrategy",
    "Strategy",
    "get_strategy",
    "register",
    "ring_attention",
    "ring_permutation",
    "split_sp_group",
    "strategy_names",
    "unregister",
    "usp_attention",
    "AttentionWeights",
    "HostStore",
    "Kind",
    "Mesh",
    "Op",
    "RotaryEmbedding",
    "SPGroup",
    "Schedule",
    "ScheduleError",
    "Stream",
    "Timeline",
    "apply_rotary",
    "check_mesh",
    "check_setup",
    "check_strategy",
    "apply_rotary_backward",
    "backward_schedule",
    "cheaper_backward_order",
    "check_backward_order",
    "copy_counts",
    "check_heads",
    "check_cu_seqlens",
    "check_layout",
    "document_pairs",
    "document_positions",
    "check_schedule",
    "current_device",
    "default_host_store",
    "destroy_distributed",
    "forward_schedule",
    "fpdt_attention",
    "head_to_seq",
    "host_allocation",
    "init_distributed",
    "init_mesh",
    "inverse_permutation",
    "kv_seq_to_head",
    "local_attention",
    "local_positions",
    "parallelize",
    "permutation",
    "run_schedule",
    "saved_tensors_on_host",
    "seq_to_head",
    "shard_batch",
    "shard",
    "ulysses_attention",
    "unshard",
]
