"""Resuming and data settings are checked before any rank starts: a checkpoint of another model,
of another rank count or past the run's end, a token file that cannot give the run's windows,
and an index that is not sorted offsets each get an error that says what would be right."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import experiments.sweep.config  # noqa: F401  (registers the schema)
from experiments.core.paths import CONF_DIR
from experiments.sweep.points import resolve_point
from experiments.sweep.results import point_key
from experiments.train import resolve_training
from experiments.training import checkpoint
from experiments.training.data import DataSpec
from experiments.training.schedule import make_scheduler
from models import get_config


def _compose(config, overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config, overrides=["model=llama-tiny", "parallel=fpdt", "seq_len=256", "chunks=2", *overrides])


# --- resume ---------------------------------------------------------------------------------------


def _meta(name="llama-tiny", gpus=1, lr=1e-4, weight_decay=0.1, **model):
    return checkpoint.run_meta(name, get_config(name, **model), gpus, lr, weight_decay)


def _saved(tmp_path, step, meta):
    path = tmp_path / f"step_{step:08d}"
    path.mkdir()
    (path / checkpoint.COMPLETE).write_text(json.dumps({"step": step, **meta}))
    return path


def test_resume_continues_the_same_run_and_names_what_changed(tmp_path):
    path = _saved(tmp_path, 2, _meta())
    assert checkpoint.check_resume(path, _meta(), stop=4) == (2, [])
    assert checkpoint.check_resume(path, _meta(lr=1e-3), stop=2) == (2, ["lr 0.0001 -> 0.001"])


@pytest.mark.parametrize(
    "now, stop, match",
    [
        (_meta(n_layers=1), 4, r"holds a llama-tiny with n_layers=2; this run's llama-tiny has n_layers=1\. Resume"),
        (_meta("gpt-tiny"), 4, r"with n_kv_heads=2, .*norm=rmsnorm.*; this run's gpt-tiny has n_kv_heads=4"),
        (_meta(gpus=2), 4, r"written by gpus=1 .*resume with gpus=1 \(its sp/dp split may differ\), not gpus=2"),
        (_meta(), 1, r"is at step 2, past this run's end \(step 1\); raise steps"),
    ],
    ids=["fewer-layers", "another-model", "more-gpus", "past-the-end"],
)
def test_resume_refuses_what_cannot_continue_the_checkpoint(tmp_path, now, stop, match):
    with pytest.raises(ValueError, match=match):
        checkpoint.check_resume(_saved(tmp_path, 2, _meta()), now, stop)


def test_checkpoints_without_the_runs_settings_are_checked_for_the_step(tmp_path):
    path = _saved(tmp_path, 3, {})  # written before the marker held the run's settings
    assert checkpoint.check_resume(path, _meta(n_layers=1, gpus=4), stop=5) == (3, [])
    with pytest.raises(ValueError, match="past this run's end"):
        checkpoint.check_resume(path, _meta(), stop=2)


def test_a_resumed_optimizer_follows_this_runs_lr_and_weight_decay():
    def stepped(lr):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr, weight_decay=0.1)
        sched = make_scheduler(opt, warmup=2, horizon=10, min_ratio=0.1)
        for _ in range(4):
            opt.step()
            sched.step()
        return opt, sched

    opt, sched = stepped(1e-4)
    before = opt.param_groups[0]["lr"]
    checkpoint.apply_settings(opt, sched, 1e-4, 0.1)  # unchanged settings: the same lr, bit for bit
    assert opt.param_groups[0]["lr"] == before == sched.get_last_lr()[0]
    checkpoint.apply_settings(opt, sched, 1e-3, 0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(10 * before) == sched.get_last_lr()[0]
    assert opt.param_groups[0]["weight_decay"] == 0.0
    sched.step()  # the schedule goes on from the new peak
    assert sched.get_last_lr()[0] == pytest.approx(1e-3 * sched.lr_lambdas[0](5))


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path):
    file = tmp_path / "afile"
    file.touch()
    with pytest.raises(ValueError, match=r"checkpoint.dir=.*afile is a file; give a directory"):
        resolve_training(_compose("train", [f"checkpoint.dir={file}"]), tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("log_every=0", r"^log_every=0 must be >= 1$"),
        ("checkpoint.every=-1", r"^checkpoint.every=-1 must be >= 0 \(0: only at the end\)$"),
        ("lr_warmup_steps=-1", r"^lr_warmup_steps=-1 must be >= 0$"),
        ("lr_min_ratio=2", r"^lr_min_ratio=2.0 must be in \[0, 1\] \(the cosine decays to lr \* lr_min_ratio\)$"),
    ],
)
def test_each_bad_training_key_is_named_before_any_rank_starts(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        resolve_training(_compose("train", [override]), tmp_path)


def test_a_fresh_run_into_another_runs_checkpoints_is_refused(tmp_path):
    """It would replace that run's checkpoints of the same steps, and a later resume would take
    whichever step is newest, of either run; resume=true continues it."""
    ckpt = tmp_path / "ck"
    (ckpt / "step_00000006").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds another run's checkpoints \(step_00000006\); continue it with resume"):
        resolve_training(_compose("train", [f"checkpoint.dir={ckpt}"]), tmp_path)
    resolve_training(_compose("train", [f"checkpoint.dir={ckpt}", "resume=true"]), tmp_path)


def test_a_warm_up_as_long_as_the_run_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match=r"lr_warmup_steps=10 >= steps=4: the learning rate never reaches"):
        resolve_training(_compose("train", ["steps=4", "lr_warmup_steps=10"]), tmp_path)


# --- data ----------------------------------------------------------------------------------------


def _spec(tmp_path, tokens=1000, dtype="uint16", **kw):
    path = tmp_path / "tokens.bin"
    np.arange(tokens, dtype=dtype).tofile(path)
    return DataSpec(seq_len=256, batch_size=1, vocab_size=1 << 16, path=str(path), file_dtype=dtype, **kw)


def _index(tmp_path, values, name="index.npy"):
    path = tmp_path / name
    np.save(path, np.asarray(values))
    return str(path)


def test_token_files_and_indexes_that_work(tmp_path):
    _spec(tmp_path).check_files()
    _spec(tmp_path, dtype="int32", index=_index(tmp_path, [0, 100, 100, 999])).check_files()
    DataSpec(seq_len=256, batch_size=1, vocab_size=96).check_files()  # synthetic data: no file


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: _spec(p, tokens=100), r"data.path has 100 tokens; seq_len=256 needs at least 257"),
        (lambda p: DataSpec(256, 1, 96, path=str(p / "missing.bin")), r"data.path=.*missing.bin is not a file"),
        (
            lambda p: DataSpec(256, 1, 96, path=_spec(p, tokens=1001).path, file_dtype="int64"),
            r"has 2002 bytes, not a whole number of int64 tokens \(8 bytes each\); is data.dtype right\?",
        ),
        (lambda p: _spec(p, index=_index(p, [5, 3, 1])), r"index.npy decreases at position 1 \(5 then 3\)"),
        (
            lambda p: _spec(p, index=_index(p, np.array([0, 400, 300], dtype=np.uint64))),
            r"index.npy decreases at position 2 \(400 then 300\)",
        ),
        (lambda p: _spec(p, index=_index(p, [0.0, 1.0])), r"holds a float64 array of shape \(2,\)"),
        (lambda p: _spec(p, index=_index(p, [0, 1000])), r"in \[0, 1000\); .*runs from 0 to 1000"),
        (lambda p: _spec(p, index=_spec(p).path), r"tokens.bin is not a .npy file"),
    ],
    ids=["short", "missing", "odd-size", "unsorted", "unsorted-unsigned", "float", "past-the-end", "not-npy"],
)
def test_token_files_and_indexes_that_cannot_work(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path).check_files()


def test_token_dtypes_are_checked_by_the_schema_and_the_library(tmp_path):
    with pytest.raises(ConfigCompositionException) as info:
        _compose("config", ["data.dtype=float32"])
    assert "expected one of [uint16, uint32, int32, int64]" in str(info.value.__cause__)
    with pytest.raises(ValueError, match=r"data.dtype=uint8 is not a token dtype; use one of uint16, uint32"):
        DataSpec(256, 1, 96, file_dtype="uint8").check()


@pytest.mark.parametrize("override, field", [("data.dtype=uint32", "data_dtype"), ("lr=1e-3", "lr")])
def test_the_token_dtype_and_the_lr_are_part_of_a_points_key(override, field):
    default = resolve_point(_compose("config", []))
    assert point_key(resolve_point(_compose("config", [override]))) != point_key(default)
    # Older sweeps' points (before the key held the field) keep their keys at the default.
    assert point_key(default) == point_key({k: v for k, v in default.as_dict().items() if k != field})
    assert OmegaConf.to_container(_compose("config", []), enum_to_str=True)["data"]["dtype"] == "uint16"
