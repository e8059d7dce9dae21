"""Training batches: seeded per step, so what a step trains on depends only on the seed and the
step (never on the rank layout), and a resumed run sees the same data as an uninterrupted one.

The global batch of a step is ``batch_size * dp`` sequences of ``seq_len + 1`` tokens; data-parallel
replica ``r`` trains on sequences ``[r * batch_size, (r + 1) * batch_size)``. So ``gpus=4 sp=2
batch_size=1`` and ``gpus=1 batch_size=2`` train on exactly the same tokens.

Packed documents: each sequence is a window of whole and cut documents, and the batch carries
their boundaries as ``cu_seqlens`` (int32 offsets over the flattened ``[B * S]`` input tokens, every
row boundary a document boundary: flash-attn's varlen convention), so attention stays inside each
document. Boundaries come from a token file's end-of-document id (``eos_id``: a document ends
with it), a file of document start offsets (``index``), or, for synthetic data, seeded document
lengths with mean ``doc_len``. The labels are the next tokens as before: a document's last
position predicts the next document's first token from its own document's context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.point import Point

# The dtypes a token file may hold (``data.dtype``): unsigned or signed integers wide enough for
# a vocabulary. A float or 8-bit file would read as other numbers, and train on them silently.
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")


@dataclass(frozen=True)
class DataSpec:
    seq_len: int
    batch_size: int  # sequences per data-parallel replica
    vocab_size: int
    seed: int = 0
    path: str | None = None  # numpy memmap of token ids; None = synthetic uniform tokens
    file_dtype: str = "uint16"
    packing: bool = True  # give document boundaries where eos_id, index or doc_len define them
    eos_id: int | None = None  # token files: this id ends a document
    index: str | None = None  # token files: .npy of document start offsets (instead of eos_id)
    doc_len: int | None = None  # synthetic data: mean document length in tokens

    @property
    def packed(self) -> bool:
        return self.packing and (self.eos_id is not None or self.index is not None or self.doc_len is not None)

    def check(self) -> None:
        """Raise ``ValueError`` for settings that cannot work together."""
        if self.path is None and (self.eos_id is not None or self.index is not None):
            raise ValueError("data.eos_id and data.index describe a token file; set data.path (or use data.doc_len "
                             "for synthetic packed documents)")  # fmt: skip
        if self.path is not None and self.doc_len is not None:
            raise ValueError("data.doc_len draws synthetic documents; with data.path use data.eos_id or data.index")
        if self.eos_id is not None and self.index is not None:
            raise ValueError("give the document boundaries one way: data.eos_id or data.index, not both")
        if self.doc_len is not None and self.doc_len < 1:
            raise ValueError(f"data.doc_len={self.doc_len} must be >= 1 tokens")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"data.eos_id={self.eos_id} is not a token id of the model (vocab_size={self.vocab_size})")
        if self.file_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.dtype={self.file_dtype} is not a token dtype; use one of {', '.join(TOKEN_DTYPES)}")

    def check_files(self) -> None:
        """Raise ``ValueError`` unless the token file (and the index) can give this run's windows:
        called once before any rank starts, so a wrong path fails in seconds, not in every rank."""
        if self.path is None:
            return
        path, itemsize = Path(self.path), np.dtype(self.file_dtype).itemsize
        if not path.is_file():
            raise ValueError(f"data.path={self.path} is not a file (a numpy memmap of {self.file_dtype} token ids)")
        size = path.stat().st_size
        if size % itemsize:
            raise ValueError(f"data.path={self.path} has {size} bytes, not a whole number of {self.file_dtype} "
                             f"tokens ({itemsize} bytes each); is data.dtype right?")  # fmt: skip
        tokens = size // itemsize
        _check_length(tokens, self.seq_len)
        if self.index is not None:
            _check_index(self.index, tokens)


def _check_length(tokens: int, seq_len: int) -> None:
    """A token file gives windows of ``seq_len + 1`` ids (inputs and their next tokens)."""
    if tokens < seq_len + 1:
        raise ValueError(f"data.path has {tokens} tokens; seq_len={seq_len} needs at least {seq_len + 1}")


def _check_index(index: str, tokens: int) -> None:
    """``data.index``: a ``.npy`` of document start offsets, non-decreasing (a repeat is an empty
    document), in ``[0, tokens)``; of any integer dtype."""
    what = f"data.index must be a .npy of non-decreasing integer document start offsets in [0, {tokens})"
    if not index.endswith(".npy"):
        raise ValueError(f"{what}; {index} is not a .npy file (numpy.save writes one)")
    try:
        offsets = np.load(index, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}; reading {index} failed: {exc}") from None
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{what}; {index} holds a {offsets.dtype} array of shape {offsets.shape}")
    if len(offsets) and (offsets[0] < 0 or offsets[-1] >= tokens):
        raise ValueError(f"{what}; {index} runs from {offsets[0]} to {offsets[-1]}")
    bad = np.flatnonzero(np.diff(offsets.astype(np.int64)) < 0)  # unsigned differences would wrap
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{what}; {index} decreases at position {i + 1} ({offsets[i]} then {offsets[i + 1]})")


def _generator(spec: DataSpec, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(spec.seed * 1_000_003 + step)


def _windows(spec: DataSpec, step: int, n: int) -> tuple[torch.Tensor, list[int] | None]:
    """``n`` windows of ``seq_len + 1`` token ids and, for a token file, their start offsets."""
    S, gen = spec.seq_len, _generator(spec, step)
    if spec.path is None:
        return torch.randint(0, spec.vocab_size, (n, S + 1), generator=gen), None
    data = np.memmap(spec.path, dtype=spec.file_dtype, mode="r")
    _check_length(len(data), S)
    starts = torch.randint(0, len(data) - S, (n,), generator=gen).tolist()
    windows = torch.from_numpy(np.stack([np.asarray(data[s : s + S + 1], dtype=np.int64) for s in starts]))
    if int(windows.max()) >= spec.vocab_size:
        raise ValueError(f"data.path holds token id {int(windows.max())} >= the model's vocab_size={spec.vocab_size}")
    return windows, starts


def _row_starts(spec: DataSpec, step: int, row: int, window: torch.Tensor, offset: int | None) -> list[int]:
    """Where documents start among one window's ``seq_len`` input positions (always including 0)."""
    S = spec.seq_len
    if spec.eos_id is not None:
        ends = (window[:S] == spec.eos_id).nonzero().flatten() + 1  # a document ends with eos_id
        starts = ends[ends < S].tolist()
    elif spec.index is not None:
        offsets = np.load(spec.index, mmap_mode="r")
        lo, hi = np.searchsorted(offsets, [offset + 1, offset + S])
        # A repeated offset (an empty document) starts one document, not two.
        starts = [int(o) - offset for o in np.unique(offsets[lo:hi])]
    else:  # synthetic: geometric lengths with mean doc_len, seeded per step and row
        gen = torch.Generator().manual_seed((spec.seed * 1_000_003 + step) * 4099 + row)
        p = 1.0 / spec.doc_len
        lengths = torch.empty(S).geometric_(p, generator=gen).long()
        starts = torch.cumsum(lengths, 0)
        starts = starts[starts < S].tolist()
    return [0, *starts]


