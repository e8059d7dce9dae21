"""A point: the effective configuration of one job (``experiments.run``, ``experiments.train``),
resolved once from the Hydra config (``experiments.sweep.points.resolve_point``) and read by every
rank. Its fields are the configuration columns of ``results.csv``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    """What one measured job runs. ``resolve_point`` sets every field from the config; the
    defaults here (one rank on CPU, fp32, one step) serve points built by hand, as tests do."""

    model: str
    strategy: str
    seq_len: int
    n_layers: int | None = None  # the depth trained (the preset's when not overridden)
    chunks: int = 1  # what runs: 1 for a strategy that takes no chunks
    requested_chunks: int = 1  # what the config asked for
    gpus: int = 1
    sp: int = 1  # sequence-parallel degree
    dp: int | None = 1  # data-parallel replicas (None: sp does not divide gpus; check_point says so)
    ulysses_degree: int | None = None  # usp: ranks per Ulysses group
    batch_size: int = 1
    steps: int = 1
    warmup_steps: int = 0
    precision: str = "32-true"
    dtype: str = "fp32"  # what the matmuls run in
    residual_fp32: bool = False
    seed: int = 0
    backend: str = "torch"
    lr: float = 3e-4
    max_device_memory: float | None = None
    max_host_memory: float | None = None
    fake_tensors: bool = False  # a simulated device on fake tensors: memory only, no compute
    timeout_s: float | None = None
    offload: bool = False
    backward_order: str = "auto"  # fpdt's backward loop (auto for the strategies without one)
    activation_checkpointing: bool = True
    checkpoint_on_host: bool = False
    chunked_mlp: bool = False
    chunked_loss: bool = False
    mlp_tile: int | None = None
    loss_tile: int | None = None
    fsdp: bool = False
    offload_states: bool = False
    hardware: str = "cpu"
    peak_tflops: float | None = None
    peak_tflops_source: str = ""
    data_path: str | None = None
    data_dtype: str = "uint16"
    data_packing: bool = True
    data_eos_id: int | None = None
    data_index: str | None = None
    data_doc_len: int | None = None
    results_csv: str = "results.csv"
    weight_decay: float = 0.01  # AdamW's own default: measured runs do not set it

    def as_dict(self) -> dict:
        """The fields by name (what a result row echoes)."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Point:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainPoint(Point):
    """A point of ``experiments.train``: the schedule and the checkpoints besides the run's keys."""

    stop_after: int | None = None
    lr_warmup_steps: int = 10
    lr_min_ratio: float = 0.1
    grad_clip: float | None = 1.0
    log_every: int = 1
    resume: bool = False
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 0

    @property
    def end_step(self) -> int:
        """The step this run stops at: ``stop_after``, or the schedule's horizon ``steps``."""
        return min(self.steps, self.stop_after or self.steps)
