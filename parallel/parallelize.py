"""Apply a sequence-parallel strategy to a model from outside, and shard a batch to match.

    group = init_distributed()
    model = parallelize(Transformer(cfg), "fpdt", group=group, chunks=4, offload=True, fsdp=True)
    tokens, labels, positions = shard_batch(tokens, labels, "fpdt", chunks=4, group=group)
    loss = model(tokens, labels=labels, positions=positions)   # same value on every rank
    loss.backward()

    # data x sequence parallel: dp replicas of sp ranks, each replica on its own sequences
    mesh = init_mesh(sp=2)
    model = parallelize(Transformer(cfg), "fpdt", mesh=mesh, chunks=4, fsdp=True, mixed_precision=torch.bfloat16)

The model is duck-typed (``parallel`` never imports ``models``): every submodule whose
``strategy`` attribute is an :class:`AttentionStrategy` gets the new one, so parameter names and
checkpoints do not change; the model's ``sum_across_ranks`` hook gets a differentiable
all-reduce (sum) over all ranks, so its loss is the mean over every token of every rank (all
replicas); ``blocks`` (if present) are the FSDP units.

Gradients. Every rank's loss is that global mean, and its backward produces this rank's share of
the gradient (the all-reduce's backward is the identity; the all-to-alls carry gradients between
the ranks of a sequence-parallel group). The shares are summed over all ranks exactly once, so
each rank ends with the gradient a single process would compute on the whole global batch (with
equal tokens per replica, that is the data-parallel average of the replicas' gradients):

- ``fsdp=False``: each parameter's gradient is all-reduced (SUM) over all ranks by a hook that
  runs as soon as it is computed, so the replicated weights stay in step (the hook reduces each
  backward's contribution, so gradient accumulation over several backwards works). A parameter
  frozen at ``parallelize`` and unfrozen later gets its hook at the next forward.
- ``fsdp=True``: FSDP2 (``fully_shard``) over all ranks (the ``dp x sp`` mesh flattened, as
  torchtitan's ``dp_shard_cp``) reduce-scatters with SUM (divide factor 1), so each rank holds
  its shard of the gradient (``p.grad.full_tensor()`` is the whole of it) and the optimizer state
  is sharded likewise. ``mixed_precision=torch.bfloat16`` keeps the sharded parameters in their
  dtype (fp32 master weights) and computes with bf16 copies, reducing gradients in fp32
  (``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``); ``offload_states=True`` keeps
  parameters, gradients and optimizer states in host memory (``CPUOffloadPolicy``).

Without FSDP, mixed precision is the caller's ``torch.autocast`` around the forward: the
parameters stay fp32 and are the master weights (the custom autograd Functions compute their
backward in the forward's precision: the FPDT and ring ones in the dtype their forward computed
in, with autocast off; others re-enter the forward's autocast state, see :mod:`parallel.amp`).

Parameters and buffers are broadcast from global rank 0 first, so every rank starts from the
same weights.
"""

from __future__ import annotations

