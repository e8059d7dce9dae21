"""The planner's answer for one configuration: memory by part, step time, MFU (:func:`estimate`).

A first-principles model (:mod:`experiments.planner.model`, formulas in
``experiments/planner/PLANNER.md``) for a model preset, strategy (any registered one:
``local | ulysses | fpdt | ring | usp``), ``gpus`` and hardware preset::

    from experiments.plan import estimate
    e = estimate("llama3-8b", "fpdt", 4, "a100-80g", seq_len=1 << 20)
    e.device_peak, e.host_node, e.step_time_s, e.mfu, e.copy_overhead, e.fits

Defaults are the paper's recipe for every strategy: activation checkpointing with the
checkpoints in host memory, FSDP (ZeRO-3) sharding, 64K-token FPDT chunks; offload and MLP/loss
tiling follow ``conf/parallel/<strategy>.yaml`` (on for ``fpdt``, off for ``ulysses``/``local``).
Efficiency factors (achieved fraction of peak): the ``h200`` and ``h100-sxm`` presets carry the ones
:func:`fit_efficiencies` fitted to the GPU rows in ``experiments/results/``; other presets use
stated defaults.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from omegaconf import OmegaConf

from models import get_config
from models.transformer import default_tiles
from parallel import check_backward_order, check_mesh, get_strategy

from ..core.flops import step_flops
from ..core.hardware import (
    HARDWARE_FIELDS,
    check_hardware_numbers,
    cpu_peak_tflops,
    load_preset,
    over_preset,
    positive,
)
from ..core.paths import CONF_DIR
from ..core.units import GIB
from ..training.precision import check_residual_fp32, resolve_precision
from .model import Memory, Rates, Setup, attention_layer_seconds, memory, square_tokens, step_seconds

# Achieved fraction of peak FLOP/s where the hardware preset states none: large bf16 GEMMs reach
# ~70% of the datasheet on A100/H100; FlashAttention-2 reaches ~40-50% (~370 of 989 TFLOP/s
# forward on H100, less backward). Presets may carry fitted values (conf/hardware/h200.yaml:
# fitted to the llama3.2-1b step times measured on an H200, see fit_efficiencies).
DENSE_EFFICIENCY = 0.70
ATTENTION_EFFICIENCY = 0.45
# Fraction of link bandwidth an all-to-all or FSDP collective achieves (NCCL, large messages).
COMM_EFFICIENCY = 0.70
# Beyond one node the all-to-all crosses the network: 200 Gb/s InfiniBand per GPU (DGX-class).
GPUS_PER_NODE = 8
INTER_NODE_GBPS = 25.0
# Device memory the allocator can give out: the rest goes to the CUDA context, NCCL buffers and
# fragmentation. The CPU's simulated device has none of these.
DEVICE_USABLE = 0.90
# AdamW on the host (offload_states): parameters per second per rank, a stated default (a fused
# CPU Adam such as DeepSpeed's reaches ~1e9/s on a socket; torch's foreach AdamW on CPU tensors less).
HOST_ADAM_PARAMS_PER_S = 5e8
HOST_USABLE = 0.90
# CPU "hardware": copies and collectives run at memory speed (a stated default).
CPU_COPY_GBPS = 10.0


@dataclass(frozen=True)
class Estimate:
    """The planner's answer for one configuration and ``seq_len`` (bytes, seconds)."""

    model: str
    strategy: str
    gpus: int
    hardware: str
    seq_len: int
    chunks: int
    chunk_tokens: int
    device: dict[str, int]  # per-rank device bytes by part, at the peak
    device_peak: int
    peak_phase: str
    device_capacity: int
    host: dict[str, int]  # per-rank host bytes by part
    host_per_rank: int
    host_node: int
    host_capacity: int  # per node
    step_time_s: float
    step_parts: dict[str, float]
    tokens_per_s: float
    mfu: float
    copy_overhead: float  # FPDT: attention pipeline time / the same with free host-device copies - 1
    fits_device: bool
    fits_host: bool

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


