"""Telling storages apart, and telling tensors that have values from those that have only shapes.

A run on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and allocations, no
data and no compute; ``experiments.run fake_tensors=true``) goes through the same code as a real
one, so the code identifies storages by their identity, never by a data pointer (fake tensors
have none), and reads values only where they exist.
"""

from __future__ import annotations

import torch
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
    Dynamo is imported at the first call rather than when the decorator runs: its import costs
    about 2.5 s of every process that imports us (each rank, each command-line run), which most
    never compile. ``torch._disable_dynamo`` is torch's own lazy form of the decorator."""
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


def real_tensors():
    """A context in which tensors are real even inside a fake run: for metadata that is read back
    as values (a device mesh's rank table), never for the step's data."""
    return unset_fake_temporarily()
