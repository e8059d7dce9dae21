"""The one place that decides which implementation runs the attention ops.

Backends: ``triton`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``torch`` (PyTorch's
memory-efficient CPU flash kernel; the fast choice for CPU runs), ``cudnn`` (PyTorch's cuDNN
attention ops, CUDA only: a comparator and fallback; ``attention/cudnn.py`` says what it cannot
do) and ``naive`` (the materialising reference, for debugging). Automatic choice: ``triton`` for CUDA tensors,
``triton`` for CPU tensors when the interpreter is on, ``torch`` otherwise.

Force one with ``set_backend("torch")``, the context manager ``use_backend("naive")``, or the
environment variable ``FPDT_ATTENTION_BACKEND`` (read at every call, so worker processes inherit
it). Order of precedence: ``use_backend``/``set_backend``, then the variable, then automatic.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

BACKENDS = ("triton", "torch", "cudnn", "naive")
ENV_VAR = "FPDT_ATTENTION_BACKEND"

_forced: str | None = None


def _check_name(name: str | None) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS} (or None = auto)")


def triton_interpreter_on() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _release(version: str) -> tuple[int, ...]:
    """``"3.6.0+git1a2b"`` -> ``(3, 6, 0)``: the leading numeric fields of a version string."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_interpreter_runs() -> None:
    """Raise if this Triton's CPU interpreter cannot run our kernels beside this NumPy (called
    when the kernels' module is imported under the interpreter, never while Dynamo traces).

    Triton 3.6 and older (torch 2.11 pins 3.6) turn a one-element array into a Python int with
    ``int(array)``, which NumPy 2.4 refuses for arrays with a dimension: every kernel whose loop
    bound is a scalar argument then fails deep inside the interpreter. Triton 3.7 fixed it.
    """
    import numpy
    import triton

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        raise RuntimeError(
            f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run with NumPy "
            f"{numpy.__version__}: it converts one-element arrays to ints, which NumPy 2.4 refuses. "
            "Install 'numpy<2.4' or triton>=3.7, or use the torch backend on CPU "
            "(fpdt_kernels.set_backend('torch'))."
        )


def set_backend(name: str | None) -> None:
    """Force a backend for every later call in this process (``None`` restores automatic)."""
    global _forced
    _check_name(name)
    _forced = name


def get_forced_backend() -> str | None:
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run a block of code with ``name`` forced, restoring the previous choice afterwards."""
    global _forced
    _check_name(name)
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def resolve_backend(where: torch.Tensor | torch.device | str) -> str:
    """The backend that will run for tensors on ``where`` (a tensor, or its device); raises if it
    cannot run there."""
    if isinstance(where, torch.Tensor):
        device = where.device
    elif isinstance(where, torch.device | str):
        device = torch.device(where)
    else:
        raise TypeError(f"resolve_backend takes a tensor or a torch.device, got {type(where).__name__}")
    name = _forced or os.environ.get(ENV_VAR) or None
    _check_name(name)
    if name is None:
        if device.type == "cuda" or triton_interpreter_on():
            name = "triton"
        else:
            name = "torch"
    if name == "cudnn" and device.type != "cuda":
        raise ValueError(
            f"the cudnn backend runs PyTorch's cuDNN attention, which needs CUDA tensors; got {device.type} "
            "tensors. Use the torch backend on CPU (fpdt_kernels.set_backend('torch')), or triton on a GPU."
        )
    if name == "torch" and device.type != "cpu":
        return "naive"  # the torch backend is PyTorch's CPU flash kernel; elsewhere, plain math
    if name == "triton" and device.type != "cuda" and not triton_interpreter_on():
        raise ValueError(
            f"the triton backend got {device.type} tensors; Triton runs on CUDA tensors, or on CPU "
            "tensors only with TRITON_INTERPRET=1 set before triton is imported. Move the tensors "
            "to a GPU or use the torch backend (fpdt_kernels.set_backend('torch'))."
        )
    return name
