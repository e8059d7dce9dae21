"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded as FSDP holds the states,
written atomically, found again by :func:`latest`.

A checkpoint of step ``n`` (``n`` optimizer steps done) is the directory ``step_<n>`` holding
DCP's files, with the model, the optimizer, the learning-rate scheduler, the step (which is
also the data position: batches are seeded per step) and every rank's RNG states. It is written
to ``.step_<n>.partial`` first and renamed only after every rank has finished and rank 0 has
written ``COMPLETE`` into it, so a save killed half way never replaces the last good checkpoint.
FSDP shards over all ranks, so a run can resume with another ``sp``/``dp`` split of the same
number of GPUs (DCP reshards where the layout differs).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

COMPLETE = "COMPLETE"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _rng_key() -> str:
    return f"rng_rank{_rank()}"  # RNG differs per rank: one key each, so DCP keeps them all


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(root: Path, step: int, model, optimizer, scheduler) -> Path:
    """Write the checkpoint of ``step`` under ``root`` (every rank calls it); returns its path."""
    root, final = Path(root), step_dir(root, step)
    partial = root / f".{final.name}.partial"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a save killed earlier
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": step,
             _rng_key(): _rng_state()}  # fmt: skip
    dcp.save(state, checkpoint_id=str(partial))
    _barrier()
    if _rank() == 0:
        (partial / COMPLETE).write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    _barrier()
    return final


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file() and (Path(path) / ".metadata").is_file()


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete ones are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step_*"), reverse=True):
        if is_complete(path):
            return path
        warnings.warn(f"skipping incomplete checkpoint {path} (no {COMPLETE} marker or DCP metadata)", stacklevel=2)
    return None


def load(path: Path, model, optimizer, scheduler) -> int:
    """Load a checkpoint into the model, optimizer and scheduler (every rank calls it); restores
    this rank's RNG; returns the step it was saved at."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": 0,
             _rng_key(): _rng_state()}  # fmt: skip
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state[_rng_key()]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])
