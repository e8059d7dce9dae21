"""The longest sequence that fits (:func:`max_seq_len`) and the FPDT chunk to use for it
(:func:`recommend_chunk_tokens`), searched over the planner's :func:`~.estimate.estimate`::

    from experiments.plan import max_seq_len
    max_seq_len("llama3-8b", "fpdt", 4, "a100-80g")                  # tokens
"""

from __future__ import annotations

from collections.abc import Mapping

from parallel import get_strategy

from .estimate import check_counts, estimate, fits

# max_seq_len stops bisecting when the gap is within 1/RESOLUTION of the answer (or one granule).
RESOLUTION = 64
# Chunk sizes tried by recommend_chunk_tokens: at most this many chunks (the schedule has u^2 blocks).
MAX_CHUNKS = 128
# A chunk size "hides" the host-device traffic when the pipeline is at most this much slower
# than the same pipeline with free copies.
HIDE_TOLERANCE = 0.05


def _granularity(strategy: str, gpus: int, seq_len: int, chunk_tokens: int) -> int:
    spec = get_strategy(strategy)
    if spec.takes_chunks and seq_len > chunk_tokens:
        return chunk_tokens
    return spec.granule(gpus, 1, 1 if spec.uses_ulysses_degree else None)


def max_seq_len(
    model: str,
    strategy: str,
    gpus: int,
    hardware: str | Mapping,
    *,
    chunk_tokens: int = 65536,
    activation_checkpointing: bool = True,
    checkpoint_on_host: bool = True,
    fsdp: bool = True,
    limit: int = 1 << 30,
    **switches,
) -> int:
    """The longest ``seq_len`` whose device AND host memory fit (0 if none does), at most ``limit``.

    Doubling from the granularity, then bisection on multiples of it (the strategy's granule at
    ``gpus``: ``gpus``, ``2 gpus`` for ``ring``/``usp``, 1 for ``local``; ``gpus * chunks`` for a
    fixed ``chunks``; ``chunk_tokens`` once FPDT has more than one chunk, so the doubling steps
    onto ``chunk_tokens`` and its doublings) until the gap to the first length that does not fit
    is one granule or ``1/RESOLUTION`` of the answer. A doubling past ``limit`` tries the longest
    length on the granule up to ``limit``: the answer equals that length when the limit, not
    memory, bounds it. ``switches``: the other keywords of :func:`estimate` (``max_device_memory``
    for ``hardware=cpu``, ``offload``, ``dtype``, ...).
    """
    check_counts(gpus=gpus, limit=limit, chunk_tokens=chunk_tokens)
    takes_chunks = get_strategy(strategy).takes_chunks
    if takes_chunks and chunk_tokens % gpus:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be a positive multiple of gpus={gpus}")
    kw = dict(
        chunk_tokens=chunk_tokens,
        activation_checkpointing=activation_checkpointing,
        checkpoint_on_host=checkpoint_on_host,
        fsdp=fsdp,
        **switches,
    )

    def fits_at(n: int) -> bool:
        return fits(model, strategy, gpus, hardware, n, **kw)

    fixed = switches.get("chunks") if takes_chunks else None  # a fixed u instead of a chunk size

    def granule(n: int) -> int:  # the step between valid lengths around n
        return gpus * fixed if fixed else _granularity(strategy, gpus, n, chunk_tokens)

    def doubled(n: int) -> int:  # past one chunk FPDT's lengths are multiples of it
        if takes_chunks and not fixed and n < chunk_tokens < 2 * n:
            return chunk_tokens
        return 2 * n

    lo, n = 0, granule(0)  # the shortest valid length: gpus (times a fixed chunk count)
    while n <= limit and fits_at(n):
        lo, n = n, doubled(n)
    if n > limit:  # the longest length on the granule up to limit, past the last doubling
        last = limit // granule(limit) * granule(limit)
        if last <= lo:
            return lo
        if fits_at(last):
            return last
        n = last
    if lo == 0:
        return 0
    hi = n  # lo fits, hi does not
    g = granule(hi)
    while hi - lo > max(g, lo // RESOLUTION):
        mid = (lo + hi) // 2 // g * g
        if mid <= lo:
            break
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
        g = granule(hi)
    return lo


def recommend_chunk_tokens(model: str, gpus: int, hardware: str | Mapping, seq_len: int, *, strategy: str = "fpdt",
                           **switches) -> int | None:  # fmt: skip
    """The smallest chunk of ``gpus * 2**k`` tokens of ``strategy`` (one that takes chunks; FPDT by
    default; ``chunk_tokens`` in ``switches`` is tried too) that divides ``seq_len``, fits, and hides
    the host-device traffic behind compute (replayed pipeline within ``HIDE_TOLERANCE`` of the
    same pipeline with free copies); if none hides it, the fitting one with the shortest step.
    ``None`` if no chunk size fits."""
    if not get_strategy(strategy).takes_chunks:
        raise ValueError(f"strategy {strategy!r} takes no chunks; recommend a chunk for one that does")
    given = switches.pop("chunk_tokens", None)
    switches.pop("chunks", None)
    c, candidates = gpus, []
    while c <= seq_len:
        if seq_len % c == 0 and seq_len // c <= MAX_CHUNKS:
            candidates.append(c)
        c *= 2
    # The caller's own chunk too (past MAX_CHUNKS, or not a power of two): a length max_seq_len
    # found with it fits with it, so the answer at that length is never "none".
    if given and seq_len % given == 0 and given not in candidates:
        candidates = sorted([*candidates, given])
    fitting = []
    for c in candidates:
        e = estimate(model, strategy, gpus, hardware, seq_len, chunks=seq_len // c, **switches)
        if not e.fits:
            continue
        if e.copy_overhead <= HIDE_TOLERANCE:
            return c
        fitting.append((e.step_time_s, c))
    return min(fitting)[1] if fitting else None
