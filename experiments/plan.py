"""Plan a run before booking the GPUs: memory, step time, MFU and the longest sequence that fits.

A first-principles model (:mod:`experiments.plan_model`, formulas in ``experiments/PLANNER.md``)
for a model preset, strategy (``local | ulysses | fpdt``), ``gpus`` and hardware preset::

    python -m experiments.plan model=llama3-8b gpus=4 hardware=a100-80g
    python -m experiments.plan model=llama3-70b gpus=32 hardware=h100-sxm chunk_tokens=131072
    python -m experiments.plan model=llama-tiny gpus=2 hardware=cpu max_device_memory=0.01 fsdp=false

    from experiments.plan import estimate, max_seq_len
    max_seq_len("llama3-8b", "fpdt", 4, "a100-80g")                  # tokens
    e = estimate("llama3-8b", "fpdt", 4, "a100-80g", seq_len=1 << 20)
    e.device_peak, e.host_node, e.step_time_s, e.mfu, e.copy_overhead, e.fits

Defaults are the paper's recipe for every strategy: activation checkpointing with the
checkpoints in host memory, FSDP (ZeRO-3) sharding, 64K-token FPDT chunks; offload and MLP/loss
tiling follow ``conf/parallel/<strategy>.yaml`` (on for ``fpdt``, off for ``ulysses``/``local``).
Efficiency factors (achieved fraction of peak) are stated defaults: no GPU measurement exists
in ``experiments/results/`` yet.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from models import get_config
from models.transformer import default_tiles
from parallel.all_to_all import check_heads

from .flops import step_flops
from .hardware import load_preset
from .plan_model import Rates, Setup, attention_layer_seconds, memory, step_seconds

GIB = float(1 << 30)
STRATEGIES = ("local", "ulysses", "fpdt")
PARALLEL_CONF = Path(__file__).resolve().parent.parent / "conf" / "parallel"

# Achieved fraction of peak FLOP/s. Stated defaults, not measurements (no GPU run exists yet):
# large bf16 GEMMs reach ~70% of the datasheet on A100/H100; FlashAttention-2 reaches ~40-50%
# (DESIGN.md: ~370 of 989 TFLOP/s forward on H100, less backward).
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
HOST_USABLE = 0.90
# CPU "hardware": copies and collectives run at memory speed (a stated default).
CPU_COPY_GBPS = 10.0
# A chunk size "hides" the host-device traffic when the pipeline is at most this much slower
# than the same pipeline with free copies.
HIDE_TOLERANCE = 0.05
# max_seq_len stops bisecting when the gap is within 1/RESOLUTION of the answer (or one granule).
RESOLUTION = 64
# Chunk sizes tried by recommend_chunk_tokens: at most this many chunks (the schedule has u^2 blocks).
MAX_CHUNKS = 128


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
    conf = OmegaConf.to_container(OmegaConf.load(PARALLEL_CONF / f"{strategy}.yaml"))
    return {k: bool(conf.get(k, False)) for k in ("offload", "chunked_mlp", "chunked_loss")}


@functools.cache
def _cpu_peak_tflops() -> float:
    from .hardware import measure_matmul_tflops

    return measure_matmul_tflops()


def _hardware(name: str, max_device_memory: float | None, peak_tflops: float | None) -> dict:
    hw = load_preset(name)
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
        "host_bytes": int((hw.get("host_memory_gib") or 0) * GIB * HOST_USABLE) if not cpu else None,
        "peak_tflops": peak_tflops or hw.get("peak_tflops") or _cpu_peak_tflops(),
        "pcie_gbps": hw.get("pcie_gbps") or CPU_COPY_GBPS,
        "nvlink_gbps": hw.get("nvlink_gbps") or CPU_COPY_GBPS,
    }


def _chunks(strategy: str, seq_len: int, gpus: int, chunks: int | None, chunk_tokens: int) -> int:
    if strategy != "fpdt":
        return 1
    if chunks is not None:
        if chunks < 1:
            raise ValueError(f"chunks={chunks} must be >= 1")
        return chunks
    if chunk_tokens < 1 or chunk_tokens % gpus:
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
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    if gpus < 1:
        raise ValueError(f"gpus={gpus} must be >= 1")
    if strategy == "local" and gpus != 1:
        raise ValueError(f"strategy 'local' runs on one GPU; got gpus={gpus} (use ulysses or fpdt)")
    n_layers = switches.pop("n_layers", None)
    cfg = get_config(model, **({"n_layers": n_layers} if n_layers else {}))
    check_heads(cfg.n_heads, cfg.n_kv_heads, gpus)
    hw = _hardware(hardware, switches.pop("max_device_memory", None), switches.pop("peak_tflops", None))
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    u = _chunks(strategy, seq_len, gpus, chunks, chunk_tokens)
    if seq_len % (gpus * u):
        raise ValueError(f"seq_len={seq_len} is not divisible by gpus*chunks={gpus * u}; use a multiple of {gpus * u}")
    if switches.get("fsdp") and gpus == 1:
        switches["fsdp"] = False  # FSDP shards over the sequence-parallel group; nothing to shard
    preset = _strategy_preset(strategy)
    dtype = switches.pop("dtype", "auto")
    bytes_of = {"auto": 4 if hw["cpu"] else 2, "fp32": 4, "bf16": 2, "fp16": 2}
    if dtype not in bytes_of:
        raise ValueError(f"dtype={dtype!r}; use one of {sorted(bytes_of)}")
    s = seq_len // gpus
    mlp_default, loss_default = default_tiles(s, u)
    mlp_tile = switches.get("mlp_tile") or mlp_default
    loss_tile = switches.get("loss_tile") or loss_default
    st = Setup(
        cfg=cfg,
        strategy=strategy,
        gpus=gpus,
        seq_len=seq_len,
        chunks=u,
        dtype_bytes=bytes_of[dtype],
        activation_checkpointing=switches["activation_checkpointing"],
        checkpoint_offload=switches["checkpoint_offload"] and switches["activation_checkpointing"],
        offload=strategy == "fpdt" and _pick(switches.get("offload"), preset["offload"]),
        fsdp=switches["fsdp"],
        chunked_mlp=_pick(switches.get("chunked_mlp"), preset["chunked_mlp"]),
        chunked_loss=_pick(switches.get("chunked_loss"), preset["chunked_loss"]),
        mlp_tile=mlp_tile,
        loss_tile=loss_tile,
        simulated_device=hw["cpu"],
    )
    return st, hw


def _pick(value, default):
    return default if value is None else bool(value)


def _rates(st: Setup, hw: dict, dense_efficiency: float, attention_efficiency: float) -> Rates:
    peak = hw["peak_tflops"] * 1e12
    intra = st.gpus <= GPUS_PER_NODE
    link = (hw["nvlink_gbps"] if intra else INTER_NODE_GBPS) * 1e9 * COMM_EFFICIENCY
    return Rates(
        dense_flops=peak * dense_efficiency,
        attention_flops=peak * attention_efficiency,
        pcie_bytes=hw["pcie_gbps"] * 1e9,
        a2a_bytes=link,
        fsdp_bytes=link,
    )


def estimate(
    model: str,
    strategy: str,
    gpus: int,
    hardware: str,
    seq_len: int,
    *,
    chunks: int | None = None,
    chunk_tokens: int = 65536,
    activation_checkpointing: bool = True,
    checkpoint_offload: bool = True,
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
    dense_efficiency: float = DENSE_EFFICIENCY,
    attention_efficiency: float = ATTENTION_EFFICIENCY,
) -> Estimate:
    """Predicted per-rank device memory by part, host memory, step time and MFU for one ``seq_len``.

    ``chunks`` (FPDT's ``u``) overrides ``chunk_tokens`` (global chunk ``C``; ``u = S/C``, 1 when
    ``S <= C``). ``offload``, ``chunked_mlp``, ``chunked_loss``: ``None`` = the strategy's preset.
    ``dtype``: ``auto`` = fp32 on ``hardware=cpu`` (as the CPU runs train), bf16 otherwise.
    ``max_device_memory`` (GiB per rank) caps the device (required for ``hardware=cpu``).
    ``ValueError`` on an unknown preset, head counts that do not split over ``gpus``, or a chunk
    size that does not divide ``seq_len``.
    """
    switches = dict(
        activation_checkpointing=activation_checkpointing,
        checkpoint_offload=checkpoint_offload,
        fsdp=fsdp,
        offload=offload,
        chunked_mlp=chunked_mlp,
        chunked_loss=chunked_loss,
        mlp_tile=mlp_tile,
        loss_tile=loss_tile,
        dtype=dtype,
        n_layers=n_layers,
        max_device_memory=max_device_memory,
        peak_tflops=peak_tflops,
    )
    st, hw = _setup(model, strategy, gpus, hardware, seq_len, chunks, chunk_tokens, switches)
    mem = memory(st)
    rates = _rates(st, hw, dense_efficiency, attention_efficiency)
    time = step_seconds(st, rates)
    overhead = 0.0
    if st.strategy == "fpdt" and st.offload:
        ideal = attention_layer_seconds(st, rates, copies=False)
        overhead = time.parts["attention"] / (st.cfg.n_layers * ideal) - 1.0
    flops = step_flops(st.cfg, seq_len).causal
    ranks_per_node = min(gpus, GPUS_PER_NODE)
    host_node = mem.host_total * ranks_per_node
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
        tokens_per_s=seq_len / time.seconds,
        mfu=flops / gpus / time.seconds / (hw["peak_tflops"] * 1e12),
        copy_overhead=overhead,
        fits_device=mem.peak <= hw["device_bytes"],
        fits_host=hw["host_bytes"] is None or host_node <= hw["host_bytes"],
    )


def estimate_row(row: dict, **overrides) -> Estimate:
    """The estimate for a measured result row (``results.csv`` / ``experiments.plots.load_results``),
    with the row's model, strategy, sizes, switches, dtype and device cap; ``overrides`` win."""

    def flag(key):
        value = row.get(key)
        return value if isinstance(value, bool) else str(value) == "True"

    def number(key):
        value = row.get(key)
        return None if value in (None, "", "None") else float(value)

    hardware = row.get("hardware") or "cpu"
    kwargs = dict(
        chunks=int(row["chunks"]),
        activation_checkpointing=flag("activation_checkpointing"),
        checkpoint_offload=flag("checkpoint_on_host"),
        fsdp=flag("fsdp"),
        offload=flag("offload"),
        chunked_mlp=flag("chunked_mlp"),
        chunked_loss=flag("chunked_loss"),
        dtype=row.get("dtype") or "auto",
        n_layers=None if number("n_layers") is None else int(number("n_layers")),
        max_device_memory=number("max_device_memory") or (1.0 if hardware == "cpu" else None),
        peak_tflops=number("peak_tflops") or (1.0 if hardware == "cpu" else None),
    )
    kwargs.update(overrides)
    return estimate(row["model"], row["strategy"], int(row["gpus"]), hardware, int(row["seq_len"]), **kwargs)


