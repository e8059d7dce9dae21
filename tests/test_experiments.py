"""Hydra configs compose (and typos fail), sweep points are recorded whatever happens, and the
max-sequence-length search finds its limit. The multi-process tests spawn real workers (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import experiments.sweep.config  # noqa: F401  (registers the schema)
from experiments.core.point import Point
from experiments.figures.plots import load_results
from experiments.sweep.max_seqlen import search
from experiments.sweep.results import ROW_FIELDS, read_csv

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
FIXED_FIELDS = [
    "status", "error", "strategy", "model", "seq_len", "chunks", "gpus", "step_time_s", "step_time_p20_s",
    "step_time_p80_s", "tokens_per_s", "tflops_per_gpu", "mfu", "mfu_full_attention", "peak_tflops",
    "device_mem_peak_gib", "device_mem_reserved_gib", "host_mem_gib", "rss_peak_gib", "device_name", "git_commit",
]  # fmt: skip


def _compose(overrides=(), hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _names(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_result_rows_carry_the_fixed_field_names():
    assert ROW_FIELDS[: len(FIXED_FIELDS)] == FIXED_FIELDS


@pytest.mark.parametrize("hardware", _names("hardware"))
@pytest.mark.parametrize("parallel", _names("parallel"))
def test_every_combination_composes(parallel, hardware):
    for model in _names("model"):
        cfg = _compose([f"model={model}", f"parallel={parallel}", f"hardware={hardware}"])
        obj = OmegaConf.to_object(cfg)  # validates every field against the schema
        assert obj.model.name == model and obj.parallel.strategy.value == parallel


def test_model_presets_exist_in_models():
    from models import PRESETS

    assert set(_names("model")) <= set(PRESETS)


def test_fpdt_and_ulysses_presets_follow_the_paper():
    fpdt = _compose(["parallel=fpdt"]).parallel
    assert fpdt.offload and fpdt.activation_checkpointing and fpdt.checkpoint_on_host
    assert fpdt.chunked_mlp and fpdt.chunked_loss
    uly = _compose(["parallel=ulysses"]).parallel
    assert uly.activation_checkpointing and not uly.checkpoint_on_host and not uly.offload
    assert not uly.chunked_mlp and not uly.chunked_loss


@pytest.mark.parametrize(
    "override",
    ["seq_lne=5", "seq_len=abc", "parallel.strategy=foo", "parallel=fdpt", "model.nam=x", "dtype=fp8", "gpus=1.5"],
)
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises((ConfigCompositionException, Exception)) as info:
        OmegaConf.to_object(_compose([override]))
    assert not isinstance(info.value, AssertionError)


@pytest.mark.parametrize("sweep", _names("sweep"))
def test_sweep_presets_compose(sweep):
    cfg = _compose([f"+sweep={sweep}"], hydra_cfg=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params, "a sweep preset must sweep something"
    assert str(cfg.hydra.sweep.dir).endswith(sweep)


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    cfg = _compose(["hydra/launcher=slurm", "gpus=8"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and launcher.nodes == 1
    assert launcher.gpus_per_node == 8  # follows gpus


def test_max_seqlen_search_finds_a_known_limit():
    limit, probes = 37_000, []

    def probe(s):
        probes.append(s)
        return {"status": "ok" if s <= limit else "oom", "error": None}

    result = search({}, probe, start=1024, limit=1 << 22, resolution=0.1, granularity=8)
    assert result["status"] == "ok" and result["max_seq_len"] <= limit < result["first_failure"]
    assert result["first_failure"] - result["max_seq_len"] <= 0.1 * result["max_seq_len"]
    assert all(p % 8 == 0 for p in probes)
    # Nothing fits: halving down to the granularity, then 0.
    result = search({}, lambda s: {"status": "oom", "error": None}, 64, 1 << 20, 0.1, 8)
    assert result["max_seq_len"] == 0
    # An error is a bug, not a limit: the search stops and says so.
    result = search({}, lambda s: {"status": "error", "error": "boom"}, 64, 1 << 20, 0.1, 8)
    assert result["status"] == "error" and result["error"] == "boom"
    # A timeout bounds the search by time, not memory: the status says so.
    result = search({}, lambda s: {"status": "ok" if s <= 100 else "timeout", "error": None}, 64, 1 << 20, 0.1, 8)
    assert result["status"] == "timeout" and result["failure_status"] == "timeout"
    assert "not a memory limit" in result["error"] and result["max_seq_len"] <= 100 < result["first_failure"]
    # Still fitting at the limit: the answer names the doubling the limit stopped.
    result = search({}, lambda s: {"status": "ok", "error": None}, 512, 1536, 0.1, 8)
    assert (result["status"], result["max_seq_len"]) == ("limit", 1024)
    assert result["error"] == "fits at 1024 tokens; the next doubling (2048) exceeds search.limit=1536"


# ----------------------------------------------------------------------------- real processes


def _run(module, *args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # CPU runs use the torch attention backend
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc


@pytest.mark.distributed
def test_two_point_multirun_writes_rows_csv_and_figure(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model=llama-tiny", "parallel=fpdt", "seq_len=512,1024", "chunks=2", "gpus=2", "steps=2",
            "warmup_steps=1", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = _run("experiments.run", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(sweep / "results.csv")
    assert [int(r["seq_len"]) for r in rows] == [512, 1024]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert set(FIXED_FIELDS) <= set(r)
        assert int(r["gpus"]) == 2 and int(r["chunks"]) == 2 and r["strategy"] == "fpdt"
        for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_tflops", "device_mem_peak_gib",
                    "host_mem_gib", "rss_peak_gib"):  # fmt: skip
            assert float(r[key]) > 0, key
        assert float(r["step_time_p20_s"]) <= float(r["step_time_s"]) <= float(r["step_time_p80_s"])
        assert float(r["mfu_full_attention"]) > float(r["mfu"])
        # The full square counts the attention core twice: the difference is its causal share.
        full_minus_causal = float(r["flops_per_step_full_attention"]) - float(r["flops_per_step"])
        assert float(r["attention_flops_per_step"]) == pytest.approx(full_minus_causal, rel=1e-12)
        assert r["device_mem_simulated"] == "True" and r["git_commit"]
    assert all(r["n_layers"] == "2" for r in rows), "rows record the depth trained (llama-tiny: 2)"
    assert "(2/2 done, 0 to go)" in proc.stdout
    assert (sweep / "memory_mfu.png").stat().st_size > 10_000
    for job in ("0", "1"):
        assert json.loads((sweep / job / "result.json").read_text())["status"] == "ok"


@pytest.mark.distributed
def test_oom_is_a_row_the_sweep_goes_on_and_reruns_skip(tmp_path):
    sweep = tmp_path / "sweep"
    # 16K tokens exceed a 5 MiB simulated device; 512 tokens do not. The bad point runs first.
    args = ["-m", "model=llama-tiny", "parallel=ulysses", "seq_len=16384,512", "gpus=1", "steps=1",
            "warmup_steps=0", "max_device_memory=0.005", "chunks=1,4", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = _run("experiments.run", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {int(r["seq_len"]): r for r in read_csv(sweep / "results.csv")}
    assert len(rows) == 2, "ulysses ignores chunks: chunks=1,4 is one point per seq_len"
    oom = rows[16384]
    assert oom["status"] == "oom" and "out of memory" in oom["error"]
    # Readable units, and the row says how far memory got before the failure and what the cap was.
    assert "MiB" in oom["error"] and "0.000 GiB" not in oom["error"]
    assert 0 < float(oom["device_mem_peak_gib"]) and float(oom["max_device_memory"]) == 0.005
    assert rows[512]["status"] == "ok"
    assert proc.stdout.count(f"skipped: already in {sweep} (as chunks=1: ulysses takes no chunks)") == 2
    again = _run("experiments.run", *args, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skipped") == 4
    assert again.stdout.count("skipped: already in") == 4  # every point, two of them as chunks=1's
    assert again.stdout.count("(as chunks=1: ulysses takes no chunks)") == 2
    assert len(read_csv(sweep / "results.csv")) == 2


@pytest.mark.distributed
def test_bad_point_is_recorded_with_a_clear_error(tmp_path):
    proc = _run("experiments.run", "seq_len=1004", "chunks=4", "gpus=2", f"hydra.run.dir={tmp_path / 'run'}",
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    row = json.loads((tmp_path / "run" / "result.json").read_text())
    assert row["status"] == "error"
    assert "seq_len=1004 is not divisible by sp*chunks=8; use a multiple of 8" in row["error"]
    assert f"row: {tmp_path / 'run' / 'results.csv'}" in proc.stdout  # a single run says where its row went
    assert not list((tmp_path / "run").glob("*.log")), "no empty Hydra log files in the job directory"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_torchrun_runs_ranks_as_workers(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "experiments.run", "parallel=fpdt", "seq_len=512", "chunks=2", "gpus=2", "steps=1",
           "warmup_steps=0", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "result.json").read_text())
    assert row["status"] == "ok" and row["gpus"] == 2


@pytest.mark.distributed
def test_max_seqlen_with_a_memory_cap(tmp_path):
    args = ["model=llama-tiny", "parallel=ulysses", "gpus=1", "steps=1", "warmup_steps=0",
            "max_device_memory=0.004", "search.start=512", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = _run("experiments.max_seqlen", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "max_seqlen.json").read_text())
    assert summary["status"] == "ok" and summary["max_seq_len"] >= 512
    probes = load_results(tmp_path / "run" / "results.csv")
    assert len(probes) == summary["probes"]
    for p in probes:  # every probe is a row, and the answer separates fits from failures
        assert (p["status"] == "ok") == (p["seq_len"] <= summary["max_seq_len"])
    assert summary["first_failure"] - summary["max_seq_len"] <= max(1, 0.1 * summary["max_seq_len"])


@pytest.mark.distributed
def test_hung_point_times_out_and_token_file_is_read(tmp_path):
    import numpy as np

    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 96, size=5000, dtype=np.uint16).tofile(tokens)
    sweep = tmp_path / "sweep"
    # timeout_s=0.5 cannot even start the workers: that point becomes a `timeout` row, which the
    # next point (same experiment, longer timeout) retries instead of skipping.
    args = ["-m", "model=llama-tiny", "parallel=fpdt", "seq_len=512", "chunks=2", "gpus=1", "steps=1",
            "warmup_steps=0", f"data.path={tokens}", "timeout_s=0.5,600", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = _run("experiments.run", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timeout: no result after timeout_s=0.5 s; ranks killed" in proc.stdout
    rows = read_csv(sweep / "results.csv")
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["data_path"] == str(tokens)
    # A token file shorter than a sequence is a clear error, not a crash of the sweep.
    short = tmp_path / "short.bin"
    np.zeros(100, dtype=np.uint16).tofile(short)
    proc = _run("experiments.run", "seq_len=512", "chunks=2", "gpus=1", f"data.path={short}",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    row = json.loads((tmp_path / "run" / "result.json").read_text())
    assert proc.returncode == 1 and row["status"] == "error" and "needs at least 513" in row["error"]


# ----------------------------------------------------------------------------- error paths


def _row(key, **kw):
    return {"key": key, "status": "ok", "model": "llama-tiny", "strategy": "fpdt", "seq_len": 512, "chunks": 2,
            "gpus": 1, **kw}  # fmt: skip


def test_unreadable_point_is_skipped_with_a_warning_and_rerun(tmp_path):
    from experiments.figures.plots import load_results
    from experiments.sweep.results import find_point, load_points, record_point

    sweep = tmp_path / "sweep"
    record_point(sweep, sweep / "0", _row("a", seq_len=512))
    record_point(sweep, sweep / "1", _row("b", seq_len=1024))
    bad = sweep / "points" / "b.json"
    bad.write_text(bad.read_text()[:40])  # a write killed half way
    with pytest.warns(UserWarning, match=f"unreadable result {bad}"):
        assert find_point(sweep, "b") is None  # counts as not run: the sweep runs it again
    with pytest.warns(UserWarning, match="b.json"):
        assert [r["key"] for r in load_points(sweep)] == ["a"]
    with pytest.warns(UserWarning, match="b.json"):
        assert [r["seq_len"] for r in load_results(sweep)] == [512]  # figures and notebooks too
    with pytest.warns(UserWarning, match="b.json"):
        record_point(sweep, sweep / "2", _row("c", seq_len=2048))
    assert [int(r["seq_len"]) for r in read_csv(sweep / "results.csv")] == [512, 2048]
    record_point(sweep, sweep / "1", _row("b", seq_len=1024))  # the re-run replaces the bad file
    assert len(load_points(sweep)) == 3


def test_skip_reason_names_the_collapsed_point():
    from experiments.sweep.controller import _skip_reason

    point = Point(model="llama-tiny", strategy="ulysses", seq_len=64, chunks=1, requested_chunks=4)
    assert _skip_reason(point, Path("s")) == "already in s (as chunks=1: ulysses takes no chunks)"
    assert _skip_reason(point.replace(requested_chunks=1), Path("s")) == "already in s"


def test_readable_units():
    from experiments.core.units import GIB, MIB, byte_unit, format_bytes, format_tokens

    assert format_bytes(0.007 * GIB) == "7.17 MiB" and format_bytes(46.2 * GIB) == "46.2 GiB"
    assert format_bytes(1800 * GIB) == "1800 GiB" and format_bytes(512) == "512 B" and format_bytes(None) == "-"
    assert byte_unit([3 * MIB, 0.5 * GIB]) == ("MiB", MIB) and byte_unit([2 * GIB]) == ("GiB", GIB)
    assert format_tokens(4096) == "4K" and format_tokens(1 << 20) == "1M" and format_tokens(1536) == "1.5K"


def test_cpu_peak_is_measured_once_per_machine(tmp_path, monkeypatch):
    from experiments.core import hardware

    monkeypatch.setenv(hardware.CACHE_ENV_VAR, str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "measure_matmul_tflops", lambda *a, **k: calls.append(1) or 0.123)
    first, how = hardware.cpu_peak_tflops()
    again, how_again = hardware.cpu_peak_tflops()
    assert first == again == 0.123 and len(calls) == 1
    assert "measured once on this machine" in how and str(tmp_path) in how_again


def test_same_bad_input_same_message_from_every_entry_point():
    from experiments.plan import estimate
    from experiments.sweep.points import check_point, resolve_point

    point = resolve_point(_compose(["model=llama3-8b", "parallel=fpdt", "gpus=3", "seq_len=3072", "chunks=4"]))
    with pytest.raises(ValueError, match="H=32 query heads are not divisible by P=3") as run_err:
        check_point(point)
    # The planner blames the heads too, not the chunk size 3 does not divide.
    with pytest.raises(ValueError, match="H=32 query heads are not divisible by P=3") as plan_err:
        estimate("llama3-8b", "fpdt", 3, "a100-80g", 3 << 20)
    assert str(run_err.value) == str(plan_err.value)
    with pytest.raises(ValueError, match="'local' runs in one process"):
        check_point(resolve_point(_compose(["parallel=local", "gpus=2"])))
    # usp's split names the key the user set, and what would be right.
    usp = ["model=llama-tiny", "parallel=usp", "parallel.ulysses_degree=3", "gpus=4", "seq_len=4096"]
    with pytest.raises(ValueError, match=r"ulysses_degree=3 must divide the sp=4 .* use one of \[1, 2, 4\]") as run_err:
        check_point(resolve_point(_compose(usp)))
    with pytest.raises(ValueError) as plan_err:
        estimate("llama-tiny", "usp", 4, "cpu", 4096, max_device_memory=1.0, ulysses_degree=3)
    assert str(run_err.value) == str(plan_err.value)


def test_plan_cli_only_checks_what_its_strategies_use(capsys):
    from experiments import plan

    # An FPDT-only chunk size that does not split over 3 GPUs is no error when only ulysses is planned.
    text = plan.main(["model=gpt-tiny", "gpus=2", "hardware=cpu", "max_device_memory=0.02", "fsdp=false",
                      "strategies=[ulysses]", "chunk_tokens=3"])  # fmt: skip
    assert "max seq_len ulysses" in text and "fpdt" not in text


def test_help_lists_presets_not_schema_nodes(tmp_path):
    for module in ("experiments.run", "experiments.plan"):
        proc = _run(module, "--help", cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "llama-tiny" in proc.stdout and "_schema" not in proc.stdout


def test_library_layers_point_one_way():
    """``parallel`` never imports ``models`` or ``experiments``; ``models`` never imports ``experiments``.
    Neither imports Dynamo (about 2.5 s of every rank's start) until something compiles."""
    for package, forbidden in (("parallel", ("models", "experiments")), ("models", ("experiments",))):
        code = (f"import sys, {package}; bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r}]; "
                "assert not bad, bad; assert 'torch._dynamo' not in sys.modules")  # fmt: skip
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    # Nor does an eager FPDT step through the functions torch.compile must run behind a graph
    # break (the pipeline, the layer checkpointed to host memory), nor the simulated device's
    # tracker (a dispatch mode, which torch would wrap in its lazy Dynamo disable).
    code = ("import sys, torch; from models import Transformer, get_config; from parallel import SPGroup, parallelize; "
            "from experiments.core.memory import MemoryTracker; "
            "cfg = get_config('llama-tiny', n_layers=1, checkpoint=True, checkpoint_on_host=True); "
            "m = parallelize(Transformer(cfg), 'fpdt', group=SPGroup.single(), chunks=2, offload=True); "
            "t = torch.randint(0, 96, (1, 64)); tracker = MemoryTracker(); "
            "exec('with tracker: m(t, labels=t).backward()'); "
            "assert tracker.peak['device'] > 0, tracker.peak; assert 'torch._dynamo' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_backward_order_reaches_the_fpdt_runner(monkeypatch):
    # parallel.backward_order: composed and checked by the schema, recorded in the point (only for
    # the chunk pipeline), kept out of the point's key at its default (older sweeps keep their
    # keys), and handed through parallelize to the schedule the runner builds.
    import parallel.fpdt as fpdt
    from experiments.sweep.points import resolve_point
    from experiments.sweep.results import point_key
    from models import Transformer, get_config
    from parallel import SPGroup, parallelize

    base = ["model=llama-tiny", "seq_len=256", "chunks=2"]
    query = resolve_point(_compose([*base, "parallel=fpdt", "parallel.backward_order=query"]))
    auto = resolve_point(_compose([*base, "parallel=fpdt"]))
    assert (query.backward_order, auto.backward_order) == ("query", "auto")
    assert resolve_point(_compose([*base, "parallel=ulysses", "parallel.backward_order=kv"])).backward_order == "auto"
    assert point_key(auto) == point_key({k: v for k, v in auto.as_dict().items() if k != "backward_order"})
    assert point_key(query) != point_key(auto)
    with pytest.raises((ConfigCompositionException, Exception)) as info:
        OmegaConf.to_object(_compose([*base, "parallel=fpdt", "parallel.backward_order=outer"]))
    assert not isinstance(info.value, AssertionError)

    built = []
    real = fpdt.backward_schedule
    monkeypatch.setattr(fpdt, "backward_schedule", lambda *a, **k: built.append(k["order"]) or real(*a, **k))
    # llama-tiny is GQA (2:1); at u=4 the query order moves fewer bytes (at u=2 they tie: kv).
    for order, want in (("kv", "kv"), ("query", "query"), ("auto", "query")):
        model = parallelize(Transformer(get_config("llama-tiny", n_layers=1)), "fpdt", group=SPGroup.single(),
                            chunks=4, offload=True, backward_order=order)  # fmt: skip
        tokens = torch.randint(0, 96, (1, 256))
        model(tokens, labels=tokens).backward()
        assert built[-1] == want, (order, built)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_layers=0"], r"model.n_layers=0 must be >= 1"),
        (["max_device_memory=-1"], r"max_device_memory=-1.0 must be > 0"),
        (["max_host_memory=0"], r"max_host_memory=0.0 must be > 0"),
        (["timeout_s=0"], r"timeout_s=0.0 must be > 0"),
        (["hardware=h200"], r"hardware=h200 is a GPU preset .* use hardware=auto"),
        (["hardware.peak_tflops=-5"], r"hardware.peak_tflops=-5.0 must be a number > 0"),
        (["parallel=ulysses", "gpus=2", "chunks=-3"], r"chunks=-3 must be >= 1"),
    ],
)
def test_run_rejects_limits_and_presets_that_cannot_mean_anything(overrides, message):
    from experiments.sweep.points import check_point, resolve_point

    if torch.cuda.is_available() and overrides == ["hardware=h200"]:
        pytest.skip("a GPU preset is right on a GPU")
    with pytest.raises(ValueError, match=message):
        check_point(resolve_point(_compose(["model=llama-tiny", "parallel=fpdt", *overrides])))
    # A GPU preset describes the device that fake tensors simulate: no MFU is computed there.
    if overrides == ["hardware=h200"]:
        check_point(resolve_point(_compose(["model=llama-tiny", "parallel=fpdt", "fake_tensors=true", *overrides])))