@functools.cache
def _strategy_preset(strategy: str) -> dict:
    path = CONF_DIR / "parallel" / f"{strategy}.yaml"
    if not path.exists():
        raise ValueError(f"strategy {strategy!r} has no preset {path}: a strategy is its module under "
                         "parallel/strategies/ plus conf/parallel/<name>.yaml")  # fmt: skip
    conf = OmegaConf.to_container(OmegaConf.load(path))
    return {k: bool(conf.get(k, False)) for k in ("offload", "chunked_mlp", "chunked_loss")}


def _hardware(hardware: str | Mapping, max_device_memory: float | None, peak_tflops: float | None, ranks: int) -> dict:
    """The machine to plan for: a preset's name, or a preset as Hydra composed it (``name`` plus
    its fields, some overridden on the command line, e.g. ``hardware.host_memory_gib=128``):
    every field given there replaces the preset's. ``ranks`` share a measured CPU peak."""
    if isinstance(hardware, Mapping):
        if "name" not in hardware:
            raise ValueError(f"a hardware mapping needs the 'name' of the preset it changes, e.g. "
                             f"{{'name': 'h200', 'host_memory_gib': 128}}; got keys {sorted(hardware)}")  # fmt: skip
        unknown = sorted(set(hardware) - set(HARDWARE_FIELDS))
        if unknown:
            raise ValueError(f"unknown hardware field(s) {unknown}; a preset has {list(HARDWARE_FIELDS)}")
        hw, _ = over_preset(hardware["name"], hardware)
    else:
        hw = load_preset(hardware)
    check_hardware_numbers(hw)
    for key, value in (("max_device_memory", max_device_memory), ("peak_tflops", peak_tflops)):
        if value is not None:
            positive(key, value)
    if hw["name"] == "auto":
        raise ValueError("hardware=auto detects the machine at run time; name a preset to plan for, e.g. a100-80g")
    cpu = hw["name"] == "cpu"
    if cpu and max_device_memory is None:
        raise ValueError(
            "hardware=cpu has no device memory; give the simulated device's cap, e.g. max_device_memory=0.01 (GiB)"
        )
    device_gib = max_device_memory if max_device_memory is not None else hw["device_memory_gib"]
    return {
        "name": hw["name"],
        "cpu": cpu,
        "device_bytes": int(device_gib * GIB * (1.0 if cpu or max_device_memory is not None else DEVICE_USABLE)),
        # The CPU has no host limit of its own; hardware.host_memory_gib=... gives it one.
        "host_bytes": None
        if cpu and not hw.get("host_memory_gib")
        else int((hw.get("host_memory_gib") or 0) * GIB * HOST_USABLE),  # fmt: skip
        # The CPU's measured peak is the machine's: its ranks share it (as the runner divides it).
        "peak_tflops": peak_tflops or hw.get("peak_tflops") or cpu_peak_tflops()[0] / ranks,
        "pcie_gbps": hw.get("pcie_gbps") or CPU_COPY_GBPS,
        "nvlink_gbps": hw.get("nvlink_gbps") or CPU_COPY_GBPS,
        "dense_efficiency": hw.get("dense_efficiency") or DENSE_EFFICIENCY,
        "attention_efficiency": hw.get("attention_efficiency") or ATTENTION_EFFICIENCY,
    }


def check_counts(**counts) -> None:
    """Raise unless every value is an int >= 1 (``gpus=``, ``seq_len=``, tiles, ...)."""
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key}={value!r} must be an int >= 1, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")


def _chunks(strategy: str, seq_len: int, gpus: int, chunks: int | None, chunk_tokens: int) -> int:
    if chunks is not None:
        check_counts(chunks=chunks)  # for every strategy, as the runner checks it (the others run 1)
    if not get_strategy(strategy).takes_chunks:
        return 1
    if chunks is not None:
        return chunks
    check_counts(chunk_tokens=chunk_tokens)
    if chunk_tokens % gpus:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be a positive multiple of gpus={gpus}")
    if seq_len <= chunk_tokens:
        return 1
    if seq_len % chunk_tokens:
        raise ValueError(
            f"chunk_tokens={chunk_tokens} does not divide seq_len={seq_len}; use a seq_len that is a multiple of "
            f"{chunk_tokens} or a chunk size that divides {seq_len}"
        )
    return seq_len // chunk_tokens


