"""Launch-time helpers shared by the Triton forward and backward kernels."""

from __future__ import annotations

import os

import torch
import triton

from ..backend import triton_interpreter_on

LOG2E = 1.4426950408889634

# Under the interpreter every autotune config would run: use one, with blocks large enough that
# numpy does the work in few steps (32x32 tiles: ~2x faster than 16x16 on the test shapes).
INTERPRET = triton_interpreter_on()

AUTOTUNE_ENV_VAR = "FPDT_AUTOTUNE"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The configs autotune may choose from: all of them, or only the last (the small tile that
    fits every head dim) under the interpreter or with ``FPDT_AUTOTUNE=0``.

    ``FPDT_AUTOTUNE=0`` (read at import) trades kernel speed for start-up time: one compile per
    kernel variant instead of one per config, for smoke tests and debugging, never for timings.
    """
    if INTERPRET or os.environ.get(AUTOTUNE_ENV_VAR, "1") == "0":
        return configs[-1:]
    return configs


def head_dim_block(d: int) -> int:
    # Pad d to a power of two (and to 16: tl.dot needs K >= 16 on GPU); masked in the kernel.
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (users choose fp32 for accuracy; TF32 would keep only
    # 10 mantissa bits). For fp16/bf16 the argument has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


# Beyond this many rows or keys the best tile no longer changes, and autotuning at the full length
# is costly (every config runs ~7 times: at S=128K, H=32 that was ~1 minute per kernel on an H200).
SEQ_BUCKET_CAP = 1 << 14


def seq_bucket(n: int) -> int:
    """Autotune key for a length: re-tune per power of two up to ``SEQ_BUCKET_CAP``, not per length."""
    return triton.next_power_of_2(max(1, min(n, SEQ_BUCKET_CAP)))


def prune_configs(configs, named_args, **kwargs):
    """Keep the small tiles (at most 64x64, at most 2 stages) where large ones cannot fit: head
    dims over 128, and fp32 products in IEEE precision (no tensor cores: 4-byte tiles and FMA
    products spill and take minutes to compile). Falls back to the last config, the smallest."""
    get = lambda name: named_args.get(name, kwargs.get(name))
    bd, precision = get("BD"), get("PRECISION")
    if (bd is None or bd <= 128) and precision != "ieee":
        return configs
    kept = [c for c in configs if c.kwargs["BM"] <= 64 and c.kwargs["BN"] <= 64 and c.num_stages <= 2]
    return kept or configs[-1:]
