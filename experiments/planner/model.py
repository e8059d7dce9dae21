"""The planner's first-principles model: bytes by part and the time of one training step.

Every term is derived from what the code allocates (``models/transformer.py``,
``models/chunked.py``, ``parallel/fpdt.py``, ``parallel/schedule.py``, ``experiments/sweep/worker.py``);
``experiments/planner/PLANNER.md`` writes the formulas out. Notation as there: ``P`` ranks,
``S`` tokens, ``u`` chunks, ``C = S/u``, ``s = S/P`` local tokens, ``c = C/P``, ``H``/``Hkv``
heads, ``d`` head dim, ``h`` hidden, ``f`` MLP width, ``V`` vocabulary, ``L`` layers, ``b`` bytes
per element of the training dtype. All sizes are per rank unless named ``*_node``.

The memory peak is the largest of three moments of the backward of one recomputed layer (with
activation checkpointing the backward holds one layer's activations at a time): the MLP
backward, the attention backward, and the LM-head loss; with tied embeddings, a fourth at the
end of the backward, when the shared weight's two gradients and their sum are live. The FPDT attention working set comes
from replaying :func:`parallel.schedule.backward_schedule` with a byte size per buffer, and the
FPDT step time from replaying its forward and backward schedules on four streams with a cost
per op, so planner and executor share one schedule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from parallel.all_to_all import kv_heads_per_rank
from parallel.fpdt import CommRegion
from parallel.rotary import RotaryEmbedding
from parallel.schedule import (
    Kind,
    Residency,
    Schedule,
    backward_residency,
    backward_schedule,
    buffer_family,
    document_pairs,
    forward_schedule,
    resolve_backward_order,
)
from parallel.strategies import get_strategy

from .replay import Program

FP32 = 4
INT64 = 8

# Live tensors at the MLP-backward peak of a recomputed layer, counted from the autograd graph of
# Block._layer and the chunked MLP backward (and confirmed with experiments.core.memory's tracker on
# llama-tiny / gpt-tiny): hidden-sized [s, h] tensors besides the checkpoints (norm1 out, residual,
# norm2 out, MLP out, layer out, incoming gradient and the MLP input gradient), plus one more per
# norm for RMSNorm, whose composite kernel saves its normalised input.
HIDDEN_LIVE = 5
RMSNORM_EXTRA = 1
# Unchunked MLP: saved a, u, silu(a), silu(a)*u and two gradients (SwiGLU); a, gelu(a) and one
# gradient (GELU). Chunked MLP: fp32 temporaries of one tile's backward (models/chunked.py).
MLP_LIVE = {"swiglu": 6, "gelu": 3}
MLP_TILE_LIVE = {"swiglu": 11, "gelu": 10}
# Loss: fp32 logits, their softmax and the gradient (unchunked: over all s tokens; chunked: one tile).
LOSS_LIVE = 3
# At the attention backward the MLP half of the layer has been differentiated and freed: left are
# norm1's output (the attention input), the residual gradient and the layer-output gradient, plus
# the attention output's gradient [s, H, d] and RMSNorm's saved normalised input of norm1.
HIDDEN_LIVE_ATTENTION = 3
# The chunked recipe with RMSNorm (models.chunked: tiled norms, norm2 + MLP + residual in the MLP's
# tiles, the donated output gradient, the checkpoint's output released): 2 [s, h] tensors at the
# MLP backward besides the checkpoint's device copy (the residual stream's gradient and the
# attention half's output; the recompute skips the chunked MLP's forward, so its output does not
# exist: the code before that, legacy_recompute, had 3) and 2 at the attention backward, plus 6
# fp32 [tile, h] temporaries of the norm inside each MLP tile. Read from
# experiments.bench.memory_report and checked on the CPU calibration rows
# (tests/fixtures/plan_calibration: every llama-tiny fpdt row within 9.4%).
TILED_HIDDEN_LIVE = 2
TILED_HIDDEN_LIVE_ATTENTION = 2
NORM_TILE_LIVE = 6


@dataclass(frozen=True)
class Setup:
    """One resolved configuration (see :func:`experiments.plan.estimate` for the switches)."""

    cfg: object  # models.ModelConfig
    strategy: str  # a registered strategy (parallel.strategies): its degrees and traits are modelled
    gpus: int  # the sequence-parallel degree P (sp): the ranks that share one sequence
    seq_len: int
    chunks: int
    dtype_bytes: int  # compute dtype: activations, chunks, all-gathered parameters
    activation_checkpointing: bool
    checkpoint_on_host: bool
    offload: bool
    fsdp: bool
    chunked_mlp: bool
    chunked_loss: bool
    mlp_tile: int
    loss_tile: int
    simulated_device: bool  # CPU run: token ids and everything else count as device memory
    world: int = 0  # all ranks, dp * sp (0: gpus); FSDP shards over all of them
    param_bytes: int = 0  # storage of parameters, gradients, AdamW moments (0: dtype_bytes)
    offload_states: bool = False  # FSDP's CPUOffloadPolicy: sharded model states in host memory
    doc_len: int | None = None  # packed documents of this many tokens each (None: one per sequence)
    residual_fp32: bool = False  # mixed precision with an fp32 residual stream (and checkpoints)
    ulysses_degree: int | None = None  # usp: ranks per Ulysses group (None: the strategy's default)
    # The code before 2026-12-06: a checkpoint's recompute also ran the chunked MLP's forward and
    # the chunked loss recomputed its logits in the backward (for replaying rows measured then).
    legacy_recompute: bool = False
    # The FPDT backward's outer loop: "kv", "query", or "auto" (the runner's choice; see backward_order).
    backward_order: str = "auto"

    @property
    def spec(self):
        return get_strategy(self.strategy)

    @property
    def degrees(self) -> tuple[int, int]:
        """``(U, R)``: the ranks whose all-to-all splits the heads, and the ring's length."""
        return self.spec.degrees(self.gpus, self.ulysses_degree, self.cfg.n_heads, self.cfg.n_kv_heads)

    @property
    def U(self) -> int:
        return self.degrees[0]

    @property
    def R(self) -> int:
        return self.degrees[1]

    @property
    def pipelined(self) -> bool:
        """The FPDT chunk pipeline: attention state by schedule replay, not whole-sequence tensors."""
        return self.spec.takes_chunks

    @property
    def ranks(self) -> int:
        return self.world or self.gpus

    @property
    def pb(self) -> int:
        return self.param_bytes or self.dtype_bytes

    @property
    def autocast(self) -> bool:
        """The forward runs under autocast: mixed precision (parameters stored wider than the
        compute dtype) without FSDP (``experiments.training.precision``)."""
        return self.pb != self.dtype_bytes and not self.fsdp

    @property
    def rb(self) -> int:
        """Bytes per element of the residual stream: the compute dtype's, or 4 (``residual_fp32``)."""
        return FP32 if self.residual_fp32 else self.dtype_bytes

    @property
    def s(self) -> int:
        return self.seq_len // self.gpus

    @property
    def C(self) -> int:
        return self.seq_len // self.chunks

    @property
    def kv_heads(self) -> int:
        """KV heads per rank after the all-to-all (replicated when ``U % Hkv == 0``)."""
        return kv_heads_per_rank(self.cfg.n_kv_heads, self.U)