import numbers
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from .all_to_all import check_heads
from .attention import AttentionStrategy
from .distributed import Mesh, SPGroup
from .layout import document_positions
from .strategies import get_strategy
from .tensors import eager_under_compile, real_tensors


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in the forward; identity in the backward (each rank seeds its share)."""

    @staticmethod
    def forward(ctx, t, group):
        summed = t.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group.group)
        # The output is a tensor this forward did not mutate: torch 2.11's torch.compile gives a
        # Function's output that was changed in place a zero gradient. The loss sums are scalars.
        return summed.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumAcrossRanks:
    def __init__(self, group: SPGroup):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t, self.group)

    def __repr__(self) -> str:
        return f"SumAcrossRanks(P={self.group.size})"


def check_chunks(chunks) -> None:
    """Raise unless ``chunks`` (FPDT's ``u``, as :func:`parallelize` and :func:`shard_batch` take it)
    is an int >= 1: ``TypeError`` for another type (a bool included), ``ValueError`` below 1."""
    if isinstance(chunks, bool) or not isinstance(chunks, numbers.Integral):
        raise TypeError(f"chunks={chunks!r} ({type(chunks).__name__}) must be an int >= 1: the chunks per rank (u) "
                        "of 'fpdt', 1 for no chunking and for the other strategies")  # fmt: skip
    if chunks < 1:
        raise ValueError(f"chunks={chunks} must be an int >= 1: the chunks per rank (u) of 'fpdt', 1 for no chunking "
                         "and for the other strategies")  # fmt: skip


def _check_token_tensor(name: str, t) -> None:
    if isinstance(t, torch.Tensor):
        if not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            return
        got = f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    else:
        got = f"{type(t).__name__} {t!r}" if len(repr(t)) <= 60 else f"a {type(t).__name__}"
    raise TypeError(f"{name} must be an integer tensor [B, S] of token ids (e.g. torch.tensor(..., dtype=torch.long)), "
                    f"got {got}")  # fmt: skip


def _make_strategy(
    strategy,
    group: SPGroup | None,
    chunks: int,
    offload: bool,
    ulysses_degree: int | None = None,
    heads: tuple[int, int] | None = None,
    mesh: Mesh | None = None,
    backward_order: str = "auto",
) -> AttentionStrategy:
    """The :class:`AttentionStrategy` a name and its settings stand for. ``heads`` (``H, Hkv``) pick
    the default Ulysses degree of a strategy that takes one; ``mesh`` gives its process groups."""
    if isinstance(strategy, AttentionStrategy):
        return strategy
    spec = get_strategy(strategy)
    spec.check_ranks(None if group is None else group.size)
    if not spec.takes_chunks:
        # Ignored rather than refused, so one call can loop over strategies with fpdt's settings;
        # the warning says so, since a user who asked for offload would otherwise not know.
        ignored = [f"{k}={v!r}" for k, v, default in
                   (("chunks", chunks, 1), ("offload", offload, False), ("backward_order", backward_order, "auto"))
                   if v != default]  # fmt: skip
        if ignored:
            warnings.warn(f"{', '.join(ignored)} apply to fpdt only; {spec.name!r} runs without them", stacklevel=3)
    if spec.single_process:
        return AttentionStrategy(spec.name)
    group = SPGroup.world() if group is None else group
    if not spec.takes_chunks:
        chunks, offload, backward_order = 1, False, "auto"
    subgroups = ()
    if spec.uses_ulysses_degree:
        if ulysses_degree is None:
            if heads is None:
                raise ValueError(f"strategy {spec.name!r} needs ulysses_degree= here (no model heads to pick it from)")
            ulysses_degree = spec.head_degree(group.size, None, *heads)
        if mesh is not None and mesh.ulysses is not None:
            if mesh.ulysses.size != ulysses_degree:
                raise ValueError(f"ulysses_degree={ulysses_degree} but the mesh's Ulysses axis has {mesh.ulysses.size} "
                                 f"ranks; build it with init_mesh(sp, ulysses={ulysses_degree})")  # fmt: skip
            subgroups = (mesh.ulysses, mesh.ring)
        elif mesh is not None and mesh.dp.size > 1:
            raise ValueError(f"{spec.name!r} with data parallelism needs its groups from the mesh: "
                             f"init_mesh(sp, ulysses={ulysses_degree})")  # fmt: skip
    elif ulysses_degree is not None:
        raise ValueError(f"ulysses_degree={ulysses_degree} is for usp, not {spec.name!r}")
    return AttentionStrategy(spec.name, group, chunks=chunks, offload=offload, ulysses_degree=ulysses_degree,
                             subgroups=subgroups, backward_order=backward_order)  # fmt: skip


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    # vars(): a class property named ``strategy`` (e.g. on the model) is not a slot to fill.
    return [m for m in model.modules() if isinstance(vars(m).get("strategy"), AttentionStrategy)]


def _allreduce_grad_hook(group: SPGroup):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group.group)
        return grad

    return hook


def _reduce_gradients(model: nn.Module, world: SPGroup) -> None:
    """Sum each trainable parameter's gradient over ``world`` as it is produced. A parameter
    frozen now and trained later (staged unfreezing) gets its hook at the first forward that
    finds it trainable: without one, each rank would step on its own share of the gradient."""
    hooked: set[int] = set()

    @eager_under_compile  # registers hooks: Dynamo would trace (and guard on) it otherwise
    def hook_trainable(*_) -> None:
        for p in model.parameters():
            if p.requires_grad and id(p) not in hooked:
                p.register_hook(_allreduce_grad_hook(world))
                hooked.add(id(p))

    hook_trainable()
    model.register_forward_pre_hook(hook_trainable)


def _broadcast_state(model: nn.Module, group: SPGroup) -> None:
    src = dist.get_global_rank(group.group, 0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=src, group=group.group)


def _fully_shard(model: nn.Module, world: SPGroup, mixed_precision: torch.dtype | None, offload_states: bool):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    device_type = next(model.parameters()).device.type
    with real_tensors():  # the mesh reads its rank table back: real, also in a fake run
        mesh = DeviceMesh.from_group(world.group if world.group is not None else dist.group.WORLD, device_type)
    kwargs = {}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    if offload_states:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    units = [*getattr(model, "blocks", []), model]
    for unit in units:
        fully_shard(unit, mesh=mesh, **kwargs)
        unit.set_gradient_divide_factor(1.0)  # SUM: shards of the single-process gradient
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def parallelize(
    model: nn.Module,
    strategy: str | AttentionStrategy,
    *,
    group: SPGroup | None = None,
    chunks: int = 1,
    offload: bool = False,
    fsdp: bool = False,
    mesh: Mesh | None = None,
    mixed_precision: torch.dtype | None = None,
    offload_states: bool = False,
    ulysses_degree: int | None = None,
    backward_order: str = "auto",
) -> nn.Module:
    """Run ``model``'s attention with ``strategy`` (a registered name: ``local | ulysses | fpdt |
    ring | usp``) over ``group``.

    ``group`` (the sequence-parallel group) defaults to the world group; with ``mesh`` (see
    :func:`~parallel.distributed.init_mesh`) the sequence-parallel group is ``mesh.sp`` and the
    loss and gradients are reduced over all ``dp * sp`` ranks. ``chunks`` (``u``), ``offload`` and
    ``backward_order`` (``kv``, ``query`` or ``auto``: see :func:`~parallel.fpdt_attention`) apply
    to ``fpdt``; ``ulysses_degree`` to ``usp`` (default: the largest degree up to 8 that splits the
    query and K/V heads; with a mesh, ``init_mesh(sp, ulysses=...)`` gives its groups);
    an :class:`AttentionStrategy` instance is used as it is. ``fsdp=True``
    shards parameters, gradients and optimizer state over all ranks (FSDP2; gloo on CPU), with
    ``mixed_precision`` (compute dtype over master weights in the parameters' dtype) and
    ``offload_states`` (model states in host memory). Modifies ``model`` in place and returns
    it; call once per model, before building the optimizer. See the module docstring for how
    gradients are reduced.
    """
    check_chunks(chunks)
    if getattr(model, "_parallelized", False):
        raise ValueError("this model is already parallelized; build a fresh model to change the strategy")
    attn = _attention_modules(model)
    if not attn or not hasattr(model, "sum_across_ranks"):
        raise ValueError(
            "parallelize needs a model with attention modules holding a `strategy` (AttentionStrategy) and a "
            "`sum_across_ranks` loss hook, such as models.Transformer"
        )
    if mesh is not None and group is not None:
        raise ValueError("pass the sequence-parallel group or a mesh (whose sp group it is), not both")
    if (mixed_precision is not None or offload_states) and not fsdp:
        raise ValueError(
            "mixed_precision and offload_states are FSDP policies (fsdp=True); without FSDP, mixed precision is "
            "torch.autocast around the forward over fp32 parameters"
        )
    if fsdp and not dist.is_initialized():
        raise ValueError("fsdp=True needs torch.distributed initialised (a process group, even of one rank)")
    heads = (attn[0].n_heads, attn[0].n_kv_heads)
    strat = _make_strategy(strategy, mesh.sp if mesh is not None else group, chunks, offload, ulysses_degree,
                           heads, mesh, backward_order)  # fmt: skip
    world = mesh.world if mesh is not None else strat.group
    spec = strat.spec
    for m in attn:
        u, _ = spec.degrees(strat.group.size, strat.ulysses_degree, m.n_heads, m.n_kv_heads)
        check_heads(m.n_heads, m.n_kv_heads, u)
    strat.process_groups()  # now, on every rank together, not inside the first forward
    for m in attn:
        m.strategy = strat
    model._parallelized = True
    if world.size > 1:
        model.sum_across_ranks = _SumAcrossRanks(world)
        _broadcast_state(model, world)
    if fsdp:
        return _fully_shard(model, world, mixed_precision, offload_states)
    if world.size > 1:
        _reduce_gradients(model, world)
    return model


def shard_batch(
    tokens: torch.Tensor,
    labels: torch.Tensor | None,
    strategy: str | AttentionStrategy,
    *,
    chunks: int = 1,
    group: SPGroup | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ulysses_degree: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """This rank's share of a full batch ``tokens, labels [B, S]`` in the strategy's layout.

    Returns ``(tokens [B, S/P], labels [B, S/P] or None, positions)``: contiguous slices for
    ``ulysses``, the FPDT chunk permutation for ``fpdt`` (``chunks`` = ``u``), everything for
    ``local``, the zigzag for ``ring`` and ``usp`` (``ulysses_degree``: as given to
    :func:`parallelize`, the model's ``strategy`` has it). ``positions`` are the global positions
    of the local tokens (``[S/P]``), or, for packed documents (``cu_seqlens``: int32 offsets over
    the flattened ``[B * S]`` tokens, every row boundary a document boundary), each local token's
    position inside its document (``[B, S/P]``: RoPE restarts at every document).

    Pass the parallelized model's own ``model.strategy`` (it carries ``chunks`` and the Ulysses
    degree), and the returned ``positions`` to the model: a layout built for other settings than
    the model's is then caught by the model instead of training on permuted tokens.
    """
    _check_token_tensor("tokens", tokens)
    if labels is not None:
        _check_token_tensor("labels", labels)
    check_chunks(chunks)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, S], got {tuple(tokens.shape)}")
    if labels is not None and labels.shape != tokens.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of tokens {tuple(tokens.shape)}")
    strat = _make_strategy(strategy, group, chunks, offload=False, ulysses_degree=ulysses_degree)
    B, seq_len = tokens.shape
    local_labels = None if labels is None else strat.shard(labels, 1)
    if cu_seqlens is None:
        positions = strat.positions(seq_len)
    else:
        positions = strat.shard(document_positions(cu_seqlens, B, seq_len), 1)
    return strat.shard(tokens, 1), local_labels, positions.to(tokens.device)