def global_batch(spec: DataSpec, step: int, dp: int) -> tuple[torch.Tensor, list[list[int]] | None]:
    """``[batch_size * dp, seq_len + 1]`` int64 token windows of ``step`` (inputs and next tokens),
    and each window's document starts (``None`` unless packed)."""
    n = spec.batch_size * dp
    windows, offsets = _windows(spec, step, n)
    if not spec.packed:
        return windows, None
    return windows, [_row_starts(spec, step, r, windows[r], offsets[r] if offsets else None) for r in range(n)]


def cu_seqlens_of(starts: list[list[int]], seq_len: int) -> torch.Tensor:
    """Flattened ``[B * seq_len]`` document offsets (int32) from each row's document starts."""
    flat = [row * seq_len + s for row, row_starts in enumerate(starts) for s in row_starts]
    return torch.tensor([*flat, len(starts) * seq_len], dtype=torch.int32)


def replica_batch(spec: DataSpec, step: int, dp: int, replica: int):
    """This replica's ``(tokens, labels, cu_seqlens)``: ``[batch_size, seq_len]`` each, before
    sequence sharding, and the documents' flattened offsets (``None`` unless packed)."""
    windows, starts = global_batch(spec, step, dp)
    rows = slice(replica * spec.batch_size, (replica + 1) * spec.batch_size)
    cu = None if starts is None else cu_seqlens_of(starts[rows], spec.seq_len)
    return windows[rows, :-1], windows[rows, 1:], cu


def data_spec(point: Point, vocab_size: int) -> DataSpec:
    """The batches a resolved point trains on (``data.*`` keys, see ``experiments.sweep.points``)."""
    spec = DataSpec(
        seq_len=point.seq_len,
        batch_size=point.batch_size,
        vocab_size=vocab_size,
        seed=point.seed,
        path=point.data_path,
        file_dtype=point.data_dtype,
        packing=point.data_packing,
        eos_id=point.data_eos_id,
        index=point.data_index,
        doc_len=point.data_doc_len,
    )
    spec.check()
    return spec


def square_tokens(spec: DataSpec, step: int, dp: int) -> int:
    """The attention's query-key pairs (before the causal halving) of the global batch of ``step``:
    the sum of every document's length squared (``batch * dp * seq_len**2`` without packing)."""
    _, starts = global_batch(spec, step, dp)
    S = spec.seq_len
    if starts is None:
        return spec.batch_size * dp * S * S
    return sum((b - a) ** 2 for row in starts for a, b in zip(row, [*row[1:], S], strict=True))
