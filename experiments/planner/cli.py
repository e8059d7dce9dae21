"""``python -m experiments.plan``: the planning table for a model on some GPUs, before booking them.

The same Hydra groups as ``experiments.run`` (``model=``, ``hardware=``; ``--help`` lists them),
with the planner's own keys (``conf/plan.yaml``)::

    python -m experiments.plan model=llama3-8b gpus=4 hardware=a100-80g
    python -m experiments.plan model=llama3-70b gpus=32 hardware=h100-sxm chunk_tokens=131072
    python -m experiments.plan model=llama-tiny gpus=2 hardware=cpu max_device_memory=0.01 fsdp=false
    python -m experiments.plan model=llama3-8b gpus=8 hardware=h100-sxm 'strategies=[fpdt]'

One row per ``seq_len`` of ``sp * 2^k`` tokens (powers of two where ``sp``, the sequence-parallel
degree, is one): per strategy the device peak per GPU, host memory per node, step time and MFU
(``x``: does not fit; ``-``: the length does not split for it); then each strategy's longest
``seq_len`` and the FPDT chunk recommended at it. ``ulysses_degree`` applies to the strategies
that take one (``usp``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import MISSING, DictConfig, OmegaConf

from parallel import get_strategy, strategy_names

from ..core.paths import CONF_DIR
from ..core.units import format_bytes
from ..sweep.config import DType, HardwareConf, ModelSelect, Precision
from ..training.precision import resolve_precision
from .estimate import estimate
from .search import max_seq_len, recommend_chunk_tokens


@dataclass
class PlanConfig:
    model: ModelSelect = MISSING
    hardware: HardwareConf = MISSING
    gpus: int = 4  # ranks in all
    sp: int | None = None  # sequence-parallel degree (default: gpus); dp = gpus / sp replicas
    strategies: list[str] | None = None  # default: every registered one that runs on gpus ranks
    ulysses_degree: int | None = None  # usp: ranks per Ulysses group (None: its default)
    chunk_tokens: int = 65536  # FPDT global chunk C in tokens
    min_seq_len: int = 8192  # first row of the table
    max_seq_len: int | None = None  # last row (default: the first power of two past the longest that fits)
    activation_checkpointing: bool = True
    checkpoint_on_host: bool = True
    fsdp: bool = True
    offload: bool | None = None  # None: the strategy's conf/parallel preset
    chunked_mlp: bool | None = None
    chunked_loss: bool | None = None
    mlp_tile: int | None = None
    loss_tile: int | None = None
    precision: Precision = Precision.auto  # auto: bf16-mixed on GPUs, 32-true on hardware=cpu
    dtype: DType = DType.auto  # old name: bf16 = precision bf16-true, fp32 = 32-true
    offload_states: bool = False  # FSDP: model states in host memory (needs fsdp=true)
    residual_fp32: bool = False  # bf16-mixed: the residual stream and its checkpoints in fp32
    doc_len: int | None = None  # packed documents of this many tokens (attention inside each)
    max_device_memory: float | None = None  # GiB per GPU (required for hardware=cpu)
    dense_efficiency: float | None = None  # None: the hardware preset's (fitted) value, else 0.70
    attention_efficiency: float | None = None  # None: the preset's value, else 0.45


hydra.core.config_store.ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def _seconds(t: float) -> str:
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def _size(n: int) -> str:
    return format_bytes(n).replace(" ", "")


def plan_table(cfg: DictConfig) -> str:
    """The planning table for a composed ``conf/plan.yaml``."""
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    # The composed preset, command-line overrides included (hardware.host_memory_gib=128).
    model, gpus, hardware, hw_name = c["model"]["name"], c["gpus"], c["hardware"], c["hardware"]["name"]
    strategies = c["strategies"] or [s for s in strategy_names() if not get_strategy(s).single_process or gpus == 1]
    kw = {k: c[k] for k in ("chunk_tokens", "activation_checkpointing", "checkpoint_on_host", "fsdp", "offload",
                            "chunked_mlp", "chunked_loss", "mlp_tile", "loss_tile", "dtype", "max_device_memory",
                            "dense_efficiency", "attention_efficiency", "precision", "sp",
                            "offload_states", "doc_len", "residual_fp32", "ulysses_degree")}  # fmt: skip
    kw.update(n_layers=c["model"]["n_layers"])  # the hardware's fields travel in `hardware`
    for key in ("dense_efficiency", "attention_efficiency"):
        if kw[key] is not None and not 0 < kw[key] <= 1:
            raise ValueError(f"{key}={kw[key]} must be in (0, 1]: the achieved fraction of the peak FLOP/s")
    if c["max_seq_len"] is not None and c["max_seq_len"] < c["min_seq_len"]:
        raise ValueError(f"max_seq_len={c['max_seq_len']} is below min_seq_len={c['min_seq_len']}: the table "
                         "would have no row")  # fmt: skip

    def kw_for(strategy: str) -> dict:  # ulysses_degree only where the strategy takes one
        return kw if get_strategy(strategy).uses_ulysses_degree else dict(kw, ulysses_degree=None)

    if kw["ulysses_degree"] is not None and not any(get_strategy(s).uses_ulysses_degree for s in strategies):
        raise ValueError(f"ulysses_degree={kw['ulysses_degree']} applies to usp, which the table does not "
                         f"plan ({', '.join(strategies)}); add it: 'strategies=[usp]'")  # fmt: skip
    maxima = {s: max_seq_len(model, s, gpus, hardware, **kw_for(s)) for s in strategies}
    lo = c["min_seq_len"]
    # Rows at sp * 2^k tokens (every strategy splits a length over the sp ranks).
    base = kw["sp"] or gpus
    # Up to the first row past the longest fit: one row that does not fit (a row past it would
    # only cost time: its schedules grow with the square of the chunk count).
    longest = max(maxima.values())
    hi = c["max_seq_len"] or max(base << max(0, math.floor(math.log2(max(longest, base) / base)) + 1), lo)
    if c["max_seq_len"] is None and lo > 2 * max(longest, base):
        raise ValueError(f"min_seq_len={lo} is past every length that fits (the longest: {longest:,} tokens); "
                         "lower it, or give max_seq_len for rows that do not fit")  # fmt: skip
    where = "on host" if kw["checkpoint_on_host"] else "on device"
    chunked = [s for s in strategies if get_strategy(s).takes_chunks]
    chunk = f", {'/'.join(chunked)} chunk {kw['chunk_tokens']} tokens" if chunked else ""
    layout = f" (sp={kw['sp']}, dp={gpus // kw['sp']})" if kw["sp"] and kw["sp"] != gpus else ""
    states = ", model states on host" if kw["offload_states"] else ""
    states += f", documents of {kw['doc_len']} tokens" if kw["doc_len"] else ""
    precision = resolve_precision(kw["precision"], cuda=hw_name != "cpu", dtype=kw["dtype"]).name
    sizes = [(kw["max_device_memory"] or hardware.get("device_memory_gib"), "device")]
    sizes += [(hardware.get("host_memory_gib"), "host per node")] if hw_name != "cpu" else []
    memory = " (" + ", ".join(f"{gib:g} GiB {what}" for gib, what in sizes if gib) + ")"
    lines = [
        f"plan: {model} on {gpus} x {hw_name}{memory}{layout}, precision {precision}; checkpoints {where}, "
        f"fsdp={kw['fsdp']}{states}{chunk}",
        "per strategy: device peak per GPU | host memory per node | step s | MFU;  x = does not fit",
    ]
    head = f"{'seq_len':>10}" + "".join(f"  {s:^35}" for s in strategies)
    lines += [head, "-" * len(head)]
    n = base << max(0, math.ceil(math.log2(max(lo, base) / base)))
    while n <= hi:
        row = f"{n:>10}"
        for s in strategies:
            try:
                e = estimate(model, s, gpus, hardware, n, **kw_for(s))
            except ValueError:  # this length does not split for this strategy (e.g. into chunks)
                row += f"  {'-':^35}"
                continue
            cell = f"{_size(e.device_peak):>9} {_size(e.host_node):>9} {_seconds(e.step_time_s):>7} {e.mfu:>6.1%} "
            row += f"  {cell + (' ' if e.fits else 'x'):>35}"
        lines.append(row)
        n *= 2
    lines.append("")
    for s in strategies:
        lines.append(f"max seq_len {s:<8} {maxima[s]:>12,} tokens")
    for s in chunked:
        if not maxima[s]:
            continue
        best = recommend_chunk_tokens(model, gpus, hardware, maxima[s], strategy=s, **kw_for(s))
        if best is None:
            lines.append(f"recommended {s} chunk at seq_len {maxima[s]:,}: none of the chunk sizes tried fits")
            continue
        note = "" if best == kw["chunk_tokens"] else f" (the table uses chunk_tokens={kw['chunk_tokens']})"
        lines.append(f"recommended {s} chunk at seq_len {maxima[s]:,}: {best:,} tokens{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Compose ``conf/plan.yaml`` with ``argv`` (Hydra overrides), print and return the table."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("plan", overrides=list(argv or []))
    text = plan_table(cfg)
    print(text)
    return text


@hydra.main(config_path=str(CONF_DIR), config_name="plan", version_base="1.3")
def cli(cfg: DictConfig) -> None:
    try:
        print(plan_table(cfg))
    except (ValueError, TypeError) as exc:
        sys.exit(f"error: {exc}")
