"""Torch dtypes by short name (``bf16``, ``fp16``, ``fp32``). The configs' ``precision`` (and
the old ``dtype`` key, ``bf16``/``fp32`` only) resolve in ``experiments.training.precision``,
not here."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Config values: a name of DTYPES, or auto.
DTYPE_NAMES = ("auto", *DTYPES)


def resolve_dtype(name: str, cuda: bool) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU (the CPU kernels and the simulated device run fp32)."""
    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}; use one of {DTYPE_NAMES}")
    return DTYPES[name]


def dtype_bytes(name: str, cuda: bool) -> int:
    """Bytes per element of the named training dtype."""
    return resolve_dtype(name, cuda).itemsize


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (as result rows print it)."""
    return str(dtype).removeprefix("torch.")
