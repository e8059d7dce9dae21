"""Real training (``python -m experiments.train``): strategies and rank layouts train alike, mixed
precision keeps fp32 master weights, checkpoints resume exactly and survive a dead rank."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from experiments.core.point import Point
from experiments.core.ranks import rank_pids
from experiments.core.tables import read_csv
from experiments.training import checkpoint
from experiments.training.precision import resolve_precision
from experiments.training.schedule import lr_factor

REPO = Path(__file__).resolve().parent.parent
TINY = ["model=llama-tiny", "seq_len=256", "lr=3e-3", "lr_warmup_steps=2", "grad_clip=1.0", "log_every=100"]


def _train(tmp_path, name, *args, timeout=600, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # CPU runs use the torch attention backend
    run = tmp_path / name
    cmd = [sys.executable, "-m", "experiments.train", *TINY, *args, f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run, proc


def _losses(run):
    return [float(r["loss"]) for r in read_csv(run / "train.csv")]


def _params(ckpt_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = checkpoint.latest(ckpt_dir)
    out = path.parent / f".{path.name}.pt"  # beside it, hidden from latest()
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)["model"]


def _assert_params_close(a, b, rel=1e-4):
    """Each tensor within ``rel`` (relative Frobenius norm): fp32 rounding differs between strategies
    (tiling, summation order), and AdamW's normalised steps amplify it where a gradient is near 0."""
    assert a.keys() == b.keys()
    for k in a:
        err = ((a[k].float() - b[k].float()).norm() / b[k].float().norm()).item()
        assert err <= rel, f"{k}: relative error {err:.2e} > {rel:.0e}"


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=4, horizon=20, min_ratio=0.1) for s in range(25)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:20], f[5:21], strict=True)) and f[20] == pytest.approx(0.1)


def test_precision_names_and_bytes_per_parameter():
    assert resolve_precision("auto", cuda=True).name == "bf16-mixed"
    assert resolve_precision("auto", cuda=False).name == "32-true"
    mixed = resolve_precision("bf16-mixed", cuda=False)
    assert mixed.param_dtype == torch.float32 and mixed.compute_dtype == torch.bfloat16 and mixed.bytes_per_param == 16
    assert resolve_precision("bf16-true", cuda=True).bytes_per_param == 8
    assert resolve_precision("auto", cuda=True, dtype="bf16").name == "bf16-true"  # the old key
    with pytest.raises(ValueError, match="contradicts"):
        resolve_precision("bf16-mixed", cuda=True, dtype="fp32")
    with pytest.raises(ValueError, match="precision='fp8'"):
        resolve_precision("fp8", cuda=True)
    with pytest.raises(ValueError, match="not offered .*use bf16-mixed"):
        resolve_precision("fp16-mixed", cuda=True)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


@pytest.mark.parametrize("fsdp", [False, True], ids=["autocast", "fsdp-policy"])
def test_bf16_mixed_keeps_updates_bf16_would_round_away(fsdp, request):
    """One AdamW step of size ~1e-4 on weights of 1.0: below bf16's resolution there (2^-8)."""
    from experiments.training.loop import build_model, build_optimizer, clip_and_step, forward_backward
    from parallel import Mesh

    if fsdp:
        request.getfixturevalue("one_rank_group")
    point = Point(model="llama-tiny", seq_len=64, n_layers=1, strategy="local", chunks=1, offload=False, fsdp=fsdp,
                  seed=0, lr=1e-4, weight_decay=0.0, activation_checkpointing=True)  # fmt: skip
    tokens = torch.randint(0, 96, (1, 65))
    moved = {}
    for name in ("bf16-mixed", "bf16-true"):
        precision = resolve_precision(name, cuda=False)
        model = build_model(point, Mesh.single(), torch.device("cpu"), precision)
        w = dict(model.named_parameters())["blocks.0.mlp.w2"]
        with torch.no_grad():
            w.fill_(1.0)  # bf16's resolution there: 2^-8
        before = _full(w)
        opt = build_optimizer(model, point)
        forward_backward(model, point, Mesh.single(), precision, torch.device("cpu"), tokens[:, :-1], tokens[:, 1:])
        clip_and_step(model, opt, None)
        assert w.dtype == precision.param_dtype
        moved[name] = (_full(w) - before).abs()
    mixed, true = moved["bf16-mixed"], moved["bf16-true"]
    assert (mixed > 0).float().mean() > 0.99  # every weight took its ~lr-sized step
    assert (true == 0).all()  # bf16 weights did not move at all
    assert mixed.max() < 2e-4


