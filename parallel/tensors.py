"""Telling storages apart, and telling tensors that have values from those that have only shapes.

A run on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and allocations, no
data and no compute; ``experiments.run fake_tensors=true``) goes through the same code as a real
one, so the code identifies storages by their identity, never by a data pointer (fake tensors
have none), and reads values only where they exist.
"""

from __future__ import annotations

import functools

import torch
from torch._compile import _disable_dynamo  # torch >= 2.0; imports Dynamo only when called
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily


def storage_key(t: torch.Tensor | torch.UntypedStorage) -> int | None:
    """An id of the storage under ``t`` (shared by all its views, unique among live storages);
    ``None`` for a wrapper subclass without storage of its own (FSDP's DTensor: its local tensor
    has the storage)."""
    if isinstance(t, torch.UntypedStorage):
        return t._cdata
    try:
        st = t.untyped_storage()
        if not isinstance(t, FakeTensor) and not st.data_ptr():
            return None  # a wrapper, or an empty storage
    except RuntimeError:  # a wrapper subclass that refuses to show a storage
        return None
    return st._cdata


def has_values(t: torch.Tensor) -> bool:
    """False for tensors that carry only shapes (fake or meta), and for every tensor while
    ``torch.compile`` traces (reading a value there would break the graph): checks that read
    values skip them."""
    if torch.compiler.is_compiling():
        return False
    return not isinstance(t, FakeTensor) and t.device.type != "meta"


def eager_under_compile(fn):
    """``torch.compiler.disable(fn)``: ``torch.compile`` runs ``fn`` as it is, behind a graph break.

    Dynamo is never imported on our account: its import costs about 2.5 s of every process that
    imports us (each rank, each command-line run) and 1.4 s at the first call of a lazily disabled
    function, and most processes never compile. Outside ``torch.compile``, ``is_compiling()`` is a
    plain flag and ``fn`` runs directly; while Dynamo traces the wrapper, ``is_compiling()`` is
    True and the call goes through ``torch._disable_dynamo`` (torch's lazy form of the decorator),
    the graph break."""
    disabled = _disable_dynamo(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def real_tensors():
    """A context in which tensors are real even inside a fake run: for metadata that is read back
    as values (a device mesh's rank table), never for the step's data."""
    return unset_fake_temporarily()
