"""Training batches: seeded per step, so what a step trains on depends only on the seed and the
step (never on the rank layout), and a resumed run sees the same data as an uninterrupted one.

The global batch of a step is ``batch_size * dp`` sequences of ``seq_len + 1`` tokens; data-parallel
replica ``r`` trains on sequences ``[r * batch_size, (r + 1) * batch_size)``. So ``gpus=4 sp=2
batch_size=1`` and ``gpus=1 batch_size=2`` train on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DataSpec:
    seq_len: int
    batch_size: int  # sequences per data-parallel replica
    vocab_size: int
    seed: int = 0
    path: str | None = None  # numpy memmap of token ids; None = synthetic uniform tokens
    file_dtype: str = "uint16"


def global_batch(spec: DataSpec, step: int, dp: int) -> torch.Tensor:
    """``[batch_size * dp, seq_len + 1]`` int64 token windows of ``step`` (inputs and next tokens)."""
    n, S = spec.batch_size * dp, spec.seq_len
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
    if spec.path is None:
        return torch.randint(0, spec.vocab_size, (n, S + 1), generator=gen)
    data = np.memmap(spec.path, dtype=spec.file_dtype, mode="r")
    if len(data) < S + 1:
        raise ValueError(f"data.path has {len(data)} tokens; seq_len={S} needs at least {S + 1}")
    starts = torch.randint(0, len(data) - S, (n,), generator=gen).tolist()
    windows = torch.from_numpy(np.stack([np.asarray(data[s : s + S + 1], dtype=np.int64) for s in starts]))
    if int(windows.max()) >= spec.vocab_size:
        raise ValueError(f"data.path holds token id {int(windows.max())} >= the model's vocab_size={spec.vocab_size}")
    return windows


def replica_batch(spec: DataSpec, step: int, dp: int, replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This replica's ``(tokens, labels)``, each ``[batch_size, seq_len]``, before sequence sharding."""
    windows = global_batch(spec, step, dp)[replica * spec.batch_size : (replica + 1) * spec.batch_size]
    return windows[:, :-1], windows[:, 1:]
