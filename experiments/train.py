"""``python -m experiments.train``: train a model for real, with checkpoints and resume.

The same config groups and keys as ``experiments.run`` (``model=``, ``parallel=``, ``hardware=``,
``seq_len``, ``chunks``, ``gpus``, ``sp``, ``precision``, ``data.*``), plus the schedule and the
checkpoints (``conf/train.yaml``)::

    python -m experiments.train model=llama-tiny parallel=fpdt seq_len=4096 chunks=4 gpus=2 steps=200
    python -m experiments.train model=llama3-8b parallel=fpdt seq_len=262144 chunks=4 gpus=8 sp=4 \\
        steps=1000 checkpoint.dir=/shared/ckpt checkpoint.every=100
    python -m experiments.train ... checkpoint.dir=/shared/ckpt resume=true     # continue
    torchrun --nnodes 2 --nproc-per-node 8 ... -m experiments.train gpus=16 sp=8 ...

Writes ``train.csv`` (one row per step) and ``train_loss.png`` in the run directory. A rank that
dies stops the run; the last complete checkpoint stays, and the message says which rank died.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .core.paths import CONF_DIR
from .core.point import TrainPoint
from .core.tables import read_csv, write_json
from .sweep import config as _schema  # noqa: F401  (registers the structured configs)
from .sweep.controller import launch, stopped
from .sweep.points import check_point, resolve_point
from .sweep.worker import run_rank
from .training import checkpoint
from .training.loop import model_config
from .training.trainer import train_rank

TRAIN_KEYS = ("stop_after", "lr_warmup_steps", "lr_min_ratio", "grad_clip", "weight_decay", "log_every", "resume")


def resolve_training(cfg: DictConfig, run_dir: Path) -> TrainPoint:
    """The run's point (as ``experiments.run`` resolves it) plus the training keys, checked."""
    c = OmegaConf.to_container(cfg, resolve=True)
    ckpt = c["checkpoint"]
    point = TrainPoint(
        **{**resolve_point(cfg).as_dict(), **{k: c[k] for k in TRAIN_KEYS}},  # the schedule's weight decay wins
        checkpoint_dir=str((Path(ckpt["dir"]) if ckpt["dir"] else run_dir / "checkpoints").resolve()),
        checkpoint_every=ckpt["every"],
    )
    check_point(point)
    if point.stop_after is not None and not 1 <= point.stop_after <= point.steps:
        raise ValueError(f"stop_after={point.stop_after} must be in [1, steps={point.steps}]")
    if point.resume and not ckpt["dir"]:
        raise ValueError("resume=true needs checkpoint.dir=<the earlier run's checkpoint directory>")
    if Path(point.checkpoint_dir).exists() and not Path(point.checkpoint_dir).is_dir():
        raise ValueError(f"checkpoint.dir={ckpt['dir']} is a file; give a directory (it is created if missing)")
    earlier = sorted(Path(point.checkpoint_dir).glob("step_*")) if Path(point.checkpoint_dir).is_dir() else []
    if earlier and not point.resume:
        # A fresh run there would replace the earlier run's checkpoints of the same steps, and a
        # later resume would pick whichever step is newest, of either run.
        raise ValueError(f"checkpoint.dir={point.checkpoint_dir} holds another run's checkpoints ({earlier[-1].name}); "
                         "continue it with resume=true, or give a new checkpoint.dir")  # fmt: skip
    for key, value, least, note in (("log_every", point.log_every, 1, ""),
                                    ("checkpoint.every", point.checkpoint_every, 0, " (0: only at the end)"),
                                    ("lr_warmup_steps", point.lr_warmup_steps, 0, "")):  # fmt: skip
        if value < least:
            raise ValueError(f"{key}={value} must be >= {least}{note}")
    if point.lr_warmup_steps >= point.steps:
        warnings.warn(f"lr_warmup_steps={point.lr_warmup_steps} >= steps={point.steps}: the learning rate never "
                      f"reaches lr={point.lr} (lower lr_warmup_steps)", stacklevel=2)  # fmt: skip
    if not 0.0 <= point.lr_min_ratio <= 1.0:
        raise ValueError(
            f"lr_min_ratio={point.lr_min_ratio} must be in [0, 1] (the cosine decays to lr * lr_min_ratio)"
        )
    if point.grad_clip is not None and not point.grad_clip > 0:
        # clip_grad_norm_ with a negative limit would flip every gradient's sign
        raise ValueError(f"grad_clip={point.grad_clip} must be > 0 (the largest global gradient norm), or null")
    if not point.lr > 0 or point.weight_decay < 0:
        raise ValueError(f"lr={point.lr} must be > 0 and weight_decay={point.weight_decay} >= 0")
    caps = [f"{k}={v}" for k in ("max_device_memory", "max_host_memory") if (v := getattr(point, k)) is not None]
    if caps:
        raise ValueError(f"{' and '.join(caps)} cap the memory of measured steps (a simulated out-of-memory on "
                         "CPU): use them with experiments.run or experiments.max_seqlen; a training run takes "
                         "the memory it has")  # fmt: skip
    if point.fake_tensors:
        raise ValueError("fake_tensors=true computes nothing, so there is nothing to train; use it with "
                         "python -m experiments.run or experiments.max_seqlen")  # fmt: skip
    return point