def _setup(model, strategy, gpus, hardware, seq_len, chunks, chunk_tokens, switches) -> tuple[Setup, dict]:
    """``gpus`` ranks in all; the sequence-parallel degree ``P = sp`` (default: ``gpus``)."""
    check_counts(gpus=gpus, seq_len=seq_len)
    for key in ("mlp_tile", "loss_tile"):
        if switches.get(key) is not None:
            check_counts(**{key: switches[key]})
    sp = switches.pop("sp", None)
    sp = gpus if sp is None else sp
    check_mesh(gpus, sp)
    n_layers = switches.pop("n_layers", None)
    if n_layers is not None:
        check_counts(n_layers=n_layers)
    cfg = get_config(model, **({"n_layers": n_layers} if n_layers is not None else {}))
    # The strategy and the head split first: they are the cause whatever the chunk size says.
    spec = get_strategy(strategy)
    ulysses_degree = switches.pop("ulysses_degree", None)
    spec.check(spec.granule(sp, 1, ulysses_degree), sp, 1, cfg.n_heads, cfg.n_kv_heads, ulysses_degree)
    hw = _hardware(hardware, switches.pop("max_device_memory", None), switches.pop("peak_tflops", None), gpus)
    u = _chunks(strategy, seq_len, sp, chunks, chunk_tokens)
    spec.check(seq_len, sp, u, cfg.n_heads, cfg.n_kv_heads, ulysses_degree)
    offload_states = bool(switches.pop("offload_states", False))
    doc_len = switches.pop("doc_len", None)
    if doc_len is not None:
        check_counts(doc_len=doc_len)
    if offload_states and not switches.get("fsdp"):
        raise ValueError("offload_states keeps model states in host memory through FSDP; set fsdp=true")
    if switches.get("fsdp") and gpus == 1 and not offload_states:
        switches["fsdp"] = False  # one rank and nothing offloaded: nothing for FSDP to do
    preset = _strategy_preset(strategy)
    precision = resolve_precision(switches.pop("precision", "auto"), cuda=not hw["cpu"],
                                  dtype=switches.pop("dtype", "auto"))  # fmt: skip
    residual_fp32 = bool(switches.pop("residual_fp32", False)) and precision.mixed
    check_residual_fp32(residual_fp32, switches["fsdp"], fsdp_key="fsdp")
    local = seq_len // sp
    mlp_default, loss_default = default_tiles(local, u)
    st = Setup(
        cfg=cfg,
        strategy=strategy,
        gpus=sp,
        seq_len=seq_len,
        chunks=u,
        dtype_bytes=precision.compute_dtype.itemsize,
        activation_checkpointing=switches["activation_checkpointing"],
        checkpoint_on_host=switches["checkpoint_on_host"] and switches["activation_checkpointing"],
        offload=spec.offloads and _pick(switches.get("offload"), preset["offload"]),
        fsdp=switches["fsdp"],
        chunked_mlp=_pick(switches.get("chunked_mlp"), preset["chunked_mlp"]),
        chunked_loss=_pick(switches.get("chunked_loss"), preset["chunked_loss"]),
        # The chunked ops never run a tile past the rank's tokens (a larger tile is one tile).
        mlp_tile=min(switches.get("mlp_tile") or mlp_default, local),
        loss_tile=min(switches.get("loss_tile") or loss_default, local),
        simulated_device=hw["cpu"],
        world=gpus,
        param_bytes=precision.param_dtype.itemsize,
        offload_states=offload_states,
        doc_len=doc_len,
        residual_fp32=residual_fp32,
        ulysses_degree=ulysses_degree,
        legacy_recompute=bool(switches.pop("legacy_recompute", False)),
        backward_order=check_backward_order(switches.pop("backward_order", None) or "auto"),
    )
    return st, hw


def _pick(value, default):
    return default if value is None else bool(value)


