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

from kernels.backend import BACKENDS
from parallel import STRATEGIES

from ..core.dtypes import DTYPE_NAMES

# Enums built from the names the library defines, so a config can only name what exists.
Strategy = enum.Enum("Strategy", {name: name for name in STRATEGIES}, type=str)
DType = enum.Enum("DType", {name: name for name in DTYPE_NAMES}, type=str)  # auto: bf16 on CUDA, fp32 on CPU


Backend = enum.Enum("Backend", {name: name for name in ("auto", *BACKENDS)}, type=str)  # auto: kernels decide


@dataclass
class ModelSelect:
    name: str = MISSING  # a preset of models.PRESETS
    n_layers: int | None = None  # override the preset's depth (quick experiments)


@dataclass
class ParallelConf:
    strategy: Strategy = MISSING
    offload: bool = False  # fpdt: keep saved attention chunks in host memory
    activation_checkpointing: bool = True  # recompute each layer in the backward
    checkpoint_on_host: bool = False  # keep the layer checkpoints in host memory
    chunked_mlp: bool = False  # sequence-tiled MLP with recompute
    chunked_loss: bool = False  # sequence-tiled LM head + cross entropy
    mlp_tile: int | None = None  # tokens per MLP tile (None: chunk/(2P), the paper's ratio)
    loss_tile: int | None = None  # tokens per loss tile (None: chunk/(32P))
    fsdp: bool = False  # shard params/grads/optimizer state over the ranks (FSDP2, ZeRO-3 role)


@dataclass
class HardwareConf:
    name: str = MISSING
    peak_tflops: float | None = None  # dense bf16 TFLOP/s per GPU (None: measured, CPU)
    device_memory_gib: float | None = None  # per GPU
    host_memory_gib: float | None = None  # per node
    pcie_gbps: float | None = None  # effective host<->device GB/s per GPU
    nvlink_gbps: float | None = None  # per GPU per direction
    source: str = ""  # where the numbers come from


@dataclass
class DataConf:
    path: str | None = None  # numpy memmap of token ids (uint16/uint32/int32/int64); None = synthetic
    dtype: str = "uint16"  # dtype of the token file


@dataclass
class SearchConf:
    """``python -m experiments.max_seqlen``: doubling from ``start``, then bisection."""

    start: int = 4096  # first seq_len probed (rounded to the granularity)
    limit: int = 1 << 24  # stop doubling past this many tokens
    resolution: float = 0.1  # stop when the gap between fits and fails is within this fraction
    chunk_tokens: int | None = None  # fpdt: fixed global chunk size C in tokens (chunks = seq_len / C)


@dataclass
class RunConfig:
    model: ModelSelect = MISSING
    parallel: ParallelConf = MISSING
    hardware: HardwareConf = MISSING
    data: DataConf = field(default_factory=DataConf)
    search: SearchConf = field(default_factory=SearchConf)
    seq_len: int = 4096  # global tokens per sequence
    chunks: int = 1  # FPDT chunks u (other strategies record 1)
    gpus: int = 1  # ranks (GPUs on CUDA, processes on CPU) in the sequence-parallel group
    batch_size: int = 1
    steps: int = 3  # timed steps
    warmup_steps: int = 1  # untimed steps first (autotuning, allocator warm-up)
    dtype: DType = DType.auto
    seed: int = 0
    backend: Backend = Backend.auto
    lr: float = 1e-4
    max_device_memory: float | None = None  # GiB cap on (simulated) device memory per rank
    timeout_s: float = 900.0  # a point still running after this is killed and recorded
    results_csv: str = "results.csv"  # name of the aggregated table in the sweep directory


def register_configs() -> None:
    """The schema is the primary config's base; the groups ``model``, ``parallel`` and ``hardware``
    are typed through its fields, so their presets need no schema of their own (and ``--help``
    lists only real presets)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


register_configs()