def _granularity(strategy: str, gpus: int, seq_len: int, chunk_tokens: int) -> int:
    if strategy == "fpdt" and seq_len > chunk_tokens:
        return chunk_tokens
    return gpus


def max_seq_len(
    model: str,
    strategy: str,
    gpus: int,
    hardware: str,
    *,
    chunk_tokens: int = 65536,
    activation_checkpointing: bool = True,
    checkpoint_offload: bool = True,
    fsdp: bool = True,
    limit: int = 1 << 30,
    **switches,
) -> int:
    """The longest ``seq_len`` whose device AND host memory fit (0 if none does).

    Doubling over powers of two, then bisection on multiples of the granularity (``gpus``, or
    ``chunk_tokens`` once FPDT has more than one chunk) until the gap to the first length that
    does not fit is one granule or ``1/RESOLUTION`` of the answer. ``switches``: the other keywords of
    :func:`estimate` (``max_device_memory`` for ``hardware=cpu``, ``offload``, ``dtype``, ...).
    """
    if chunk_tokens < 1 or chunk_tokens % gpus:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be a positive multiple of gpus={gpus}")
    kw = dict(
        chunk_tokens=chunk_tokens,
        activation_checkpointing=activation_checkpointing,
        checkpoint_offload=checkpoint_offload,
        fsdp=fsdp,
        **switches,
    )

    def fits(n: int) -> bool:
        return estimate(model, strategy, gpus, hardware, n, **kw).fits

    fixed = switches.get("chunks") if strategy == "fpdt" else None  # a fixed u instead of a chunk size
    lo = 0
    n = gpus * (fixed or 1)
    while n <= limit and fits(n):
        lo, n = n, n * 2
    if lo == 0 or n > limit:
        return lo
    hi = n  # lo fits, hi does not
    g = gpus * fixed if fixed else _granularity(strategy, gpus, hi, chunk_tokens)
    while hi - lo > max(g, lo // RESOLUTION):
        mid = (lo + hi) // 2 // g * g
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
        g = gpus * fixed if fixed else _granularity(strategy, gpus, hi, chunk_tokens)
    return lo


def recommend_chunk_tokens(model: str, gpus: int, hardware: str, seq_len: int, **switches) -> int | None:
    """The smallest power-of-two FPDT chunk (tokens) that divides ``seq_len``, fits, and hides
    the host-device traffic behind compute (replayed pipeline within ``HIDE_TOLERANCE`` of the
    same pipeline with free copies); if none hides it, the fitting one with the shortest step.
    ``None`` if no chunk size fits."""
    switches.pop("chunk_tokens", None)
    switches.pop("chunks", None)
    c, candidates = gpus, []
    while c <= seq_len:
        if seq_len % c == 0 and seq_len // c <= MAX_CHUNKS:
            candidates.append(c)
        c *= 2
    fitting = []
    for c in candidates:
        e = estimate(model, "fpdt", gpus, hardware, seq_len, chunks=seq_len // c, **switches)
        if not e.fits:
            continue
        if e.copy_overhead <= HIDE_TOLERANCE:
            return c
        fitting.append((e.step_time_s, c))
    return min(fitting)[1] if fitting else None


# --- CLI ---------------------------------------------------------------------------------------

_INT = ("gpus", "chunk_tokens", "min_seq_len", "max_seq_len", "n_layers", "mlp_tile", "loss_tile")
_FLOAT = ("max_device_memory", "peak_tflops", "dense_efficiency", "attention_efficiency")
_BOOL = ("activation_checkpointing", "checkpoint_offload", "fsdp", "offload", "chunked_mlp", "chunked_loss")
_STR = ("model", "hardware", "strategies", "dtype")


def _parse(argv: list[str]) -> dict:
    args = {"model": "llama3-8b", "gpus": 4, "hardware": "a100-80g", "chunk_tokens": 65536, "min_seq_len": 8192}
    for item in argv:
        key, sep, value = item.partition("=")
        key = key.lstrip("+").replace("-", "_")
        if not sep or key not in _INT + _FLOAT + _BOOL + _STR:
            raise ValueError(f"bad argument {item!r}; use key=value with key in {sorted(_INT + _FLOAT + _BOOL + _STR)}")
        if key in _INT:
            args[key] = int(value)
        elif key in _FLOAT:
            args[key] = float(value)
        elif key in _BOOL:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{key}={value!r}: use true or false")
            args[key] = value.lower() in ("true", "1", "yes")
        else:
            args[key] = value
    return args


def _size(n: int) -> str:
    """Bytes as ``12.3M`` (MiB) below 1 GiB, else ``46.2G`` (GiB)."""
    if n < GIB:
        return f"{n / (1 << 20):.3g}M"
    return f"{n / GIB:.3g}G" if n < 100 * GIB else f"{n / GIB:.0f}G"


def _seconds(t: float) -> str:
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the planning table; see the module docstring for the keys."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    model, gpus, hardware = args.pop("model"), args.pop("gpus"), args.pop("hardware")
    wanted = args.pop("strategies", None)
    strategies = wanted.split(",") if wanted else [s for s in STRATEGIES if s != "local" or gpus == 1]
    lo, hi = args.pop("min_seq_len"), args.pop("max_seq_len", None)
    kw = args
    maxima = {s: max_seq_len(model, s, gpus, hardware, **kw) for s in strategies}
    hi = hi or max(2 * (1 << math.ceil(math.log2(max(maxima.values()) or 1))), lo)
    where = "on host" if kw.get("checkpoint_offload", True) else "on device"
    lines = [
        f"plan: {model} on {gpus} x {hardware}; checkpoints {where}, fsdp={kw.get('fsdp', True)}, "
        f"fpdt chunk {kw['chunk_tokens']} tokens",
        "per strategy: device peak per GPU | host memory per node (M = MiB, G = GiB) | step s | MFU;  x = does not fit",
    ]
    head = f"{'seq_len':>10}" + "".join(f"  {s:^33}" for s in strategies)
    lines += [head, "-" * len(head)]
    n = 1 << max(0, math.ceil(math.log2(max(lo, gpus))))
    while n <= hi:
        row = f"{n:>10}"
        for s in strategies:
            try:
                e = estimate(model, s, gpus, hardware, n, **kw)
            except ValueError:
                row += f"  {'-':^33}"
                continue
            mark = " " if e.fits else "x"
            step = _seconds(e.step_time_s)
            cell = f"{_size(e.device_peak):>7} {_size(e.host_node):>7} {step:>9} {e.mfu:>6.1%} {mark}"
            row += f"  {cell:>33}"
        lines.append(row)
        n *= 2
    lines.append("")
    for s in strategies:
        lines.append(f"max seq_len {s:<8} {maxima[s]:>12,} tokens")
    if "fpdt" in strategies and maxima["fpdt"]:
        best = recommend_chunk_tokens(model, gpus, hardware, maxima["fpdt"], **kw)
        lines.append(f"recommended fpdt chunk at seq_len {maxima['fpdt']:,}: {best} tokens")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:
        sys.exit(f"error: {exc}")
