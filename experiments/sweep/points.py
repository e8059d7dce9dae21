"""A sweep point (:class:`~experiments.core.point.Point`): the effective configuration of one Hydra
job, resolved from its config and checked before any rank starts."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf

import fpdt_kernels
from models import get_config
from parallel import check_mesh, get_strategy

from ..core.dtypes import dtype_name
from ..core.hardware import resolve_hardware
from ..core.point import Point
from ..training.data import data_spec
from ..training.loop import model_config, uses_cuda
from ..training.precision import check_residual_fp32, resolve_precision


def auto_backend(cuda: bool) -> str:
    """The attention backend a point runs when ``backend=auto``: the kernels' own automatic choice
    for the device, except that a sweep never runs the Triton interpreter on CPU (too slow to
    measure anything), so CPU points use the torch backend even if ``TRITON_INTERPRET`` is set."""
    if not cuda:
        return "torch"
    return fpdt_kernels.resolve_backend(torch.device("cuda"))


def resolve_point(cfg: DictConfig) -> Point:
    """The effective configuration of a point (what the key and the row echo)."""
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    par, hw = c["parallel"], resolve_hardware(c["hardware"])
    strategy = get_strategy(par["strategy"])  # an unknown name fails here, naming the registered ones
    fake = bool(c.get("fake_tensors", False))
    cuda = torch.cuda.is_available() and not fake  # where the ranks run (uses_cuda, once a point exists)
    precision = resolve_precision(c["precision"], cuda, c["dtype"])
    point = {
        "model": c["model"]["name"],
        "n_layers": c["model"]["n_layers"],
        "strategy": strategy.name,
        "seq_len": c["seq_len"],
        # chunks only mean something to a strategy that takes them: the others record 1, so a
        # sweep that crosses strategies and chunk counts runs each of their points once.
        "chunks": c["chunks"] if strategy.takes_chunks else 1,
        "requested_chunks": c["chunks"],
        "gpus": c["gpus"],
        "sp": c["gpus"] if c["sp"] is None else c["sp"],
        "batch_size": c["batch_size"],
        "steps": c["steps"],
        "warmup_steps": c.get("warmup_steps", 0),
        "precision": precision.name,
        "dtype": dtype_name(precision.compute_dtype),  # what the matmuls ran in
        # Only mixed precision has a choice: otherwise the residual is the one training dtype.
        "residual_fp32": bool(c.get("residual_fp32", False)) and precision.mixed,
        "seed": c["seed"],
        "backend": c["backend"] if c["backend"] != "auto" else auto_backend(cuda),
        "lr": c["lr"],
        "max_device_memory": c["max_device_memory"],
        "max_host_memory": c.get("max_host_memory"),
        "fake_tensors": fake,
        "timeout_s": c["timeout_s"],
        "offload": par["offload"] and strategy.offloads,
        "backward_order": par.get("backward_order", "auto") if strategy.takes_chunks else "auto",
        "activation_checkpointing": par["activation_checkpointing"],
        "checkpoint_on_host": par["checkpoint_on_host"] and par["activation_checkpointing"],
        "chunked_mlp": par["chunked_mlp"],
        "chunked_loss": par["chunked_loss"],
        "mlp_tile": par["mlp_tile"],
        "loss_tile": par["loss_tile"],
        "fsdp": par["fsdp"],
        "offload_states": par["offload_states"],
        "hardware": hw["name"],
        "peak_tflops": hw.get("peak_tflops"),
        "peak_tflops_source": hw.get("source", ""),
        "data_path": c["data"]["path"],
        "data_dtype": c["data"]["dtype"],
        "data_packing": c["data"]["packing"],
        "data_eos_id": c["data"]["eos_id"],
        "data_index": c["data"]["index"],
        "data_doc_len": c["data"]["doc_len"],
        "results_csv": c.get("results_csv", "results.csv"),
        "ulysses_degree": par.get("ulysses_degree") if strategy.uses_ulysses_degree else None,
    }
    point["dp"] = point["gpus"] // point["sp"] if point["sp"] >= 1 and point["gpus"] % point["sp"] == 0 else None
    if point["n_layers"] is None:  # record the depth trained, not the (empty) override
        point["n_layers"] = get_config(point["model"]).n_layers
    if strategy.uses_ulysses_degree and point["ulysses_degree"] is None and point["dp"]:
        cfg = get_config(point["model"])  # record the degree that runs, not the (empty) default
        point["ulysses_degree"] = strategy.head_degree(point["sp"], None, cfg.n_heads, cfg.n_kv_heads)
    return Point(**point)


def check_requested_chunks(point: Point) -> None:
    """``chunks`` as given is >= 1, also where the strategy takes none (its row says 1)."""
    if point.requested_chunks < 1:
        raise ValueError(f"chunks={point.requested_chunks} must be >= 1")


def check_point(point: Point) -> None:
    """Raise ``ValueError`` with what was wrong and what would be right (the library's own checks
    for the rank layout, the strategy, the head split and the token layout, so every entry point
    says the same)."""
    for key in ("seq_len", "chunks", "gpus", "batch_size", "steps"):
        if getattr(point, key) < 1:
            raise ValueError(f"{key}={getattr(point, key)} must be >= 1")
    check_requested_chunks(point)
    if point.warmup_steps < 0:
        raise ValueError(f"warmup_steps={point.warmup_steps} must be >= 0")
    if point.n_layers is not None and point.n_layers < 1:
        raise ValueError(f"model.n_layers={point.n_layers} must be >= 1 (leave it out for the preset's depth)")
    for key in ("max_device_memory", "max_host_memory", "timeout_s"):
        value = getattr(point, key)
        if value is not None and not value > 0:
            raise ValueError(f"{key}={value} must be > 0 (GiB for the memory caps, seconds for the timeout), "
                             "or null for no limit")  # fmt: skip

    check_mesh(point.gpus, point.sp)
    cfg = model_config(point)
    data_spec(point, cfg.vocab_size).check_files()  # data.* settings, then the token file and index
    get_strategy(point.strategy).check(point.seq_len, point.sp, point.chunks, cfg.n_heads, cfg.n_kv_heads,
                                          point.ulysses_degree)  # fmt: skip
    check_residual_fp32(point.residual_fp32, point.fsdp)
    if point.offload_states and not point.fsdp:
        raise ValueError("parallel.offload_states=true keeps model states in host memory through FSDP; "
                         "set parallel.fsdp=true")  # fmt: skip
    if point.hardware != "cpu" and not uses_cuda(point) and not point.fake_tensors:
        raise ValueError(
            f"hardware={point.hardware} is a GPU preset (its peak FLOP/s is what MFU divides by), but this run "
            "is on CPU; use hardware=auto (the CPU's measured peak), or fake_tensors=true to simulate the memory"
        )
    if point.offload_states and not torch.cuda.is_available():
        raise ValueError(
            "parallel.offload_states moves model states between host and GPU memory, so it needs CUDA; the "
            "planner predicts it anywhere: python -m experiments.plan offload_states=true"
        )
    if torch.cuda.is_available() and point.gpus > torch.cuda.device_count() and "WORLD_SIZE" not in os.environ:
        slurm = ""
        if "SLURM_JOB_ID" in os.environ:  # hydra/launcher=slurm asks every job of a sweep for the same GPUs
            slurm = (
                f" (SLURM job {os.environ['SLURM_JOB_ID']}); hydra/launcher=slurm requests "
                "hydra.launcher.gpus_per_node GPUs for every job of a sweep, by default the gpus given on the "
                "command line (not the swept or preset values): to sweep gpus, set hydra.launcher.gpus_per_node "
                "to the largest"
            )
        raise ValueError(
            f"gpus={point.gpus} but this machine has {torch.cuda.device_count()} visible GPUs{slurm}; "
            "use fewer, or torchrun across nodes"
        )
