"""Helpers shared by the Triton forward and backward kernels: tiles, head-dim padding, vector
widths, dot precision, autotune keys, the ``Launch`` record the compile check reads, and the
loop ranges of the document (span) variant.

Environment (read at import): ``FPDT_AUTOTUNE=0`` autotunes nothing (one small tile per kernel);
``FPDT_TMA=1`` lets autotune also pick the kernels' tensor-descriptor (TMA) tiles on sm_90, off
by default until GPU timings show they pay."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..backend import check_interpreter_runs, triton_interpreter_on

# A constexpr global: compiled Triton code may read module globals only when they are constexprs.
LOG2E = tl.constexpr(1.4426950408889634)

# Under the interpreter every autotune config would run: use one, with blocks large enough that
# numpy does the work in few steps (32x32 tiles: ~2x faster than 16x16 on the test shapes).
INTERPRET = triton_interpreter_on()
if INTERPRET:  # every CPU launch imports this module first, eager and compiled calls alike
    check_interpreter_runs()


def _teach_interpreter_descriptor_add() -> None:
    """The interpreter runs tensor-descriptor loads and stores but not their reductions, which the
    fused backward's TMA tiles add dQ with: give it the add, an atomic add through the pointers and
    bounds mask it already derives for a store (the GPU's reduction is clipped to the same bounds)."""
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder

    if hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduction {kind} in the interpreter")
        ptrs, mask = desc.materialize_pointers(indices)
        op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
        return self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


if INTERPRET:
    _teach_interpreter_descriptor_add()

AUTOTUNE_ENV_VAR = "FPDT_AUTOTUNE"
TMA_ENV_VAR = "FPDT_TMA"
FP32_PRECISION_ENV_VAR = "FPDT_FP32_PRECISION"
FP32_PRECISIONS = ("tf32x3", "tf32", "ieee")

# Dynamic shared memory one block may use, in bytes (CUDA occupancy tables).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}


@triton.jit
def span_blocks(v_lo, v_hi, f_lo, f_hi, BLOCK: tl.constexpr):
    """Tiles of ``BLOCK`` along a loop whose visible range is ``[v_lo, v_hi)`` (``0 <= v_lo <=
    v_hi``), of which ``[f_lo, f_hi)`` is visible to every row (or key) of the resident block.

    Returns ``(start, f0, f1, n_head, n_masked)``: unmasked tiles ``[f0, f1)``; masked tiles are
    the ``n_head`` from ``start`` to ``f0``, then the ones from ``f1`` until ``v_hi``
    (``n_masked`` in all). Tiles outside ``[v_lo, v_hi)`` are not visited at all.
    """
    start = v_lo // BLOCK * BLOCK
    f0 = (f_lo + BLOCK - 1) // BLOCK * BLOCK
    f1 = f_hi // BLOCK * BLOCK
    full = f1 > f0
    f0 = tl.where(full, f0, start)
    f1 = tl.where(full, f1, start)
    n_head = (f0 - start) // BLOCK
    n_tail = tl.where(v_hi > f1, (v_hi - f1 + BLOCK - 1) // BLOCK, 0)
    n_masked = tl.where(v_hi > v_lo, n_head + n_tail, 0)
    return start, f0, f1, n_head, n_masked


class Launch(NamedTuple):
    """One kernel launch, built by the same code for the GPU and for the compile check."""

    kernel: Callable  # a @triton.autotune'd or @triton.jit function
    grid: Callable | tuple
    args: dict


# CUDA caps a grid's second (and third) dimension at 65535 blocks. Every kernel here puts
# (batch, head) pairs on the second, so a launch with more is run over slices of the batch.
MAX_GRID_Y = 65535


def batch_slices(launch: Launch) -> list[Launch]:
    """``launch`` as launches over consecutive slices of the batch whose grids' second axis
    (batch x heads) is at most ``MAX_GRID_Y``. Every tensor argument of these kernels is indexed
    by batch first, so a slice is the same launch on views of a batch range."""
    heads = launch.args["H"]
    tensors = {name: t for name, t in launch.args.items() if isinstance(t, torch.Tensor)}
    batch = next(iter(tensors.values())).shape[0]
    if batch * heads <= MAX_GRID_Y:
        return [launch]
    if heads > MAX_GRID_Y:
        raise ValueError(f"{heads} query heads exceed the {MAX_GRID_Y} a CUDA grid dimension holds; use fewer heads")
    if any(t.shape[0] != batch for t in tensors.values()):
        shapes = [tuple(t.shape) for t in tensors.values()]
        raise RuntimeError(f"{launch.kernel}: a tensor argument is not batch-first: {shapes}")
    per = MAX_GRID_Y // heads
    slices = []
    for start in range(0, batch, per):
        rows = min(per, batch - start) * heads
        grid = launch.grid
        sliced = (lambda meta, g=grid, r=rows: (g(meta)[0], r)) if callable(grid) else (grid[0], rows)
        args = dict(launch.args, **{name: t[start : start + per] for name, t in tensors.items()})
        slices.append(Launch(launch.kernel, sliced, args))
    return slices


def run(launch: Launch) -> None:
    # Autotune may pick a TMA tile only where the launch allows them and the config lists (built
    # at import) hold them: only then does the launch need the descriptors' scratch.
    if TMA_AUTOTUNED and launch.args.get("TMA_OK"):
        set_tma_allocator()
    for part in batch_slices(launch):
        part.kernel[part.grid](**part.args)


def tile(bm: int, bn: int, warps: int, stages: int, **constexprs) -> triton.Config:
    """A ``BM x BN`` tile on ``warps`` warps, ``stages`` pipeline stages; ``constexprs``: the
    kernel's other config switches (the dK/dV kernel's ``SPLIT``, the forward's ``TMA`` and ``WS``)."""
    return triton.Config({"BM": bm, "BN": bn, **constexprs}, num_warps=warps, num_stages=stages)


# The config switches a tile's name shows, in this order.
_SWITCH_NAMES = {"SPLIT": "split", "TMA": "tma", "WS": "ws"}


def tile_name(config: triton.Config) -> str:
    kw = config.kwargs
    switches = "".join(f" {name}" for key, name in _SWITCH_NAMES.items() if kw.get(key))
    return f"{kw['BM']}x{kw['BN']} w{config.num_warps} s{config.num_stages}" + switches


def uses_tma(config: triton.Config) -> bool:
    """Whether a config loads and stores through tensor descriptors (sm_90's TMA)."""
    return bool(config.kwargs.get("TMA"))


def uses_ws(config: triton.Config) -> bool:
    """Whether a config warp-specialises its loop."""
    return bool(config.kwargs.get("WS"))


def tma_opted_in() -> bool:
    """``FPDT_TMA=1``: autotune also considers the tensor-descriptor (TMA) tiles where a launch
    supports them (its config list is fixed when the kernel module is imported). Off by default
    until GPU timings show they pay."""
    return os.environ.get(TMA_ENV_VAR, "0") == "1"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The configs autotune may choose from: all of them (the TMA ones only with ``FPDT_TMA=1``),
    or only the last (the small tile that fits every head dim) under the interpreter or with
    ``FPDT_AUTOTUNE=0``.

    ``FPDT_AUTOTUNE=0`` (read at import) trades kernel speed for start-up time: one compile per
    kernel variant instead of one per config, for smoke tests and debugging, never for timings.
    """
    if _autotune_off():
        return configs[-1:]
    with_tma = tma_opted_in()
    return [c for c in configs if with_tma or not uses_tma(c)]


def _autotune_off() -> bool:
    return INTERPRET or os.environ.get(AUTOTUNE_ENV_VAR, "1") == "0"


# Whether the kernels' autotune lists (made at import, by autotune_configs) hold TMA tiles.
TMA_AUTOTUNED = tma_opted_in() and not _autotune_off()


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # The caching allocator's blocks are 512-byte aligned: more than the 128 bytes TMA needs.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_tma_allocator() -> None:
    """Give Triton the global scratch in which kernels build their tensor descriptors (128 bytes
    per descriptor per program). Triton keeps it in a context variable, which a new thread does not
    inherit: call it on the launching thread, before the launch."""
    triton.set_allocator(_tma_scratch)


def arch_family(arch: int) -> int:
    """The tile tables' target for a compute capability ``10*major + minor``: 90 (wgmma and its
    227 KB of shared memory, Hopper and newer) or 80 (mma.sync; Ampere and Ada)."""
    return 90 if arch >= 90 else 80


def current_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


class Tiles:
    """A kernel's autotune configs and where each may run.

    ``clean[(family, element_bytes, head-dim block)]`` names the configs that compile without
    register spills and within shared memory there, as measured by ``python -m
    fpdt_kernels.compile_check --all-configs`` (triton 3.6 and 3.9); a head-dim block is looked up at
    the smallest measured one that holds it (64, 128 or 256). ``clean_accumulate``, where given,
    overrides it for launches with ``ACCUMULATE`` (the forward's merge epilogue holds a second
    output tile). ``spill_docs`` names, per key, the clean configs that spill once ``DOCS`` (packed
    documents: each row's key span is loaded and tested) adds its registers; launches with
    ``DOCS`` skip them. ``ws_applies(args)`` says whether a launch with these kernel arguments may
    run the warp-specialised tiles (default: wherever TMA tiles may). The last config is the
    fallback when nothing is listed, and the one the interpreter and ``FPDT_AUTOTUNE=0`` run.
    """

    def __init__(
        self,
        configs: list[triton.Config],
        clean: dict,
        clean_accumulate: dict | None = None,
        spill_docs=None,
        ws_applies: Callable[[dict], bool] | None = None,
    ):
        self.configs = configs
        self.clean = clean
        self.clean_accumulate = clean if clean_accumulate is None else clean_accumulate
        self.spill_docs = spill_docs or {}
        self.ws_applies = ws_applies or (lambda args: True)
        names = {tile_name(c) for c in configs}
        tables = (clean, self.clean_accumulate, self.spill_docs)
        listed = {n for table in tables for kept in table.values() for n in kept}
        if listed - names:
            raise ValueError(f"clean tiles {sorted(listed - names)} are not among the configs {sorted(names)}")

    def usable(
        self, configs, bd: int, element_bytes: int, arch: int, accumulate=False, docs=False, tma=False, ws=True
    ) -> list[triton.Config]:
        """The configs of ``configs`` listed as clean for this launch (or the last one); ``tma``:
        the launch supports tensor descriptors (its ``TMA_OK``; sm_90 is the table's key); ``ws``:
        it may run warp-specialised tiles (``ws_applies``)."""
        table = self.clean_accumulate if accumulate else self.clean
        measured = next((b for b in (64, 128, 256) if bd <= b), 256)
        key = (arch_family(arch), element_bytes, measured)
        names = set(table.get(key, ())) - set(self.spill_docs.get(key, ()) if docs else ())
        kept = [c for c in configs if tile_name(c) in names and (tma or not uses_tma(c)) and (ws or not uses_ws(c))]
        return kept or configs[-1:]

    def launch_usable(self, configs, args: dict, arch: int) -> list[triton.Config]:
        """``usable`` for a launch with kernel arguments ``args`` (its ``Q``, ``BD``, ...)."""
        return self.usable(
            configs,
            args["BD"],
            args["Q"].element_size(),
            arch,
            bool(args["ACCUMULATE"]),
            bool(args["DOCS"]),
            bool(args.get("TMA_OK")),
            self.ws_applies(args),
        )

    def prune(self, configs, named_args, **kwargs):
        """Autotune's ``early_config_prune``: the usable configs for this launch's device."""
        if INTERPRET:
            return configs
        return self.launch_usable(configs, {**kwargs, **named_args}, current_arch())


def head_dim_block(d: int) -> int:
    # Pad d to a power of two (and to 16: tl.dot needs K >= 16 on GPU); masked in the kernel.
    return max(16, triton.next_power_of_2(d))


def vector_elements(dtype: torch.dtype) -> int:
    """Elements in one 16-byte load."""
    return 16 // dtype.itemsize


def tma_allowed(spans, q: torch.Tensor, iv: int, *written: tuple[int, torch.Tensor]) -> bool:
    """A launch's ``TMA_OK``: the TMA tiles need 16-bit inputs whose rows start on whole 16-byte
    vectors (``iv``, their ``vector_width``), the same of every ``(vector width, tensor)`` the kernel
    stores or reduces into through a descriptor, and no document spans (the dense path only). The
    tiles themselves are pruned by ``Tiles``."""
    aligned = all(width * t.element_size() == 16 for width, t in written)
    return spans is None and q.element_size() == 2 and iv * 2 == 16 and aligned


def vector_width(*tensors: torch.Tensor) -> int:
    """The largest power of two ``v <= 16 bytes / element size`` such that every stride but the
    last and every start offset of ``tensors`` is a multiple of ``v`` elements.

    Kernels receive strides divided by ``v`` and multiply them back by a constexpr, which is how
    Triton learns that a row starts on a ``v``-element boundary and loads it in vectors.
    """
    v = vector_elements(tensors[0].dtype)
    while v > 1:
        ok = all(s % v == 0 for t in tensors for s in t.stride()[:-1])
        if ok and all(t.is_meta or t.data_ptr() % (v * t.element_size()) == 0 for t in tensors):
            return v
        v //= 2
    return 1


def strides(t: torch.Tensor, v: int, dims: int = 3) -> tuple[int, ...]:
    """``t``'s first ``dims`` strides in units of ``v`` elements (see ``vector_width``)."""
    return tuple(s // v for s in t.stride()[:dims])


def padded_head_dim(d: int, dtype: torch.dtype) -> int:
    """The head dim ``q, k, v`` are laid out with in the kernels: ``d`` when it is whole 16-byte
    vectors, else the tile's power of two (d=111 -> 128): a partial last vector would make every
    load scalar, and a mask inside the tile (112 of 128) spilled dK/dV by 0.6 KB on sm_90."""
    return d if d % vector_elements(dtype) == 0 else head_dim_block(d)


def pad_head_dim(t: torch.Tensor, dp: int) -> torch.Tensor:
    """``t`` if its rows already load in whole vectors, else a copy zero-padded to ``dp`` columns.

    The zero columns add nothing to ``q @ k^T`` and produce zero output columns, which the kernels
    never store (their stores are masked to the true head dim)."""
    if vector_width(t) == vector_elements(t.dtype) and t.shape[-1] == dp:
        return t
    if t.shape[-1] == dp:
        return t.clone(memory_format=torch.contiguous_format)
    return torch.nn.functional.pad(t, (0, dp - t.shape[-1]))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision. fp32 inputs default to ``tf32x3`` (three TF32 products per
    dot: tensor cores at near-fp32 accuracy, where true fp32 FMA tiles spilled and took minutes to
    compile); ``FPDT_FP32_PRECISION=tf32`` trades accuracy (10 mantissa bits) for speed, ``ieee``
    gives exact fp32 products. For fp16/bf16 the argument has no effect."""
    if dtype != torch.float32:
        return "tf32"
    name = os.environ.get(FP32_PRECISION_ENV_VAR, "tf32x3")
    if name not in FP32_PRECISIONS:
        raise ValueError(f"{FP32_PRECISION_ENV_VAR}={name!r} is not one of {FP32_PRECISIONS}")
    return name


# Beyond this many rows or keys the best tile no longer changes, and autotuning at the full length
# is costly (every config runs ~7 times: at S=128K, H=32 that was ~1 minute per kernel on an H200).
SEQ_BUCKET_CAP = 1 << 14


def seq_bucket(n: int) -> int:
    """Autotune key for a length: re-tune per power of two up to ``SEQ_BUCKET_CAP``, not per length."""
    return triton.next_power_of_2(max(1, min(n, SEQ_BUCKET_CAP)))
