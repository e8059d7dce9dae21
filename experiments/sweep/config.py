"""Structured-config schema for ``conf/``: a typo or a wrong type fails when Hydra composes.

Top-level keys use the user's words (``seq_len``, ``chunks``, ``gpus``); the groups ``model``,
``parallel`` and ``hardware`` pick presets from ``conf/<group>/``. Every field is documented in
the README ("Config keys").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fpdt_kernels.backend import BACKENDS
from parallel import BACKWARD_ORDERS, strategy_names

from ..training.data import TOKEN_DTYPES
from ..training.precision import DTYPE_TO_PRECISION, PRECISIONS

# Enums built from the names the library defines, so a config can only name what exists.
# The old key: only the values that still name a precision (see training.precision).
DType = enum.Enum("DType", {name: name for name in ("auto", *DTYPE_TO_PRECISION)}, type=str)
Precision = enum.Enum("Precision", {name: name for name in ("auto", *PRECISIONS)}, type=str)
TokenDType = enum.Enum("TokenDType", {name: name for name in TOKEN_DTYPES}, type=str)


Backend = enum.Enum("Backend", {name: name for name in ("auto", *BACKENDS)}, type=str)  # auto: kernels decide
BackwardOrder = enum.Enum("BackwardOrder", {name: name for name in ("auto", *BACKWARD_ORDERS)}, type=str)


@dataclass
class ModelSelect:
    name: str = MISSING  # a preset of models.PRESETS
    n_layers: int | None = None  # override the preset's depth (quick experiments)


@dataclass
class ParallelConf:
    strategy: Strategy = MISSING  # a registered strategy: local, ulysses, fpdt, ring, usp
    offload: bool = False  # fpdt: keep saved attention chunks in host memory
    # fpdt: the backward's outer loop, kv (the paper's), query, or auto (the one moving fewer bytes)
    backward_order: BackwardOrder = BackwardOrder.auto
    ulysses_degree: int | None = None  # usp: ranks per Ulysses group (None: largest <= 8 splitting the KV heads)
    activation_checkpointing: bool = True  # recompute each layer in the backward
    checkpoint_on_host: bool = False  # keep the layer checkpoints in host memory
    chunked_mlp: bool = False  # sequence-tiled MLP with recompute
    chunked_loss: bool = False  # sequence-tiled LM head + cross entropy
    mlp_tile: int | None = None  # tokens per MLP tile (None: chunk/(2P), the paper's ratio)
    loss_tile: int | None = None  # tokens per loss tile (None: chunk/(32P))
    fsdp: bool = False  # shard params/grads/optimizer state over all ranks (FSDP2, ZeRO-3 role)
    offload_states: bool = False  # FSDP: parameters, gradients, optimizer states in host memory (CUDA)


@dataclass
class HardwareConf:
    name: str = MISSING
    peak_tflops: float | None = None  # dense bf16 TFLOP/s per GPU (None: measured, CPU)
    device_memory_gib: float | None = None  # per GPU
    host_memory_gib: float | None = None  # per node
    pcie_gbps: float | None = None  # effective host<->device GB/s per GPU
    nvlink_gbps: float | None = None  # per GPU per direction
    source: str = ""  # where the numbers come from
    dense_efficiency: float | None = None  # planner: achieved fraction of peak for matmuls (fitted)
    attention_efficiency: float | None = None  # planner: the same for attention


@dataclass
class DataConf:
    path: str | None = None  # numpy memmap of token ids (uint16/uint32/int32/int64); None = synthetic
    dtype: TokenDType = TokenDType.uint16  # dtype of the token file
    packing: bool = True  # documents (eos_id, index or doc_len) give attention document boundaries
    eos_id: int | None = None  # token file: this id ends a document
    index: str | None = None  # token file: .npy of document start offsets (instead of eos_id)
    doc_len: int | None = None  # synthetic packed documents: mean length in tokens (seeded lengths)


@dataclass
class SearchConf:
    """``python -m experiments.max_seqlen``: doubling from ``start``, then bisection."""

    start: int = 4096  # first seq_len probed (rounded to the granularity)
    limit: int = 1 << 24  # stop doubling past this many tokens
    resolution: float = 0.1  # stop when the gap between fits and fails is within this fraction
    chunk_tokens: int | None = None  # fpdt: fixed global chunk size C in tokens (chunks = seq_len / C)


@dataclass
class JobConfig:
    """What every job (``run``, ``max_seqlen``, ``train``) trains: model, layout, precision, data."""

    model: ModelSelect = MISSING
    parallel: ParallelConf = MISSING
    hardware: HardwareConf = MISSING
    data: DataConf = field(default_factory=DataConf)
    seq_len: int = 4096  # global tokens per sequence
    chunks: int = 1  # FPDT chunks u (other strategies record 1)
    gpus: int = 1  # ranks in all (GPUs on CUDA, processes on CPU): dp * sp
    sp: int | None = None  # sequence-parallel degree P (None: gpus, one sequence-parallel group)
    batch_size: int = 1  # sequences per data-parallel replica (global batch: batch_size * dp)
    precision: Precision = Precision.auto  # auto: bf16-mixed on CUDA, 32-true on CPU
    dtype: DType = DType.auto  # old name: bf16 = precision bf16-true, fp32 = 32-true
    residual_fp32: bool = False  # bf16-mixed: keep the residual stream (and checkpoints) in fp32
    seed: int = 0
    backend: Backend = Backend.auto
    lr: float = 1e-4
    max_device_memory: float | None = None  # GiB cap on (simulated) device memory per rank
    max_host_memory: float | None = None  # GiB cap on host memory by design per rank (offloads, host checkpoints)
    # CPU: run on fake tensors (shapes and allocations, no values, no compute): the simulated
    # device and host memory of any length in seconds; no step time, loss or MFU
    fake_tensors: bool = False
    timeout_s: float | None = 900.0  # a job still running after this is killed (None: no limit)


@dataclass
class RunConfig(JobConfig):
    search: SearchConf = field(default_factory=SearchConf)
    steps: int = 3  # timed steps
    warmup_steps: int = 1  # untimed steps first (autotuning, allocator warm-up)
    results_csv: str = "results.csv"  # name of the aggregated table in the sweep directory


@dataclass
class CheckpointConf:
    dir: str | None = None  # where checkpoints go (None: <run directory>/checkpoints); resume reads it
    every: int = 0  # save every this many steps (0: only when the run ends)


@dataclass
class TrainConfig(JobConfig):
    """``python -m experiments.train``: the schedule, logging and checkpoints."""

    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    steps: int = 100  # optimizer steps of the schedule (its horizon)
    stop_after: int | None = None  # end this run at that step, schedule unchanged (planned preemption)
    resume: bool = False  # continue from the newest complete checkpoint in checkpoint.dir
    lr_warmup_steps: int = 10  # linear warm-up, then cosine decay to lr * lr_min_ratio at `steps`
    lr_min_ratio: float = 0.1
    grad_clip: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    weight_decay: float = 0.1
    log_every: int = 1  # progress line every this many steps (train.csv has every step)
    timeout_s: float | None = None


def strategy_enum() -> type[enum.Enum]:
    """The strategies registered now (``parallel.strategies``), as the schema's enum."""
    return enum.Enum("Strategy", {name: name for name in strategy_names()}, type=str)


def register_configs() -> None:
    """The schema is the primary config's base; the groups ``model``, ``parallel`` and ``hardware``
    are typed through its fields, so their presets need no schema of their own (and ``--help``
    lists only real presets). ``parallel.strategy`` takes the strategies registered when this
    runs: it runs at import, and again after a strategy is registered at run time."""
    global Strategy
    Strategy = strategy_enum()  # the field's annotation names this global; it is read when stored
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_configs()
