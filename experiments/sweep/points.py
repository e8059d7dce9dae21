"""A sweep point: the effective configuration of one Hydra job, checked before any rank starts."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf

import kernels
from models import get_config
from parallel import check_setup

from ..core.hardware import resolve_hardware


def auto_backend(cuda: bool) -> str:
    """The attention backend a point runs when ``backend=auto``: the kernels' own automatic choice
    for the device, except that a sweep never runs the Triton interpreter on CPU (too slow to
    measure anything), so CPU points use the torch backend even if ``TRITON_INTERPRET`` is set."""
    if not cuda:
        return "torch"
    return kernels.resolve_backend(torch.device("cuda"))


def model_config(point: dict, **overrides):
    """The model a point trains: its preset at the point's depth, with ``overrides``."""
    if point.get("n_layers"):
        overrides["n_layers"] = point["n_layers"]
    return get_config(point["model"], **overrides)


def resolve_point(cfg: DictConfig) -> dict:
    """The effective configuration of a point as a flat dict (what the key and the row echo)."""
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    par, hw = c["parallel"], resolve_hardware(c["hardware"])
    strategy = par["strategy"]
    point = {
        "model": c["model"]["name"],
        "n_layers": c["model"]["n_layers"],
        "strategy": strategy,
        "seq_len": c["seq_len"],
        # chunks only means something to fpdt: other strategies record 1, so a sweep that
        # crosses strategies and chunk counts runs each of their points once.
        "chunks": c["chunks"] if strategy == "fpdt" else 1,
        "requested_chunks": c["chunks"],
        "gpus": c["gpus"],
        "batch_size": c["batch_size"],
        "steps": c["steps"],
        "warmup_steps": c["warmup_steps"],
        "dtype": c["dtype"],
        "seed": c["seed"],
        "backend": c["backend"] if c["backend"] != "auto" else auto_backend(torch.cuda.is_available()),
        "lr": c["lr"],
        "max_device_memory": c["max_device_memory"],
        "timeout_s": c["timeout_s"],
        "offload": par["offload"] and strategy == "fpdt",
        "activation_checkpointing": par["activation_checkpointing"],
        "checkpoint_on_host": par["checkpoint_on_host"] and par["activation_checkpointing"],
        "chunked_mlp": par["chunked_mlp"],
        "chunked_loss": par["chunked_loss"],
        "mlp_tile": par["mlp_tile"],
        "loss_tile": par["loss_tile"],
        "fsdp": par["fsdp"],
        "hardware": hw["name"],
        "peak_tflops": hw.get("peak_tflops"),
        "peak_tflops_source": hw.get("source", ""),
        "data_path": c["data"]["path"],
        "data_dtype": c["data"]["dtype"],
        "results_csv": c["results_csv"],
    }
    if point["n_layers"] is None:  # record the depth trained, not the (empty) override
        point["n_layers"] = get_config(point["model"]).n_layers
    return point


def check_point(point: dict) -> None:
    """Raise ``ValueError`` with what was wrong and what would be right (the library's own checks
    for the strategy, the head split and the token layout, so every entry point says the same)."""
    for key in ("seq_len", "chunks", "gpus", "batch_size", "steps"):
        if point[key] < 1:
            raise ValueError(f"{key}={point[key]} must be >= 1")
    if point["warmup_steps"] < 0:
        raise ValueError(f"warmup_steps={point['warmup_steps']} must be >= 0")
    cfg = model_config(point)
    check_setup(point["strategy"], point["seq_len"], point["gpus"], point["chunks"], cfg.n_heads, cfg.n_kv_heads)
    if torch.cuda.is_available() and point["gpus"] > torch.cuda.device_count() and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"gpus={point['gpus']} but this machine has {torch.cuda.device_count()} visible GPUs; "
            "use fewer, or torchrun across nodes"
        )