def _forward(chunks: int, offload: bool, save: bool, pairs: frozenset | None = None) -> Schedule:
    return forward_schedule(chunks, causal=True, offload=offload, save=save, pairs=pairs)


def backward_order(st: Setup) -> str:
    """The FPDT backward's outer loop, by the runner's rule (``resolve_backward_order``)."""
    return resolve_backward_order(st.backward_order, st.chunks, copy_sizes(st), offload=st.offload, pairs=pairs(st))


def backward(st: Setup) -> Schedule:
    """The FPDT backward schedule the runner builds for ``st``."""
    return backward_schedule(st.chunks, causal=True, offload=st.offload, pairs=pairs(st), order=backward_order(st))


# --- packed documents ----------------------------------------------------------------------------


def document_starts(st: Setup) -> list[int]:
    """Where the documents of one sequence start: every ``doc_len`` tokens (one document: [0])."""
    return [0] if st.doc_len is None else list(range(0, st.seq_len, st.doc_len))


def square_tokens(st: Setup) -> int:
    """Query-key pairs of one sequence's attention before the causal halving: sum of length^2."""
    ends = [*document_starts(st)[1:], st.seq_len]
    return sum((b - a) ** 2 for a, b in zip(document_starts(st), ends, strict=True))


@functools.lru_cache(maxsize=256)
def _pairs(chunks: int, seq_len: int, doc_len: int | None) -> frozenset | None:
    if doc_len is None:
        return None
    cu = [*range(0, seq_len, doc_len), seq_len]
    return document_pairs(cu, 1, seq_len, chunks)


def pairs(st: Setup) -> frozenset | None:
    """The FPDT chunk blocks that share a document (what the runner's schedules keep)."""
    return _pairs(st.chunks, st.seq_len, st.doc_len)