def test_fields_given_with_hardware_auto_override_the_detected_preset():
    """``hardware.peak_tflops=...`` with the default ``hardware=auto`` is the peak MFU divides by
    (it was dropped for the detected preset's) and the row's source says it was given."""
    from experiments.core.hardware import detect_preset_name, load_preset
    from experiments.sweep.points import resolve_point

    point = resolve_point(_compose(["model=llama-tiny", "parallel=fpdt", "hardware.peak_tflops=2.5"]))
    assert point.peak_tflops == 2.5 and point.hardware == detect_preset_name()
    name = detect_preset_name()
    source = load_preset(name).get("source")
    assert point.peak_tflops_source == f"hardware.peak_tflops=2.5 given, over preset {name}'s values ({name}: {source})"


def test_max_seqlen_probes_are_reused_from_the_directory(tmp_path, monkeypatch):
    # A probe with an ok or oom row in this directory is not measured again; error and timeout
    # rows are (as a sweep re-run treats its points).
    import experiments.sweep.max_seqlen as ms
    from experiments.sweep.points import resolve_point

    base = resolve_point(_compose(["model=llama-tiny", "parallel=fpdt", "chunks=2", "max_device_memory=0.01"]))
    statuses = iter(["ok", "timeout", "oom"])
    measured = []

    def fake_measure(point, probe_dir):
        measured.append(point.seq_len)
        return {"status": next(statuses), "key": ms.point_key(point), "seq_len": point.seq_len, "error": None}

    monkeypatch.setattr(ms, "measure", fake_measure)
    prober = ms._Prober(base, None, tmp_path)
    assert [prober(s)["status"] for s in (512, 1024, 512, 1024)] == ["ok", "timeout", "ok", "oom"]
    assert measured == [512, 1024, 1024]  # the timeout ran again, the ok row was reused
