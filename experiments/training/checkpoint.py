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


# The model settings a checkpoint's weights belong to: resuming into a model that differs in any
# of them would load some tensors into the wrong places, or silently drop them.
ARCHITECTURE = ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "head_dim", "rope_theta",
                "norm", "norm_eps", "activation", "bias", "tie_embeddings")  # fmt: skip


def run_meta(model_name: str, cfg, gpus: int, lr: float, weight_decay: float) -> dict:
    """What a checkpoint records about the run that wrote it (in its ``COMPLETE`` marker), to
    check a resume against: the model (``cfg``: its ``ModelConfig``), the ranks, the optimizer."""
    arch = {k: getattr(cfg, k) for k in ARCHITECTURE}
    return {"model": model_name, "architecture": arch, "gpus": gpus, "lr": lr, "weight_decay": weight_decay}


def save(root: Path, step: int, model, optimizer, scheduler, meta: dict | None = None) -> Path:
    """Write the checkpoint of ``step`` under ``root`` (every rank calls it); returns its path.
    ``meta`` (:func:`run_meta`) goes into the ``COMPLETE`` marker beside the step."""
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
        (partial / COMPLETE).write_text(json.dumps({"step": step, **(meta or {})}))
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


def read_meta(path: Path) -> dict:
    """The ``COMPLETE`` marker of a checkpoint: its step and, if recorded, :func:`run_meta`."""
    return json.loads((Path(path) / COMPLETE).read_text())


def check_resume(path: Path, now: dict, stop: int) -> tuple[int, list[str]]:
    """The step a resume from ``path`` starts at, and what this run (``now``: :func:`run_meta`)
    changes of the optimizer settings; ``ValueError`` if it cannot continue that checkpoint (another
    model, another number of ranks, or a step past ``stop``). Checkpoints written before the marker
    held the run's settings are checked for the step only."""
    saved = read_meta(path)
    step = int(saved["step"])
    arch = saved.get("architecture")
    if arch is not None and arch != now["architecture"]:
        diff = [k for k in ARCHITECTURE if arch.get(k) != now["architecture"][k]]
        was = ", ".join(f"{k}={arch.get(k)}" for k in diff)
        new = ", ".join(f"{k}={now['architecture'][k]}" for k in diff)
        raise ValueError(f"{path} holds a {saved['model']} with {was}; this run's {now['model']} has {new}. Resume "
                         "with the model settings of that run, or give a new checkpoint.dir")  # fmt: skip
    if saved.get("gpus", now["gpus"]) != now["gpus"]:
        raise ValueError(f"{path} was written by gpus={saved['gpus']} (one RNG state per rank); resume with "
                         f"gpus={saved['gpus']} (its sp/dp split may differ), not gpus={now['gpus']}")  # fmt: skip
    if step > stop:
        raise ValueError(f"{path} is at step {step}, past this run's end (step {stop}); raise steps (the schedule's "
                         "horizon) or stop_after to continue it")  # fmt: skip
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in ("lr", "weight_decay") if saved.get(k, now[k]) != now[k]]
    return step, changed


def apply_settings(optimizer, scheduler, lr: float, weight_decay: float) -> None:
    """Make a resumed optimizer follow this run's peak ``lr`` and ``weight_decay``: loading a
    checkpoint restores the saved ones, while the schedule's shape (warm-up, horizon) is this run's
    already. Unchanged settings give the loaded learning rate bit for bit (``LambdaLR``'s rule)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"], group["weight_decay"] = lr, lr * factor(scheduler.last_epoch), weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


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