def block_square(st: Setup, i: int, j: int) -> float:
    """Query-key pairs of block ``(i, j)`` (query chunk ``i``, KV chunk ``j``) inside documents, with
    the diagonal block counted at half, as the causal whole is."""
    C = st.C
    if st.doc_len is None:
        return C * C * (0.5 if i == j else 1.0)
    starts = document_starts(st)
    total = 0.0
    for a, b in zip(starts, [*starts[1:], st.seq_len], strict=True):
        nq = max(0, min(b, (i + 1) * C) - max(a, i * C))
        nk = max(0, min(b, (j + 1) * C) - max(a, j * C))
        total += nq * nk * (0.5 if i == j else 1.0)
    return total


# --- sizes -------------------------------------------------------------------------------------


def chunk_bytes(st: Setup) -> dict[str, int]:
    """Device bytes of one chunk of each FPDT schedule buffer family (``parallel/fpdt.py``)."""
    cfg, b, P = st.cfg, st.dtype_bytes, st.gpus
    C, c, d, H, Hkv = st.C, st.C // P, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    hq, hk = H // P, st.kv_heads
    q = C * hq * d * b
    kv = 2 * C * hk * d * b
    lse = C * hq * FP32
    return {
        "x": 0,  # a view of the block input (or a fetched copy of it, counted in the backward)
        "qkv": c * (H + 2 * Hkv) * d * b,
        "q": q,
        "kv": kv,
        "o": C * hq * d * FP32 + lse,  # fp32 accumulator while merging; the input dtype after a2a_out
        "out": 0,  # a slice of the preallocated output
        "do": q,
        "dq": C * hq * d * FP32,
        "dkv": 2 * C * hk * d * FP32,
        "dqloc": c * H * d * b,
        "dkvloc": 2 * c * Hkv * d * b,
        "dx": 0,
        "dout": 0,
        "dw": 0,
    }