def _rates(st: Setup, hw: dict, dense_efficiency: float, attention_efficiency: float) -> Rates:
    peak = hw["peak_tflops"] * 1e12

    def link(ranks: int) -> float:  # a group of consecutive ranks stays on NVLink inside a node
        gbps = hw["nvlink_gbps"] if ranks <= GPUS_PER_NODE else INTER_NODE_GBPS
        return gbps * 1e9 * COMM_EFFICIENCY

    return Rates(
        dense_flops=peak * dense_efficiency,
        attention_flops=peak * attention_efficiency,
        pcie_bytes=hw["pcie_gbps"] * 1e9,
        a2a_bytes=link(st.U),  # Ulysses groups are consecutive ranks
        fsdp_bytes=link(st.ranks),
        p2p_bytes=link(st.gpus),  # a ring over all sp ranks leaves the node once sp does
        host_adam_params=HOST_ADAM_PARAMS_PER_S,
    )


def estimate(
    model: str,
    strategy: str,
    gpus: int,
    hardware: str | Mapping,
    seq_len: int,
    *,
    chunks: int | None = None,
    chunk_tokens: int = 65536,
    activation_checkpointing: bool = True,
    checkpoint_on_host: bool = True,
    fsdp: bool = True,
    offload: bool | None = None,
    chunked_mlp: bool | None = None,
    chunked_loss: bool | None = None,
    mlp_tile: int | None = None,
    loss_tile: int | None = None,
    dtype: str = "auto",
    n_layers: int | None = None,
    max_device_memory: float | None = None,
    peak_tflops: float | None = None,
    dense_efficiency: float | None = None,
    attention_efficiency: float | None = None,
    checkpoint_offload: bool | None = None,
    precision: str = "auto",
    sp: int | None = None,
    offload_states: bool = False,
    doc_len: int | None = None,
    residual_fp32: bool = False,
    ulysses_degree: int | None = None,
    legacy_recompute: bool = False,
    backward_order: str = "auto",
) -> Estimate:
    """Predicted per-rank device memory by part, host memory, step time and MFU for one ``seq_len``.

    ``chunks`` (FPDT's ``u``) overrides ``chunk_tokens`` (global chunk ``C``; ``u = S/C``, 1 when
    ``S <= C``). ``offload``, ``chunked_mlp``, ``chunked_loss``: ``None`` = the strategy's preset.
    ``precision``: ``auto`` = ``32-true`` on ``hardware=cpu`` (as the CPU runs train),
    ``bf16-mixed`` otherwise (fp32 master weights and moments: 16 bytes per parameter; see
    ``experiments.training.precision``). ``gpus`` ranks in all, ``sp`` of them per sequence
    (default all; ``dp = gpus / sp`` replicas, each on its own sequence; FSDP shards over all).
    ``offload_states`` (with ``fsdp``) keeps the sharded model states in host memory.
    ``doc_len``: packed documents of that many tokens (attention inside documents; FPDT's
    schedules keep only the chunk blocks that share one, as the runner's do).
    ``residual_fp32``: under mixed precision, the residual stream and its checkpoints in fp32.
    ``ulysses_degree``: ``usp``'s ranks per Ulysses group (``None``: its default).
    ``legacy_recompute``: model the code before 2026-12-06, whose checkpoint recompute also ran
    the chunked MLP's forward and whose chunked loss recomputed its logits (rows measured then).
    ``backward_order``: FPDT's backward loop, ``kv``, ``query`` or ``auto`` (the runner's choice:
    the one that moves fewer bytes between host and device; rows measured before 2026-12-06 ran ``kv``).
    ``max_device_memory`` (GiB per rank) caps the device (required for ``hardware=cpu``).
    ``mlp_tile``, ``loss_tile``: tile tokens (``None``: the paper's ``C/(2P)`` and ``C/(32P)``).
    ``n_layers`` overrides the preset's depth; ``peak_tflops`` the hardware's peak;
    ``dense_efficiency``, ``attention_efficiency`` its achieved fractions of the peak (``None``:
    the preset's, else the stated defaults).
    ``hardware``: a preset's name (``conf/hardware/``), or a mapping with ``name`` whose other
    fields replace the preset's (``{"name": "h200", "host_memory_gib": 128}``).
    ``ValueError`` on an unknown preset, head counts that do not split over ``sp``, or a chunk
    size that does not divide ``seq_len``. ``dtype`` (``bf16``: ``bf16-true``, ``fp32``:
    ``32-true``) and ``checkpoint_offload`` (``checkpoint_on_host``) are old names.
    """
    args = dict(locals())  # the arguments as called: this is the function's first statement
    st, hw, mem = _setup_and_memory(args)
    fits_device, fits_host = _fits(mem, hw, gpus)
    dense, attention = dense_efficiency or hw["dense_efficiency"], attention_efficiency or hw["attention_efficiency"]
    rates = _rates(st, hw, dense, attention)
    time = step_seconds(st, rates)
    overhead = 0.0
    if st.pipelined and st.offload:
        ideal = attention_layer_seconds(st, rates, copies=False)
        overhead = time.parts["attention"] / (st.cfg.n_layers * ideal) - 1.0
    flops = step_flops(st.cfg, seq_len, square_tokens=square_tokens(st)).causal
    dp = gpus // st.gpus
    host_node = _host_node(mem, gpus)
    return Estimate(
        model=model,
        strategy=strategy,
        gpus=gpus,
        hardware=hw["name"],
        seq_len=seq_len,
        chunks=st.chunks,
        chunk_tokens=st.C,
        device=dict(mem.parts),
        device_peak=mem.peak,
        peak_phase=mem.peak_phase,
        device_capacity=hw["device_bytes"],
        host=dict(mem.host),
        host_per_rank=mem.host_total,
        host_node=host_node,
        host_capacity=hw["host_bytes"] if hw["host_bytes"] is not None else -1,
        step_time_s=time.seconds,
        step_parts=dict(time.parts),
        tokens_per_s=dp * seq_len / time.seconds,  # one sequence per data-parallel replica
        mfu=dp * flops / gpus / time.seconds / (hw["peak_tflops"] * 1e12),
        copy_overhead=overhead,
        fits_device=fits_device,
        fits_host=fits_host,
    )