@pytest.mark.distributed
def test_strategies_train_alike(tmp_path):
    runs = {
        "local": _train(tmp_path, "local", "parallel=local", "gpus=1", "steps=10", "checkpoint.dir=ck_local")[0],
        "ulysses": _train(tmp_path, "uly", "parallel=ulysses", "gpus=2", "steps=10", "checkpoint.dir=ck_uly")[0],
        "fpdt": _train(tmp_path, "fpdt", "parallel=fpdt", "chunks=2", "gpus=2", "steps=10", "checkpoint.dir=ck_fpdt")[
            0
        ],  # fmt: skip
    }
    ref = _losses(runs["local"])
    assert len(ref) == 10 and ref[-1] < ref[0]  # it learns
    for name in ("ulysses", "fpdt"):
        torch.testing.assert_close(_losses(runs[name]), ref, rtol=1e-5, atol=0)
    local = _params(tmp_path / "ck_local")
    for name in ("uly", "fpdt"):
        _assert_params_close(_params(tmp_path / f"ck_{name}"), local)
    assert (runs["local"] / "train_loss.png").stat().st_size > 5000


@pytest.mark.distributed
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_data_x_sequence_parallel_equals_one_process(tmp_path, fsdp):
    """gpus=4 sp=2 batch_size=1 trains on exactly the tokens of gpus=1 batch_size=2."""
    one, _ = _train(tmp_path, "one", "parallel=local", "gpus=1", "batch_size=2", "steps=3", "checkpoint.dir=ck1")
    four, proc = _train(tmp_path, "four", "parallel=fpdt", "chunks=2", "gpus=4", "sp=2", "batch_size=1", "steps=3",
                        f"parallel.fsdp={str(fsdp).lower()}", "checkpoint.dir=ck4")  # fmt: skip
    assert "(sp=2, dp=2)" in proc.stdout
    torch.testing.assert_close(_losses(four), _losses(one), rtol=1e-5, atol=0)
    _assert_params_close(_params(tmp_path / "ck4"), _params(tmp_path / "ck1"))
    rows = read_csv(four / "train.csv")
    assert int(rows[0]["tokens_seen"]) == 2 * 256  # the global batch: 2 sequences


@pytest.mark.distributed
def test_resume_equals_an_uninterrupted_run_even_with_another_layout(tmp_path):
    base = ["parallel=fpdt", "chunks=2", "gpus=2", "parallel.fsdp=true", "steps=6"]
    one_group = ["sp=2", "batch_size=2"]  # one sequence-parallel group of 2 ranks, 2 sequences a step
    full, _ = _train(tmp_path, "full", *base, *one_group, "checkpoint.dir=ck_full")
    first, _ = _train(tmp_path, "first", *base, *one_group, "stop_after=3", "checkpoint.dir=ck")
    assert checkpoint.latest(tmp_path / "ck").name == "step_00000003"
    torch.testing.assert_close(_losses(first), _losses(full)[:3], rtol=1e-6, atol=0)
    # The same 2 GPUs as 2 data-parallel replicas of one sequence each: the same global batch.
    second, proc = _train(tmp_path, "second", *base, "sp=1", "batch_size=1", "resume=true", "checkpoint.dir=ck")
    assert "resumed from" in proc.stdout and "step 3 of 6" in proc.stdout and "(sp=1, dp=2)" in proc.stdout
    assert [int(r["step"]) for r in read_csv(second / "train.csv")] == [3, 4, 5]
    torch.testing.assert_close(_losses(second), _losses(full)[3:], rtol=1e-6, atol=0)
    _assert_params_close(_params(tmp_path / "ck"), _params(tmp_path / "ck_full"))