def copy_sizes(st: Setup) -> dict[str, int]:
    """Bytes one host-device copy of a chunk of each family moves: the block input's chunk, and
    the output in the input dtype with its fp32 LSE (what the forward saves), not the fp32
    accumulator it merged in."""
    sizes = chunk_bytes(st)
    lse = st.C * (st.cfg.n_heads // st.gpus) * FP32
    return {**sizes, "x": (st.C // st.gpus) * st.cfg.hidden * st.dtype_bytes, "o": sizes["q"] + lse}


def comm_region_bytes(st: Setup) -> int:
    """The FPDT backward's communication-stream scratch (``parallel.fpdt.CommRegion``): the
    all-to-all's send and receive chunks (``P > 1``) or the RoPE tables of a chunk with their
    angles or the rotation's work (RoPE at global positions; packed documents rotate per token
    instead), whichever is larger."""
    cfg, P, C = st.cfg, st.gpus, st.C
    d = cfg.head_dim
    region = CommRegion(1, C, cfg.n_heads // P, d, st.dtype_bytes, P, RotaryEmbedding(d).span_work(C))
    return region.size(moves=P > 1, rope=st.doc_len is None)


@functools.lru_cache(maxsize=16)
def _program(direction: str, chunks: int, offload: bool, save: bool, pairs: frozenset | None, order: str) -> Program:
    """A schedule compiled for replays, once per process (an estimate replays each several times)."""
    if direction == "forward":
        return Program.of(_forward(chunks, offload, save, pairs))
    return Program.of(backward_schedule(chunks, causal=True, offload=offload, pairs=pairs, order=order))


def backward_program(st: Setup) -> Program:
    """:func:`backward` compiled for replays."""
    return _program("backward", st.chunks, st.offload, False, pairs(st), backward_order(st))


def forward_program(st: Setup, save: bool) -> Program:
    """The forward schedule (``save``: the recompute forward that keeps chunks for the backward)
    compiled for replays."""
    return _program("forward", st.chunks, st.offload, save, pairs(st), "kv")


def backward_residency_of(st: Setup) -> Residency:
    """What :func:`backward` holds per buffer family, tallied without building its ops (memory
    needs no op list: a ``max_seq_len`` search asks memory alone at hundreds of chunks)."""
    order = backward_order(st)
    return backward_residency(st.chunks, causal=True, offload=st.offload, pairs=pairs(st), order=order)


# --- memory ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Per-rank device bytes by part, the phase that sets the peak, and host bytes."""

    parts: dict[str, int]
    peak: int
    peak_phase: str
    phases: dict[str, int]
    host: dict[str, int]

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def _sharded_states(st: Setup) -> dict[str, int]:
    """Parameters, gradients and AdamW's two moments in their storage dtype (fp32 masters under
    ``bf16-mixed``), replicated, or FSDP's shard of them over all ranks."""
    n, pb = st.cfg.num_params(), st.pb
    shards = st.ranks if st.fsdp else 1
    return {"params": n * pb // shards, "grads": n * pb // shards, "optimizer": 2 * n * pb // shards}


def model_state_bytes(st: Setup) -> dict[str, int]:
    """Device bytes of the model states. Without FSDP the replicated states (mixed precision is
    autocast: its bf16 weight copies exist only during the forward, not at the backward's peak).
    With FSDP the shard over all ranks, plus the all-gathered compute copies of the block in use
    and the next one (prefetch) and of the root module (embeddings, head, final norm), which FSDP2
    keeps unsharded between forward and backward, and one block's unsharded gradient (cast to
    the fp32 reduce dtype under mixed precision). With ``offload_states`` the shard lives in host
    memory (:func:`_host`) and only the unsharded copies are on the device."""
    states = _sharded_states(st)
    if not st.fsdp:
        return states
    cfg, cb = st.cfg, st.dtype_bytes
    blk = cfg.layer_params()
    root = cfg.num_params() - cfg.n_layers * blk
    gathered = min(2, cfg.n_layers)  # the block in use and the next one, of as many as there are
    device = {"params": (gathered * blk + root) * cb, "grads": blk * max(cb, st.pb), "optimizer": 0}
    if st.offload_states:
        return device
    return {k: states[k] + device[k] for k in states}


def memory(st: Setup) -> Memory:
    cfg, b, s, S, L = st.cfg, st.dtype_bytes, st.s, st.seq_len, st.cfg.n_layers
    h, f, d, H, V = cfg.hidden, cfg.ffn_hidden, cfg.head_dim, cfg.n_heads, cfg.vocab_size
    A = s * h * b  # one hidden-sized activation [s, h]
    R = s * h * st.rb  # one layer input of the residual stream (what a checkpoint keeps)
    attn_out = s * H * d * b  # attention output before the projection [s, H, d]
    norms = 2 * s * FP32 * (2 if cfg.norm == "layernorm" else 1)  # mean/rstd of two norms
    states = model_state_bytes(st)
    fixed = sum(states.values())
    # Token ids: this rank's tokens, labels and positions; a CPU run also holds the full-length
    # batch and the layout permutation on its simulated device (experiments/sweep/worker.py).
    tokens = 3 * s * INT64 + (2 * S * INT64 if st.simulated_device else 0)

    if st.activation_checkpointing:
        # Layer inputs kept by the checkpoints: L on device, or on the host with one device copy
        # of the input of the layer being recomputed.
        ckpt = R if st.checkpoint_on_host else L * R
    else:
        ckpt = 0
    # [s, h] tensors live at the MLP and at the attention backward, by recipe.
    tiled = st.chunked_mlp and cfg.norm == "rmsnorm"
    if tiled:
        live, live_attention = TILED_HIDDEN_LIVE + st.legacy_recompute, TILED_HIDDEN_LIVE_ATTENTION
    else:
        extra = RMSNORM_EXTRA if cfg.norm == "rmsnorm" else 0
        live, live_attention = HIDDEN_LIVE + 2 * extra, HIDDEN_LIVE_ATTENTION + extra
    hidden = live * A + attn_out + norms
    # Without checkpointing the other L-1 layers keep what their backward needs.
    layers_saved = 0 if st.activation_checkpointing else (L - 1) * (hidden + _mlp_saved(st) + _attn_kept(st))

    if st.chunked_mlp:
        mlp = MLP_TILE_LIVE[cfg.activation] * st.mlp_tile * f * FP32 + st.mlp_tile * h * b
        mlp += NORM_TILE_LIVE * st.mlp_tile * h * FP32 if tiled else 0
    else:
        mlp = MLP_LIVE[cfg.activation] * s * f * b
    attn_saved = 0 if st.pipelined else _attn_saved(st)
    mlp_phase = ckpt + hidden + attn_saved + mlp

    attn_work = _attn_backward_working_set(st)
    hidden_attn = live_attention * A + attn_out + norms
    attn_phase = ckpt + hidden_attn + attn_work

    if st.chunked_loss:
        logits = LOSS_LIVE * st.loss_tile * V * FP32 + s * (FP32 + INT64 + 1)  # tile + lse/labels/mask
    else:
        # Beside the fp32 logits, their log-softmax and gradient: under autocast (mixed precision
        # without FSDP, whose parameters are already in the compute dtype) its compute-dtype copy
        # of the head weight, which the matmul saves for its backward.
        logits = LOSS_LIVE * s * V * FP32 + (V * h * b if st.autocast else 0)
    loss_ckpt = (L + 1) * R if (st.activation_checkpointing and not st.checkpoint_on_host) else 0
    # The loss is the first thing the backward runs, and every step starts with the gradients set
    # to None (zero_grad(set_to_none=True)): at the loss's peak no parameter has a gradient yet,
    # except the head's fp32 weight gradient, which the chunked loss accumulates tile by tile.
    # (Measured on CPU, llama3.2-1b with one layer, local, 2K tokens, bf16-mixed: 7.09 GiB; the
    # model without this rule said 8.28.)
    loss_grads = V * h * FP32 if st.chunked_loss else 0
    loss_phase = loss_ckpt + 3 * A + logits + loss_grads - states["grads"]

    # Tied embeddings: the backward ends in the embedding, where the head's gradient of the shared
    # weight, the embedding's own and their sum (before it becomes the .grad) are live at once,
    # V x h each: in the parameters' dtype (fp32 masters under bf16-mixed; `states` counts one of
    # them as the weight's gradient), or under FSDP in the compute dtype (the unsharded root's
    # gradients, before their reduce-scatter). Every other gradient is complete by then, and no
    # layer's activations are left. Measured on fake tensors (experiments.bench.memory_report,
    # llama3.2-1b, two layers, fpdt, bf16-mixed, 1K and 2K tokens): 7.68 GiB, the planner without
    # this moment 5.95.
    tied = 0
    if cfg.tie_embeddings and not st.fsdp:
        tied = 2 * V * h * st.pb
    elif cfg.tie_embeddings:
        # ... while the root's gradient shard does not exist yet (its reduce-scatter comes after)
        # and the blocks' unsharded parameters are resharded (the last block's gradient is still
        # in its reduce-scatter). Measured on fake tensors, llama3.2-1b with one layer, ulysses
        # on 2 ranks, 2K tokens: 4.1046 GiB, as predicted.
        blk = cfg.layer_params()
        root = cfg.num_params() - L * blk
        tied = 3 * V * h * b - (0 if st.offload_states else root * st.pb // st.ranks) - min(2, L) * blk * b
    embed_phase = tied - layers_saved  # the layers' saved tensors are gone by then

    phases = {"mlp backward": mlp_phase, "attention backward": attn_phase, "loss": loss_phase}
    if cfg.tie_embeddings:
        phases["embedding backward"] = embed_phase
    phase = max(phases, key=phases.get)
    act = phases[phase] + layers_saved
    grads = {"loss": loss_grads, "embedding backward": states["grads"] + tied}.get(phase, states["grads"])
    parts = {
        **states,
        "grads": grads,
        "tokens": tokens,
        "checkpoints": {"loss": loss_ckpt, "embedding backward": 0}.get(phase, ckpt),
        "layer activations": {
            "mlp backward": hidden + layers_saved,
            "attention backward": hidden_attn + layers_saved,
            "loss": 3 * A + layers_saved,
            "embedding backward": 0,
        }[phase],  # fmt: skip
        "attention": (attn_saved if phase == "mlp backward" else attn_work if phase == "attention backward" else 0),
        "mlp transient": mlp if phase == "mlp backward" else 0,
        "loss transient": logits if phase == "loss" else 0,
    }
    return Memory(parts, fixed + tokens + act, phase, phases, _host(st))


def _whole_qkv(st: Setup) -> tuple[int, int, int]:
    """Bytes of one rank's attention q (and o) and of its k (and v) when the attention is not
    chunked: ``S/R`` tokens (the whole sequence, or one ring position's share) of ``H/U`` query
    heads, and of the K/V heads each rank holds; and those tokens."""
    cfg, b = st.cfg, st.dtype_bytes
    tokens = st.seq_len // st.R
    return tokens * (cfg.n_heads // st.U) * cfg.head_dim * b, tokens * st.kv_heads * cfg.head_dim * b, tokens


def _attn_saved(st: Setup) -> int:
    """Ulysses, ring, usp (and local): the attention saves q, k, v, o of the tokens it attends for
    (``S/R`` of them, ``H/U`` heads) and the fp32 lse; RoPE saves its fp32 cos/sin tables."""
    Q, KV, tokens = _whole_qkv(st)
    return 2 * Q + 2 * KV + tokens * (st.cfg.n_heads // st.U) * FP32 + 2 * tokens * st.cfg.head_dim * FP32


def _attn_kept(st: Setup) -> int:
    """What one layer's attention keeps on the device for the backward: FPDT keeps its chunks in
    the host store with offload, else all ``u`` chunks' q, k, v, o, lse; Ulysses its saved tensors."""
    if not st.pipelined:
        return _attn_saved(st)
    if st.offload:
        return 0
    sz = chunk_bytes(st)
    o = st.C * (st.cfg.n_heads // st.gpus) * (st.cfg.head_dim * st.dtype_bytes + FP32)
    return st.chunks * (sz["q"] + sz["kv"] + o)


def _mlp_saved(st: Setup) -> int:
    """Without checkpointing every layer keeps its MLP's saved tensors (or only its input, chunked)."""
    if st.chunked_mlp:
        return 0
    return (MLP_LIVE[st.cfg.activation] - 2) * st.s * st.cfg.ffn_hidden * st.dtype_bytes


def _attn_backward_working_set(st: Setup) -> int:
    cfg, b, P = st.cfg, st.dtype_bytes, st.gpus
    if not st.pipelined:
        # saved q, k, v, o, lse, rope + gradients dq, dk, dv and the gathered output gradient
        Q, KV, _ = _whole_qkv(st)
        ring = 0
        if st.R > 1:
            # the K/V block in use and the one arriving, and the fp32 dK/dV accumulating and the
            # one moving on (parallel/ring.py)
            ring = 2 * 2 * KV + 2 * 2 * KV * FP32 // b
        return _attn_saved(st) + 2 * Q + 2 * KV + ring
    sizes = chunk_bytes(st)
    x_chunk = (st.C // P) * cfg.hidden * b if st.offload else 0
    # The block input's chunks are views, except the copies the backward fetches back.
    nbytes = {**sizes, "x": x_chunk}.__getitem__
    pipeline = backward_residency_of(st).peak_bytes(nbytes) + comm_region_bytes(st)
    if not st.offload:  # everything the forward saved stays resident
        pipeline += _attn_kept(st)
    # dx [s, h] and the fp32 QKV weight gradient, allocated for the whole call
    wqkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * cfg.hidden
    return pipeline + st.s * cfg.hidden * b + wqkv * FP32


def _host(st: Setup) -> dict[str, int]:
    """Host bytes per rank: host-kept checkpoints (L layer inputs), the sharded model states with
    ``offload_states``, and the FPDT host store, which with checkpointing holds one layer's saved
    chunks at a time (the recompute forward saves, its backward frees) in buffers allocated once
    per shape: u x (x, q, k, v, o, lse) and the output projection's saved input (the attention
    output), plus the backward's gradient round trips (:meth:`Residency.host_bytes`: the output
    gradients and fp32 dq of the KV-outer order, or the fp32 dK/dV of the query-outer order)."""
    cfg, b, u = st.cfg, st.dtype_bytes, st.chunks
    host = {"checkpoints": 0, "offload store": 0, "model states": 0}
    if st.offload_states:
        host["model states"] = sum(_sharded_states(st).values())
    if st.activation_checkpointing and st.checkpoint_on_host:
        host["checkpoints"] = cfg.n_layers * st.s * cfg.hidden * st.rb
    if st.pipelined and st.offload:
        copy = copy_sizes(st)
        per_chunk = copy["x"] + copy["q"] + copy["kv"] + copy["o"]
        grads = backward_residency_of(st).host_bytes(copy.__getitem__)
        # With checkpointing one layer's chunks at a time; without, every layer's forward saves.
        # The output projection's input (the attention output [s, H, d]) waits on the host too.
        layers = 1 if st.activation_checkpointing else cfg.n_layers
        projection_input = st.s * cfg.n_heads * cfg.head_dim * b
        host["offload store"] = layers * (u * per_chunk + projection_input) + grads
    return host


# --- time --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Achieved rates: FLOP/s for matmuls and attention, bytes/s for PCIe and all-to-all."""

    dense_flops: float
    attention_flops: float
    pcie_bytes: float
    a2a_bytes: float
    fsdp_bytes: float
    p2p_bytes: float = 0.0  # one direction of a ring link (ring, usp); 0: a2a_bytes
    host_adam_params: float = 1.0  # parameters/s AdamW steps on the host (offload_states)


@dataclass(frozen=True)
class StepTime:
    seconds: float
    parts: dict[str, float]


def _a2a_seconds(payload: int, st: Setup, rates: Rates) -> float:
    """An all-to-all of ``payload`` bytes per rank over the ``U`` head-splitting ranks sends
    ``(U-1)/U`` of it."""
    return payload * (st.U - 1) / st.U / rates.a2a_bytes


def _ring_pass_seconds(compute: float, payload: int, st: Setup, rates: Rates) -> float:
    """One pass of ``R`` ring steps: step ``t``'s compute (``compute / R``) overlaps the transfer of
    the next block (``payload`` bytes to the neighbour); the last step sends nothing."""
    R = st.R
    if R == 1:
        return compute
    step, comm = compute / R, payload / (rates.p2p_bytes or rates.a2a_bytes)
    return (R - 1) * max(step, comm) + step


def _op_seconds(op, st: Setup, rates: Rates, sizes: dict[str, int]) -> float:
    cfg, P, C = st.cfg, st.gpus, st.C
    c, hq, d, h = C // P, cfg.n_heads // P, cfg.head_dim, cfg.hidden
    qkv_cols = (cfg.n_heads + 2 * cfg.n_kv_heads) * d
    if op.kind in (Kind.FETCH, Kind.OFFLOAD):
        return sizes["copy"][buffer_family(op.buffer)] / rates.pcie_bytes
    if op.kind == Kind.FREE:
        return 0.0
    if op.kind == Kind.PROJECT:
        return 2 * c * h * qkv_cols / rates.dense_flops
    if op.kind in (Kind.PROJ_BWD_Q, Kind.PROJ_BWD_KV):
        cols = cfg.n_heads * d if op.kind == Kind.PROJ_BWD_Q else 2 * cfg.n_kv_heads * d
        return 2 * 2 * c * h * cols / rates.dense_flops
    if op.kind in (Kind.ATTN_FWD, Kind.ATTN_BWD):
        i, j = op.chunk if op.kind == Kind.ATTN_FWD else op.chunk[::-1]  # (query chunk, KV chunk)
        flops = 4 * block_square(st, i, j) * hq * d
        return flops * (2.5 if op.kind == Kind.ATTN_BWD else 1.0) / rates.attention_flops
    payload = {
        Kind.A2A_QKV: sizes["qkv"],
        Kind.A2A_OUT: sizes["dqloc"],
        Kind.A2A_DO: sizes["dqloc"],
        Kind.A2A_DQ: sizes["dqloc"],
        Kind.A2A_DKV: sizes["dkvloc"],
    }[op.kind]
    return _a2a_seconds(payload, st, rates)


def _pricer(st: Setup, rates: Rates):
    """An op's seconds (:func:`_op_seconds`), computed once per kind and size: an attention
    block's cost follows its query-key pairs, any other op's its kind and buffer family."""
    sizes = {**chunk_bytes(st), "copy": copy_sizes(st)}
    memo: dict[tuple, float] = {}

    def price(op) -> float:
        if op.kind in (Kind.ATTN_FWD, Kind.ATTN_BWD):
            i, j = op.chunk if op.kind == Kind.ATTN_FWD else op.chunk[::-1]
            key = (op.kind, block_square(st, i, j))
        else:
            key = (op.kind, buffer_family(op.buffer) if op.kind in (Kind.FETCH, Kind.OFFLOAD) else None)
        if key not in memo:
            memo[key] = _op_seconds(op, st, rates, sizes)
        return memo[key]

    return price


def attention_layer_seconds(st: Setup, rates: Rates, *, copies: bool = True) -> float:
    """One layer's attention core (QKV projection, all-to-alls, blocks, projection backward) for
    a training step: the no-grad forward of checkpointing, the recompute forward, the backward.

    The FPDT pipeline's time is the makespan of its schedules replayed on four streams
    (:meth:`Program.time`): each op starts when its stream is free and its dependencies have
    finished (CUDA events), in issue order per stream. A ``free`` occupies no stream: the
    executor drops the reference on the host, and the op that next takes the freed memory waits
    for its users' events. The replay assumes that memory is free by then (the runner hands out
    the slot given back longest ago), so no op waits for a ``free``. ``copies=False`` makes
    host-device copies free (the ideal an overlapped pipeline approaches)."""
    if st.pipelined:
        programs = [forward_program(st, True), backward_program(st)]
        if st.activation_checkpointing:
            programs.append(forward_program(st, False))
        price = _pricer(st, rates)
        return sum(p.time(p.costs(price), copies=copies) for p in programs)
    # Ulysses/ring/usp/local: the whole sequence's (or one ring position's) attention; the
    # all-to-alls block, the ring's transfers overlap its steps (the zigzag balances them).
    cfg, s = st.cfg, st.s
    hq, d = cfg.n_heads // st.U, cfg.head_dim
    fwd_attn = 2 * square_tokens(st) / st.R * hq * d / rates.attention_flops  # causal: half the pairs
    qkv = s * (cfg.n_heads + 2 * cfg.n_kv_heads) * d * st.dtype_bytes
    o = s * cfg.n_heads * d * st.dtype_bytes
    a2a = _a2a_seconds(qkv + o, st, rates) if st.U > 1 else 0.0
    proj = 2 * s * cfg.hidden * (cfg.n_heads + 2 * cfg.n_kv_heads) * d / rates.dense_flops
    _, KV, _ = _whole_qkv(st)
    kv_block, dkv_block = 2 * KV, 2 * KV * FP32 // st.dtype_bytes
    fwd = _ring_pass_seconds(fwd_attn, kv_block, st, rates) + a2a + proj
    bwd_attn = _ring_pass_seconds(2.5 * fwd_attn, kv_block, st, rates)
    if st.R > 1:
        # Each step's partial dK/dV moves on after the step (one fp32 block, not overlapped: a
        # second one in flight would cost another block of device memory), the last hop home.
        bwd_attn += st.R * dkv_block / (rates.p2p_bytes or rates.a2a_bytes)
    n_fwd = 2 if st.activation_checkpointing else 1
    return n_fwd * fwd + bwd_attn + a2a + 2 * proj


def step_seconds(st: Setup, rates: Rates) -> StepTime:
    """Compute at the achieved rates, the FPDT pipeline by schedule replay, FSDP gathers and
    checkpoint copies overlapped with compute (their excess shows up)."""
    cfg, s, b, L = st.cfg, st.s, st.dtype_bytes, st.cfg.n_layers
    h, f, d = cfg.hidden, cfg.ffn_hidden, cfg.head_dim
    n_fwd = 2 if st.activation_checkpointing else 1  # forward passes of each layer
    # Dense work outside the attention core: output projection and MLP, 3 x forward, plus what
    # the backward recomputes. A checkpoint's recompute runs the projection, and the MLP only
    # when it is the plain one (the chunked MLP's backward recomputes its tiles' inner
    # activations from its input, so the recompute skips its forward); the chunked loss makes
    # its gradients with the logits, so the head is 3 x forward either way.
    mlp_mats = 3 if cfg.activation == "swiglu" else 2
    proj_fwd, mlp_fwd = 2 * s * h * cfg.n_heads * d, 2 * s * mlp_mats * h * f
    mlp_recompute = 2 * s * (mlp_mats - 1) * h * f if st.chunked_mlp else 0  # tile recompute in the backward
    recompute = 0
    if st.activation_checkpointing:
        recompute = proj_fwd + (mlp_fwd if st.legacy_recompute or not st.chunked_mlp else 0)
    dense_layer = 3 * (proj_fwd + mlp_fwd) + recompute + mlp_recompute
    head_fwd = 2 * s * h * cfg.vocab_size
    head = (4 if st.chunked_loss and st.legacy_recompute else 3) * head_fwd
    compute = (L * dense_layer + head) / rates.dense_flops
    attention = L * attention_layer_seconds(st, rates)
    parts = {"compute": compute, "attention": attention}
    overlapped = 0.0
    if st.fsdp:
        W = st.ranks
        blk = cfg.layer_params()
        gathers = (n_fwd + 1) * blk * b * (W - 1) / W  # all-gathers in the compute dtype
        reduce = blk * max(b, st.pb) * (W - 1) / W  # reduce-scatter in the reduce dtype
        overlapped = max(overlapped, L * (gathers + reduce) / rates.fsdp_bytes)
    if st.offload_states:
        # Each all-gather first copies the host shard in, each gradient shard goes out, and the
        # optimizer steps on the host after the backward (not overlapped).
        shard = cfg.num_params() * st.pb / st.ranks
        overlapped = max(overlapped, ((n_fwd + 1) * shard + shard) / rates.pcie_bytes)
        parts["host optimizer"] = cfg.num_params() / st.ranks / rates.host_adam_params
    if st.activation_checkpointing and st.checkpoint_on_host:
        overlapped = max(overlapped, 2 * L * s * h * b / rates.pcie_bytes)
    parts["exposed transfers"] = max(0.0, overlapped - (compute + attention))
    return StepTime(sum(parts.values()), parts)