def fits(*args, **kwargs) -> bool:
    """``estimate(*args, **kwargs).fits`` without the step time, whose schedule replays are most of
    an estimate's cost (what :func:`~.search.max_seq_len` asks at every length it tries)."""
    bound = inspect.signature(estimate).bind(*args, **kwargs)
    bound.apply_defaults()
    _, hw, mem = _setup_and_memory(bound.arguments)
    return all(_fits(mem, hw, bound.arguments["gpus"]))


def _setup_and_memory(args: dict) -> tuple[Setup, dict, Memory]:
    """The checked :class:`Setup` of :func:`estimate`'s arguments (a dict of all of them), the
    hardware and the memory."""
    a = dict(args)
    model, strategy, gpus, hardware, seq_len, chunks, chunk_tokens = (
        a.pop(key) for key in ("model", "strategy", "gpus", "hardware", "seq_len", "chunks", "chunk_tokens")
    )
    if a["checkpoint_offload"] is not None:
        warnings.warn("checkpoint_offload is now checkpoint_on_host", DeprecationWarning, stacklevel=3)
        a["checkpoint_on_host"] = a["checkpoint_offload"]
    for key in ("dense_efficiency", "attention_efficiency"):
        if a[key] is not None:  # above 1 only while a fit searches (fit_efficiencies); the CLI caps it at 1
            positive(key, a[key])
    not_switches = ("checkpoint_offload", "dense_efficiency", "attention_efficiency")
    switches = {k: v for k, v in a.items() if k not in not_switches}
    st, hw = _setup(model, strategy, gpus, hardware, seq_len, chunks, chunk_tokens, switches)
    return st, hw, memory(st)


def _host_node(mem: Memory, gpus: int) -> int:
    """Host bytes of one node: its ranks' (up to GPUS_PER_NODE) host memory."""
    return mem.host_total * min(gpus, GPUS_PER_NODE)


def _fits(mem: Memory, hw: dict, gpus: int) -> tuple[bool, bool]:
    """Whether the device peak fits one GPU, and a node's host memory its host."""
    return mem.peak <= hw["device_bytes"], hw["host_bytes"] is None or _host_node(mem, gpus) <= hw["host_bytes"]


