"""One rank's model, optimizer and training step, as ``experiments.run`` and ``experiments.train``
build them from a resolved configuration (a *point*: :class:`experiments.core.point.Point`, resolved
by ``experiments.sweep.points``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

import fpdt_kernels
from models import Transformer, get_config
from parallel import Mesh, init_distributed, init_mesh, parallelize, shard_batch
from parallel.tensors import has_values

from ..core.point import Point
from .precision import Precision, resolve_precision

# How long a collective may wait when the job has no timeout of its own (timeout_s=None).
COLLECTIVE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Rank:
    """What one rank of a job runs on: its place in the mesh, its device, the precision."""

    mesh: Mesh
    device: torch.device
    precision: Precision

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def setup_rank(point: Point) -> Rank:
    """Join the job's process group and ``(dp, sp)`` mesh, pick the device, the attention backend
    and the precision (every rank of ``run`` and ``train`` starts here)."""
    cuda = uses_cuda(point)
    init_distributed(backend=None if cuda else "gloo", timeout_s=point.timeout_s or COLLECTIVE_TIMEOUT_S)
    mesh = init_mesh(point.sp, ulysses=point.ulysses_degree)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        # Ranks share the cores: without this each would start a full thread pool.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // mesh.world.size))
    fpdt_kernels.set_backend(point.backend)
    return Rank(mesh, device, resolve_precision(point.precision, cuda))


def uses_cuda(point: Point) -> bool:
    """Whether the point's ranks run on GPUs: when CUDA is there, unless the point runs on fake
    tensors (a simulated device on CPU, whatever the machine has)."""
    return torch.cuda.is_available() and not point.fake_tensors


def model_config(point: Point, **overrides):
    """The model a point trains: its preset at the point's depth, with its switches (tiles,
    checkpointing) and ``overrides``."""
    switches = dict(
        chunked_mlp=point.chunked_mlp,
        chunked_loss=point.chunked_loss,
        mlp_tile=point.mlp_tile,
        loss_tile=point.loss_tile,
        checkpoint=point.activation_checkpointing,
        checkpoint_on_host=point.checkpoint_on_host,
        residual_fp32=point.residual_fp32,
    )
    if point.n_layers:
        switches["n_layers"] = point.n_layers
    return get_config(point.model, **{**switches, **overrides})


def build_model(point: Point, mesh: Mesh, device: torch.device, precision: Precision) -> torch.nn.Module:
    """The parallelized model, its parameters in the precision's storage dtype, on ``device``.

    Every rank builds the same initial weights (``parallelize`` also broadcasts them from rank 0).
    """
    torch.manual_seed(point.seed)
    model = Transformer(model_config(point))
    if point.fake_tensors:
        _cast_fake(model, device, precision.param_dtype)
    else:
        model.to(device=device, dtype=precision.param_dtype)
    fsdp = point.fsdp
    return parallelize(
        model,
        point.strategy,
        mesh=mesh,
        chunks=point.chunks,
        offload=point.offload,
        fsdp=fsdp,
        mixed_precision=precision.fsdp_mixed_precision() if fsdp else None,
        offload_states=point.offload_states,
        ulysses_degree=point.ulysses_degree,
        backward_order=point.backward_order,
    )


def _cast_fake(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``model.to(device=, dtype=)`` for a model of fake tensors: ``Module.to`` swaps fake parameters
    in place, which the fake mode's own references to them forbid, so each parameter (and
    floating buffer) is replaced by a converted one instead; a parameter shared by two modules
    (tied weights) stays shared."""
    done: dict[int, torch.Tensor] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(cast(p.detach()), requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = cast(b)


def build_optimizer(model: torch.nn.Module, point: Point) -> torch.optim.Optimizer:
    """AdamW over the parameters (fp32 master weights under mixed precision); moments in their dtype.
    ``weight_decay`` defaults to AdamW's own 0.01 (``experiments.run`` points do not set it)."""
    return torch.optim.AdamW(model.parameters(), lr=point.lr, weight_decay=point.weight_decay)


def forward_backward(model, point: Point, mesh: Mesh, precision: Precision, device: torch.device,
                     tokens: torch.Tensor, labels: torch.Tensor,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Shard this replica's ``[B, S]`` batch (and its documents' ``cu_seqlens``, if packed) over the
    sequence-parallel group, run forward and backward; returns the detached loss (the mean over
    every token of the global batch)."""
    tokens, labels, positions = shard_batch(
        tokens,
        labels,
        point.strategy,
        chunks=point.chunks,
        group=mesh.sp,
        cu_seqlens=cu_seqlens,
        ulysses_degree=point.ulysses_degree,
    )
    tokens, labels, positions = (t.to(device) for t in (tokens, labels, positions))
    packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens.to(device)}
    with precision.autocast(device, point.fsdp):
        loss = model(tokens, labels=labels, positions=positions, **packed)
    loss.backward()
    return loss.detach()


def clip_and_step(model, optimizer, grad_clip: float | None) -> float:
    """Clip the global gradient norm to ``grad_clip`` (if set), step, zero the gradients; returns
    the norm before clipping (over all parameters, whole tensors, whatever the sharding)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm) if has_values(norm) else math.nan
