"""The simulated device's tracker (``experiments.core.memory.MemoryTracker``) under FSDP2: its
DTensor parameters, gradients and AdamW moments are counted by their local shards, once; the
unsharded parameters FSDP frees with ``UntypedStorage.resize_(0)`` stop counting; and a run's
reported peak is its steps', not the model build's."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.core import memory
from experiments.core.memory import MemoryTracker, RecordingMemoryTracker

REPO = Path(__file__).resolve().parents[1]


def test_resized_storage_counts_its_new_size():
    with MemoryTracker() as tracker:
        t = torch.empty(1024)  # 4 KiB
        assert tracker.current["device"] == 4096
        t.untyped_storage().resize_(0)
        assert tracker.current["device"] == 0
        t.untyped_storage().resize_(8192)
        assert tracker.current["device"] == 8192
        assert tracker.peak["device"] == 8192
        del t
        assert tracker.current["device"] == 0
    assert torch.UntypedStorage.resize_ is torch._C.StorageBase.resize_  # restored


@pytest.mark.parametrize(
    "recording, dtensor_imported_late, width", [(False, False, 256), (True, False, 256), (False, True, 192)]
)
def test_fsdp_adamw_step_counts_shards_moments_and_frees_unsharded_params(
    one_rank_group, recording, dtensor_imported_late, width, monkeypatch
):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # Two FSDP blocks (a width x width and a width x width/2 weight) and the root.
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width, bias=False), torch.nn.Linear(width, width // 2, bias=False)
    )
    for block in model:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    p_bytes = (width * width + width * width // 2) * 4
    biggest = width * width * 4
    steps = 2 * 4  # each parameter's fp32 step counter
    x = torch.randn(4, width)
    tracker = (RecordingMemoryTracker if recording else MemoryTracker)()
    sharding_prop = sys.modules[memory._SHARDING_PROP]
    if dtensor_imported_late:
        # As in a rank whose first DTensor is made while it is tracked: DTensor's propagator is
        # imported after the tracker started. (A width of its own: DTensor caches propagations by
        # shape, so shapes an earlier test in this process ran would not be propagated again.)
        monkeypatch.delitem(sys.modules, memory._SHARDING_PROP)
    with tracker:
        sys.modules[memory._SHARDING_PROP] = sharding_prop
        tracker.track(model.parameters())  # DTensors: counted by their local shards
        assert tracker.current["device"] == p_bytes
        model(x).sum().backward()
        # Sharded gradients beside the parameters; the unsharded parameters FSDP gathered for the
        # forward and backward were freed (resize_(0)). The old tracker kept them: 3 x p_bytes.
        assert tracker.current["device"] == 2 * p_bytes
        tracker.reset_peak()
        optimizer.step()
        # AdamW's two moments are DTensors too; the old tracker missed them (2 x p_bytes).
        assert tracker.current["device"] == 4 * p_bytes + steps
        # The step's transient: the biggest parameter's sqrt(exp_avg_sq) and its quotient (denom),
        # never a tensor of DTensor's global-shape bookkeeping.
        assert tracker.peak["device"] == 4 * p_bytes + steps + 2 * biggest
        optimizer.zero_grad(set_to_none=True)
        assert tracker.current["device"] == 3 * p_bytes + steps
        tracker.reset_peak()
        model(x).sum().backward()
        # The second step's forward/backward: the unsharded copies of both blocks (the root keeps its
        # own parameters, none here, unsharded) and at most both blocks' unsharded and sharded grads.
        assert 4 * p_bytes + steps <= tracker.peak["device"] <= 3 * p_bytes + steps + 3 * p_bytes + x.numel() * 4
        assert tracker.current["device"] == 4 * p_bytes + steps
    if recording:
        assert sum(a.nbytes for a in tracker.at_peak) == tracker.peak["device"]
    propagator = sharding_prop.ShardingPropagator
    assert propagator.__dict__[memory._PROPAGATE] is memory._propagate  # restored


_BUILD_THEN_STEPS = """
import sys, torch
from hydra import compose, initialize_config_dir
from experiments.core.paths import CONF_DIR
from experiments.sweep import config, worker
from experiments.sweep.points import resolve_point

build = worker.build_model

def build_model(*args):  # a build whose transient (1 GiB, fake) is far above the steps' peak
    big = torch.empty(2**28)
    del big
    return build(*args)

worker.build_model = build_model
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    point = resolve_point(compose("config", overrides=[
        "model=llama-tiny", "parallel=local", "gpus=1", "fake_tensors=true", "seq_len=64",
        "steps=1", "warmup_steps=1", "max_device_memory=100"]))
(rank,) = worker.measure_steps(point, sys.argv[1])["ranks"]
print("PEAK", rank["device_peak_bytes"])
"""


def test_run_peak_is_the_steps_not_the_model_build(tmp_path):
    # Every rank first builds the whole model in its parameter dtype before FSDP shards it; the
    # peak a run reports is its steps' (here the build holds 1 GiB for a moment, the steps < 1 MiB).
    run = subprocess.run([sys.executable, "-c", _BUILD_THEN_STEPS, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    peak = int(run.stdout.split("PEAK")[-1])
    assert 0 < peak < 2**20


def test_recorded_sites_name_this_repositorys_code_innermost_first():
    from models import Transformer, get_config

    with RecordingMemoryTracker() as tracker:
        model = Transformer(get_config("llama-tiny", n_layers=1))
    assert sum(a.nbytes for a in tracker.at_peak) == tracker.peak["device"] > 0
    for allocation in tracker.at_peak:
        frames = allocation.site.split(" < ")
        assert 1 <= len(frames) <= 3, allocation.site
        for frame in frames:  # "path/in/repo.py:LINE function", never a test's nor the tracker's
            where, function = frame.split(" ")
            path, line = where.split(":")
            assert function.isidentifier() or function in ("<module>", "<genexpr>", "<lambda>"), frame
            assert not path.startswith("tests/") and path != "experiments/core/memory.py", frame
            assert 1 <= int(line) <= len((REPO / path).read_text().splitlines()), frame
    # The weights are made in the model's own constructors: the innermost frame is models' code.
    assert all(a.site.startswith("models/") for a in tracker.at_peak), [a.site for a in tracker.at_peak]
    del model