def estimate_row(row: dict, **overrides) -> Estimate:
    """The estimate for a measured result row (``results.csv`` / ``experiments.figures.plots.load_results``),
    with the row's model, strategy, sizes, switches, tiles, backward order, precision and device
    cap; ``overrides`` win. A row of synthetic packed documents (``data_doc_len``: lengths drawn
    around that mean) is estimated as documents of exactly that length; documents of a token file
    (``data_eos_id``, ``data_index``) have lengths the row does not record, and are estimated as
    one sequence."""

    def flag(key):
        value = row.get(key)
        return value if isinstance(value, bool) else str(value) == "True"

    def number(key):
        value = row.get(key)
        return None if value in (None, "", "None") else float(value)

    def integer(key):
        value = number(key)
        return None if value is None else int(value)

    hardware = row.get("hardware") or "cpu"
    kwargs = dict(
        chunks=int(row["chunks"]),
        activation_checkpointing=flag("activation_checkpointing"),
        checkpoint_on_host=flag("checkpoint_on_host"),
        fsdp=flag("fsdp"),
        offload=flag("offload"),
        chunked_mlp=flag("chunked_mlp"),
        chunked_loss=flag("chunked_loss"),
        # Rows before the precision key recorded the old dtype setting (auto, fp32, bf16).
        precision=row.get("precision") or "auto",
        dtype=row.get("dtype") if not row.get("precision") and row.get("dtype") in ("fp32", "bf16") else "auto",
        sp=integer("sp"),
        offload_states=flag("offload_states"),
        residual_fp32=flag("residual_fp32"),
        n_layers=integer("n_layers"),
        ulysses_degree=integer("ulysses_degree"),
        mlp_tile=integer("mlp_tile"),
        loss_tile=integer("loss_tile"),
        backward_order=row.get("backward_order") or "auto",
        doc_len=integer("data_doc_len") if flag("data_packing") else None,
        max_device_memory=number("max_device_memory") or (1.0 if hardware == "cpu" else None),
        peak_tflops=number("peak_tflops") or (1.0 if hardware == "cpu" else None),
    )
    kwargs.update(overrides)
    return estimate(row["model"], row["strategy"], int(row["gpus"]), hardware, int(row["seq_len"]), **kwargs)


def fit_efficiencies(rows: list[dict], **overrides) -> tuple[float, float, list[float]]:
    """The ``(dense, attention)`` efficiencies that best predict the step times of measured rows
    (``results.csv`` rows with ``status=ok``), and each row's relative error with them.

    A row's predicted time is ``compute / dense + attention / attn + exposed transfers``, the first
    two at 100% efficiency; the fit minimises the squared relative errors (so long and short steps
    weigh the same). What it fits is everything the model leaves out of the two rates: kernel
    efficiency, launch and Python overheads, the FPDT pipeline's bubbles. ``overrides`` go to
    every row's :func:`estimate_row` (e.g. ``legacy_recompute=True`` for rows of older code).
    """
    import numpy as np

    ok = [r for r in rows if r.get("status") == "ok"]
    if len(ok) < 2:
        raise ValueError(f"fitting two efficiencies needs at least 2 rows with status=ok, got {len(ok)}")
    measured = np.array([float(r["step_time_s"]) for r in ok])
    dense, attention = DENSE_EFFICIENCY, ATTENTION_EFFICIENCY
    # The transfers the model exposes depend on how long the compute takes: refit at the fitted
    # rates until they settle.
    for _ in range(8):
        parts = [estimate_row(r, dense_efficiency=dense, attention_efficiency=attention, **overrides).step_parts
                 for r in ok]  # fmt: skip
        fixed = np.array([sum(v for k, v in p.items() if k not in ("compute", "attention")) for p in parts])
        full = np.array([[p["compute"] * dense, p["attention"] * attention] for p in parts])  # at 100%
        inv = np.linalg.lstsq(full / measured[:, None], 1.0 - fixed / measured, rcond=None)[0]
        dense, attention = 1.0 / inv[0], 1.0 / inv[1]
    predicted = full @ inv + fixed
    return float(dense), float(attention), [float(e) for e in predicted / measured - 1.0]