def test_tokens_seen_counts_the_tokens_trained_across_a_resume_with_another_batch(tmp_path):
    """train.csv's ``tokens_seen`` is what the run has trained on so far: a resume whose steps
    take more tokens (here a larger batch) adds its own on top of the checkpoint's count."""
    first, _ = _train(tmp_path, "first", "parallel=local", "gpus=1", "batch_size=1", "steps=2", "stop_after=1")
    second, _ = _train(tmp_path, "second", "parallel=local", "gpus=1", "batch_size=2", "steps=2", "resume=true",
                       f"checkpoint.dir={first / 'checkpoints'}")  # fmt: skip
    assert [int(r["tokens_seen"]) for r in read_csv(first / "train.csv")] == [256]
    assert [int(r["tokens_seen"]) for r in read_csv(second / "train.csv")] == [256 + 2 * 256]


def test_incomplete_checkpoints_are_skipped(tmp_path):
    good = tmp_path / "step_00000002"
    good.mkdir()
    (good / ".metadata").write_bytes(b"x")
    (good / checkpoint.COMPLETE).write_text("{}")
    (tmp_path / "step_00000004").mkdir()  # killed before it was complete
    (tmp_path / ".step_00000006.partial").mkdir()
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*step_00000004"):
        assert checkpoint.latest(tmp_path) == good
    assert checkpoint.latest(tmp_path / "none") is None


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc (Linux)")
def test_a_dead_rank_is_reported_and_the_last_checkpoint_survives(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "experiments.train", *TINY, "parallel=fpdt", "chunks=2", "gpus=2", "steps=400",
           "checkpoint.every=2", "checkpoint.dir=ck", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while checkpoint.latest(tmp_path / "ck") is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        victim = rank_pids(proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 1 died (signal SIGKILL)" in err, err[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a save in progress when the rank died is incomplete
        last = checkpoint.latest(tmp_path / "ck")
    assert last is not None and f"last complete checkpoint: {last}" in err
    assert json.loads((last / checkpoint.COMPLETE).read_text())["step"] >= 2
    assert len(_params(tmp_path / "ck")) > 0  # it loads


@pytest.mark.parametrize("strategy,chunks", [("local", 1), ("ulysses", 1), ("fpdt", 2)])
def test_bf16_mixed_computes_in_bf16_and_keeps_fp32_gradients(strategy, chunks, monkeypatch):
    import fpdt_kernels
    from experiments.training.loop import build_model, forward_backward
    from parallel import Mesh

    seen = []
    for name in ("flash_attention", "attention_chunk_forward"):  # what local/ulysses and FPDT call
        real = getattr(fpdt_kernels, name)
        monkeypatch.setattr(
            fpdt_kernels, name, lambda q, *a, _real=real, **k: seen.append(q.dtype) or _real(q, *a, **k)
        )
    point = Point(model="llama-tiny", seq_len=128, n_layers=1, strategy=strategy, chunks=chunks, offload=True,
                  fsdp=False, seed=0, lr=1e-3, activation_checkpointing=True, checkpoint_on_host=True,
                  chunked_mlp=True, chunked_loss=True)  # fmt: skip
    tokens = torch.randint(0, 96, (2, 129), generator=torch.Generator().manual_seed(0))
    losses = {}
    with fpdt_kernels.use_backend("torch"):
        for name in ("32-true", "bf16-mixed"):
            seen.clear()
            precision = resolve_precision(name, cuda=False)
            model = build_model(point, Mesh.single(), torch.device("cpu"), precision)
            losses[name] = float(forward_backward(model, point, Mesh.single(), precision, torch.device("cpu"),
                                                  tokens[:, :-1], tokens[:, 1:]))  # fmt: skip
            assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
            assert seen and set(seen) == {precision.compute_dtype}  # the attention ran in the compute dtype
    assert losses["bf16-mixed"] == pytest.approx(losses["32-true"], rel=1e-2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("grad_clip=-1", "grad_clip=-1.0 must be > 0"),  # a negative clip would flip every gradient
        ("lr=0", "lr=0.0 must be > 0"),
        ("fake_tensors=true", "nothing to train"),
        ("max_device_memory=1", "max_device_memory=1.0 cap the memory of measured steps"),
    ],
)
def test_train_rejects_settings_that_cannot_train(tmp_path, override, message):
    _, proc = _train(tmp_path, "bad", "parallel=local", override, check=False)
    assert proc.returncode != 0 and message in proc.stderr + proc.stdout, proc.stderr[-2000:]