def _resume_step(point: TrainPoint) -> int | None:
    """The step a resume starts at (``None`` without resume), checked before any rank starts."""
    if not point.resume:
        return None
    found = checkpoint.latest(point.checkpoint_dir)
    if found is None:
        raise ValueError(f"resume=true but {point.checkpoint_dir} holds no complete checkpoint; run without resume "
                         "first")  # fmt: skip
    now = checkpoint.run_meta(point.model, model_config(point), point.gpus, point.lr, point.weight_decay)
    step, changed = checkpoint.check_resume(found, now, point.end_step)
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"resume from {found}: {', '.join(changed)} (this run's settings apply from step {step})", flush=True)
    return step


def _loss_figure(run_dir: Path) -> Path | None:
    csv_path = run_dir / "train.csv"
    if not csv_path.exists():
        return None
    try:
        from .figures.plots import training_figure
    except ImportError as exc:  # matplotlib missing: the CSV is the record
        print(f"loss curve skipped: {exc}", flush=True)
        return None
    rows = read_csv(csv_path)
    if not rows:  # the run failed before its first step ended: nothing to draw
        return None
    return training_figure(rows, run_dir / "train_loss")[0]


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        point = resolve_training(cfg, run_dir)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 reports
    try:
        start = _resume_step(point)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if start is not None and start == point.end_step:
        if rank0:
            print(f"nothing to train: the checkpoint in {point.checkpoint_dir} is at step {start}, the end of this "
                  "run; raise steps (the schedule's horizon) to continue it", flush=True)  # fmt: skip
        return
    if rank0:
        print(f"train: {point.model} {point.strategy} seq_len={point.seq_len} chunks={point.chunks} "
              f"gpus={point.gpus} (sp={point.sp}, dp={point.dp}) precision={point.precision} "
              f"steps={point.steps}; run directory {run_dir}", flush=True)  # fmt: skip
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun started this rank
        if point.gpus != int(os.environ["WORLD_SIZE"]):
            sys.exit(f"error: gpus={point.gpus} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} ranks")
        run_rank(point, str(run_dir), train_rank)
        if not rank0:
            return
        # run_rank has rank 0 write what the ranks measured, as the spawned ranks do for launch()
        outcome = {"status": "ok", "metrics": json.loads((run_dir / "worker_metrics.json").read_text())}
    else:
        try:
            outcome = launch(point, run_dir, train_rank)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM: launch stopped the ranks
            last = checkpoint.latest(point.checkpoint_dir)
            kept = f"the last complete checkpoint is {last}; add resume=true to go on from it"
            if last is None:
                kept = f"no complete checkpoint in {point.checkpoint_dir} (checkpoint.every sets how often one is made)"
            raise stopped(exc, "experiments.train", f"training: the ranks are stopped; {kept}") from None
    write_json(run_dir / "train_result.json", {**outcome, "point": point.as_dict()})
    figure = _loss_figure(run_dir)
    if figure is not None:
        print(f"loss curve: {figure}", flush=True)
    print(f"train.csv: {run_dir / 'train.csv'}", flush=True)
    if outcome["status"] != "ok":
        last = checkpoint.latest(point.checkpoint_dir)
        sys.exit(f"{outcome['status']}: {outcome.get('error')}; last complete checkpoint: {last}")
    print(json.dumps({k: outcome.get("metrics", {}).get(k) for k in ("start_step", "end_step", "loss")}), flush=True)


if __name__ == "__main__":
    main()
