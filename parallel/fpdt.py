"""The FPDT attention block: Ulysses done chunk by chunk, with host offload.

``fpdt_attention_core`` applies one autograd node (``_FPDTAttention``) whose forward and backward
each build a schedule (:mod:`parallel.schedule`) and run it (:mod:`parallel.executor`); this file
holds the handlers that implement each op kind on one rank. The QKV projection of chunk ``i`` and its
backward are fused into the pipeline, so full-length Q/K/V never exist; the output projection
runs outside, under autograd, on the local ``[B, S/P, H*d]`` output.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass

import torch

import fpdt_kernels

from .all_to_all import (
    head_to_seq_into,
    kv_head_to_seq_grad_into,
    kv_heads_per_rank,
    kv_seq_to_head_into,
    seq_to_head_into,
)
from .amp import autocast_state, restore_autocast
from .distributed import SPGroup
from .executor import DeviceBuffers, Env, Timeline, current_stream, record_event, run_schedule, wait_events
from .host_store import HostBuffer, HostStore, copy_rows
from .layout import document_positions, shard
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_backward, apply_rotary_into
from .schedule import (
    Kind,
    Op,
    Schedule,
    backward_schedule,
    buffer_family,
    check_backward_order,
    document_pairs,
    forward_schedule,
    resolve_backward_order,
)

_A2A = (Kind.A2A_QKV, Kind.A2A_OUT, Kind.A2A_DO, Kind.A2A_DQ, Kind.A2A_DKV)


@dataclass(frozen=True)
class FPDTSpec:
    """Everything about one FPDT block call that is not a tensor."""

    group: SPGroup
    chunks: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool = True
    offload: bool = True
    rope: RotaryEmbedding | None = None
    softmax_scale: float | None = None
    store: HostStore | None = None
    timeline: Timeline | None = None
    # Packed documents: int32 offsets over the flattened [B * S] tokens (flash-attn's varlen
    # convention). Attention stays inside documents, RoPE restarts at each, and the schedules
    # omit the chunk blocks that share no document.
    cu_seqlens: torch.Tensor | None = None
    # The backward's outer loop (parallel.schedule.backward_schedule): "kv" (the paper's), "query",
    # or "auto": the one that moves fewer bytes between host and device ("kv" without offload).
    backward_order: str = "auto"

    def __post_init__(self):
        check_backward_order(self.backward_order)


@dataclass(frozen=True)
class CommRegion:
    """The layout rules of the communication stream's scratch region of one run (see
    ``_Runner._scratch_bytes``), from the shapes alone, so the planner sizes it as the runner does.

    ``batch, chunk_tokens, heads, head_dim``: a query chunk after the all-to-all ``[B, C, H/P, d]``
    in ``itemsize`` bytes per element; ``ranks``: ``P``; ``rope_span``: float64 elements of the
    RoPE angles of ``C`` positions (``RotaryEmbedding.span_work``).
    """

    batch: int
    chunk_tokens: int
    heads: int
    head_dim: int
    itemsize: int
    ranks: int
    rope_span: int

    @property
    def chunk_bytes(self) -> int:
        """Bytes of the largest chunk an all-to-all moves: ``[B, C, H/P, d]`` in the input dtype."""
        return self.batch * self.chunk_tokens * self.heads * self.head_dim * self.itemsize

    @property
    def tables_bytes(self) -> int:
        """fp32 cos/sin ``[C, d]``."""
        return 2 * self.chunk_tokens * self.head_dim * 4

    @property
    def head_work_bytes(self) -> int:
        """fp32 work of rotating one head of a ``[B, C, heads, d]`` chunk (``apply_rotary_into``:
        a copy of the input and the result)."""
        return 2 * self.batch * self.chunk_tokens * self.head_dim * 4

    @property
    def rope_heads(self) -> int:
        """Heads rotated at once: as many as fit beside the tables in the bytes the all-to-all
        takes anyway, and at least a quarter of this rank's query heads (at most four passes)."""
        spare = (2 * self.chunk_bytes if self.ranks > 1 else 0) - self.tables_bytes
        return min(self.heads, max(1, spare // self.head_work_bytes, -(-self.heads // 4)))

    def size(self, moves: bool, rope: bool) -> int:
        """Bytes of the region: ``send`` and ``recv`` of an all-to-all (``moves``), or the RoPE
        tables, then their angles or the rotation's work (``rope``), whichever is larger."""
        size = 2 * self.chunk_bytes if moves else 0
        if rope:
            work = self.rope_heads * self.head_work_bytes
            size = max(size, self.tables_bytes + max(self.rope_span * 8, work))
        return size


def _release_all(store: HostStore, host: dict[str, tuple[HostBuffer, ...]]) -> None:
    for bufs in host.values():
        for buf in bufs:
            store.release(buf)
    host.clear()


class _Runner:
    """One rank's state for one FPDT block call: device buffers (``env``) and host copies.

    Each run (forward, backward) takes the device memory its side-stream ops write, fetch
    destinations and all-to-all/RoPE outputs and temporaries, and the backward's fp32 gradient
    accumulators, from one :class:`DeviceBuffers` made on the caller's stream when the run
    starts: a ring of slots sized from the schedule (:meth:`_slot_counts`) and one scratch region
    for the communication stream (:meth:`_scratch_bytes`). Side streams allocate nothing. A
    saving forward hands its free slots to the next run on the device
    (:meth:`DeviceBuffers.park`): when that is its backward, the backward's first fetches need
    not wait for the caller's stream.
    """

    def __init__(self, spec: FPDTSpec, x: torch.Tensor, wqkv, bqkv):
        self.spec = spec
        self.x, self.wqkv, self.bqkv = x, wqkv, bqkv
        self.device = x.device
        self.cuda = x.device.type == "cuda"
        self.dtype = x.dtype
        self.acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # the kernels' fp32 state
        B, s, h = x.shape
        P = spec.group.size
        self.c = s // spec.chunks  # local tokens per chunk
        self.C = self.c * P  # global tokens per chunk
        d = spec.head_dim
        self.q_shape = (B, self.C, spec.n_heads // P, d)  # after the all-to-all: [B, C, H/P, d]
        self.kv_shape = (B, self.C, kv_heads_per_rank(spec.n_kv_heads, P), d)
        self.x_shape = (B, self.c, h)
        span = spec.rope.span_work(self.C) if spec.rope is not None else 0
        self.region = CommRegion(B, self.C, spec.n_heads // P, d, x.dtype.itemsize, P, span)
        self.scale = 1.0 / math.sqrt(d) if spec.softmax_scale is None else spec.softmax_scale
        self.env = Env(self.cuda)
        self.bufs: DeviceBuffers | None = None
        self.ready: dict[str, object] = {}  # events of the forward's writes, for the backward
        self.store = spec.store
        self.host: dict[str, tuple[HostBuffer, ...]] = {}
        # Host buffers return to the pool when the backward finishes, or when this runner is
        # dropped without one (e.g. the graph was freed).
        self._finalizer = weakref.finalize(self, _release_all, self.store, self.host)
        for i in range(spec.chunks):
            self.env.write(f"x[{i}]", (self._local(x, i),))
        self.pairs = self.positions = None
        if spec.cu_seqlens is not None:
            S = s * P
            self.pairs = document_pairs(spec.cu_seqlens, B, S, spec.chunks)
            # This rank's tokens' positions in their documents, in its layout order: RoPE is applied
            # to them on the compute stream, before the all-to-all moves the chunk.
            self.positions = shard(document_positions(spec.cu_seqlens, B, S), P, spec.chunks, spec.group.rank, 1)

    def _local(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t[:, i * self.c : (i + 1) * self.c]

    # --- device memory of a run --------------------------------------------------------------
    def _value(self, family: str) -> list[tuple[tuple, torch.dtype]]:
        """Shapes and dtypes of a buffer family's tensors (what an offload stores)."""
        dt, q = self.dtype, self.q_shape
        return {
            "x": [(self.x_shape, dt)],
            "q": [(q, dt)],
            "kv": [(self.kv_shape, dt)] * 2,
            "o": [(q, dt), ((q[0], q[2], q[1]), self.acc)],  # out, lse [B, H/P, C]
            "do": [(q, dt)],
            "dq": [(q, self.acc)],
            "dkv": [(self.kv_shape, self.acc)] * 2,
        }[family]

    def backward_order(self) -> str:
        """The backward's outer loop: the spec's, or for ``"auto"`` the one that moves fewer bytes."""
        spec = self.spec
        families = ("x", "q", "kv", "o", "do", "dq", "dkv")
        sizes = {f: sum(math.prod(s) * t.itemsize for s, t in self._value(f)) for f in families}
        return resolve_backward_order(
            spec.backward_order, spec.chunks, sizes, offload=spec.offload, causal=spec.causal, pairs=self.pairs
        )

    def _slot_writes(self, op: Op) -> dict[str, list[tuple[int, torch.dtype]]]:
        """The slots each buffer ``op`` writes takes, as ``(numel, dtype)`` (mirrors the handlers)."""
        dt, n = self.dtype, math.prod(self.q_shape)
        kv, loc_kv = math.prod(self.kv_shape), self.c * self.kv_shape[0] * self.spec.n_kv_heads * self.spec.head_dim
        if op.kind == Kind.FETCH:
            return {op.buffer: [(math.prod(shape), t) for shape, t in self._value(buffer_family(op.buffer))]}
        if op.kind == Kind.A2A_QKV:
            return {op.writes[0]: [(n, dt)], op.writes[1]: [(kv, dt)] * 2}
        if op.kind == Kind.A2A_OUT:
            return {f"o[{op.chunk[0]}]": [(n, dt)]}
        if op.kind == Kind.A2A_DO and self.spec.group.size > 1:
            return {op.writes[0]: [(n, dt)]}
        if op.kind == Kind.A2A_DQ:
            return {op.writes[0]: [(n, dt)]}  # [B, c, H, d]: as many elements as [B, C, H/P, d]
        if op.kind == Kind.A2A_DKV:
            return {op.writes[0]: [(loc_kv, dt)] * 2}
        if op.kind == Kind.ATTN_BWD:  # a block that starts an accumulator (mirrors attn_bwd)
            dq, dkv = op.writes
            made = {dq: [(n, self.acc)]} if dq not in op.reads else {}
            if dkv not in op.reads:
                made[dkv] = [(kv, self.acc)] * 2
            return made
        return {}

    def _slot_counts(self, schedule: Schedule) -> Counter:
        """The most slots of each ``(numel, dtype)`` the run holds at once.

        Replays the schedule as :class:`Env` and :class:`DeviceBuffers` run it: an op takes its
        slots before the ones it replaces are given back; a buffer's slots are given back when it
        is freed, rewritten by an op that does not read it, or rewritten into new slots
        (``a2a_out``'s input-dtype copy of ``o``); any other read-and-write accumulates in place
        and keeps them.
        """
        live: dict[str, list] = {}
        held, peak = Counter(), Counter()
        for op in schedule.ops:
            made = {} if op.kind == Kind.FREE else self._slot_writes(op)
            for keys in made.values():
                held.update(keys)
            peak |= held
            for name in op.writes:
                if op.kind == Kind.FREE or name in made or name not in op.reads:
                    held.subtract(live.pop(name, []))
                if name in made:
                    live[name] = made[name]
        return peak

    def _scratch_bytes(self, schedule: Schedule) -> dict[str, int]:
        """The communication stream's scratch, in bytes: one region, ``comm``, that each of its ops
        lays out in turn (they run in order on that stream, so one op's layout is dead when the
        next starts):

        * an all-to-all: ``send`` at byte 0 and ``recv`` after it, each the largest chunk moved
          (``[B, C, H/P, d]``); the KV replicas before their sum land at byte 0 once ``send`` has
          gone out;
        * RoPE: fp32 cos/sin ``[C, d]`` at byte 0, then the float64 angles that build them, then,
          once they are built, the fp32 work of the rotation, a few heads at a time
          (:attr:`CommRegion.rope_heads`).

        An op that does both does them one after the other: ``a2a_qkv`` moves q, k, v into their
        slots and then rotates them there; ``a2a_dq``/``a2a_dkv`` rotate the gradient in its fp32
        accumulator (freed after the op) and then move it. So the region is the larger of the two
        layouts, not their sum.
        """
        kinds = schedule.counts()
        moves = self.spec.group.size > 1 and any(kinds[k] for k in _A2A)
        rope = self._rope_in_a2a() and any(kinds[k] for k in (Kind.A2A_QKV, Kind.A2A_DQ, Kind.A2A_DKV))
        size = self.region.size(moves, rope)
        return {"comm": size} if size else {}

    def _send_recv(self):
        if self.spec.group.size == 1:
            return None, None
        n, size = math.prod(self.q_shape), self.region.chunk_bytes
        return self.bufs.scratch("comm", (n,), self.dtype), self.bufs.scratch("comm", (n,), self.dtype, offset=size)

    def _tables(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        C, d = self.C, self.spec.head_dim
        cos, sin = self.bufs.scratch("comm", (2, C, d), torch.float32)
        rope = self.spec.rope
        angles = self.bufs.scratch("comm", (rope.span_work(C),), torch.float64, offset=self.region.tables_bytes)
        rope.span_into(i * C, cos, sin, angles)
        return cos, sin

    def _rotate(self, x: torch.Tensor, tables, *, inverse: bool = False, out: torch.Tensor | None = None) -> None:
        """RoPE of ``x [B, C, heads, d]`` into ``out`` (default: in place), :attr:`CommRegion.rope_heads`
        heads at a time through the work after the tables: elementwise, so the bits are those of
        one pass over the whole chunk."""
        out = x if out is None else out
        step = self.region.rope_heads
        for h in range(0, x.shape[2], step):
            part = x[:, :, h : h + step]
            work = self.bufs.scratch("comm", (2 * part.numel(),), torch.float32, offset=self.region.tables_bytes)
            apply_rotary_into(part, *tables, work, inverse=inverse, out=out[:, :, h : h + step])

    def _documents(self) -> dict:
        """The chunk kernels' document argument, given only for packed documents."""
        return {} if self.spec.cu_seqlens is None else {"cu_seqlens": self.spec.cu_seqlens}

    def _rope_in_a2a(self) -> bool:
        """RoPE at the global positions of a contiguous chunk, on the communication stream; with
        packed documents it is applied per token in the local layout instead (:meth:`_doc_rope`)."""
        return self.spec.rope is not None and self.positions is None

    def _doc_rope(self, t: torch.Tensor, i: int, inverse: bool = False) -> torch.Tensor:
        """Rotate local chunk ``i`` (``[B, c, heads, d]``) at its tokens' document positions."""
        cos, sin = self.spec.rope.tables(self._local(self.positions, i).to(t.device))
        return apply_rotary_backward(t, cos, sin) if inverse else apply_rotary(t, cos, sin)

    # --- ops shared by both directions -------------------------------------------------------
    def offload(self, op: Op) -> None:
        name = op.buffer
        bufs = []
        for t in self.env.read(name):
            buf = self.store.acquire(t.shape, t.dtype)
            if self.cuda:
                wait_events(current_stream(), buf.before_write())
            copy_rows(buf.tensor, t, non_blocking=self.cuda)
            bufs.append(buf)
        if self.cuda:
            event = record_event()
            for buf in bufs:
                buf.wrote(event)
        old = self.host.get(name)
        if old is not None:  # overwrite (dq round trip): give the previous buffers back
            for buf in old:
                self.store.release(buf)
        self.host[name] = tuple(bufs)

    def fetch(self, op: Op) -> None:
        name = op.buffer
        out = []
        for buf in self.host[name]:
            if self.cuda:
                wait_events(current_stream(), buf.before_read())
            t = self.bufs.take(buf.tensor.shape, buf.tensor.dtype)
            t.copy_(buf.tensor, non_blocking=self.cuda)
            out.append(t)
        if self.cuda:
            event = record_event()
            for buf in self.host[name]:
                buf.read(event)
        self.env.write(name, tuple(out))

    def free(self, op: Op) -> None:
        self.env.pop(op.buffer)

    # --- forward -----------------------------------------------------------------------------
    def project(self, op: Op) -> None:
        (i,) = op.chunk
        (x,) = self.env.read(f"x[{i}]")
        B, c, _ = x.shape
        H, Hkv, d = self.spec.n_heads, self.spec.n_kv_heads, self.spec.head_dim
        qkv = torch.nn.functional.linear(x, self.wqkv, self.bqkv)
        q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
        q, k, v = q.reshape(B, c, H, d), k.reshape(B, c, Hkv, d), v.reshape(B, c, Hkv, d)
        if self.spec.rope is not None and self.positions is not None:
            q, k = self._doc_rope(q, i), self._doc_rope(k, i)
        self.env.write(f"qkv[{i}]", (q, k, v))

    def a2a_qkv(self, op: Op) -> None:
        (i,) = op.chunk
        g, rope = self.spec.group, self._rope_in_a2a()
        q, k, v = self.env.read(f"qkv[{i}]")
        qo = self.bufs.take(self.q_shape, self.dtype)  # [B, c, H, d] -> [B, C, H/P, d]
        ko, vo = (self.bufs.take(self.kv_shape, self.dtype) for _ in range(2))  # -> [B, C, Hkv', d]
        if rope and g.size == 1:  # nothing to move: rotate straight into the slots
            tables = self._tables(i)
            self._rotate(q, tables, out=qo)
            self._rotate(k, tables, out=ko)
            vo.copy_(v)
        else:
            send, recv = self._send_recv()
            seq_to_head_into(q, qo, g, send, recv)
            kv_seq_to_head_into(k, ko, g, send, recv)
            kv_seq_to_head_into(v, vo, g, send, recv)
            if rope:  # in the slots, with the region the moves are done with
                tables = self._tables(i)
                self._rotate(qo, tables)
                self._rotate(ko, tables)
        self.env.write(f"q[{i}]", (qo,))
        self.env.write(f"kv[{i}]", (ko, vo))

    def attn_fwd(self, op: Op) -> None:
        i, j = op.chunk
        (q,) = self.env.read(f"q[{i}]")
        k, v = self.env.read(f"kv[{j}]")
        acc = self.env.read(f"o[{i}]") if f"o[{i}]" in op.reads else (None, None)
        o, lse = fpdt_kernels.attention_chunk_forward(
            q,
            k,
            v,
            q_start=i * self.C,
            k_start=j * self.C,
            causal=self.spec.causal and i == j,
            softmax_scale=self.scale,
            out=acc[0],
            lse=acc[1],
            **self._documents(),
        )
        self.env.write(f"o[{i}]", (o, lse))

    def a2a_out(self, op: Op) -> None:
        (i,) = op.chunk
        o, lse = self.env.read(f"o[{i}]")
        od = self.bufs.take(self.q_shape, self.dtype)
        od.copy_(o)  # saved for the backward in the input dtype
        head_to_seq_into(od, self._local(self.out, i), self.spec.group, *self._send_recv())  # -> [B, c, H, d]
        self.env.write(f"o[{i}]", (od, lse))

    # --- backward ----------------------------------------------------------------------------
    def a2a_do(self, op: Op) -> None:
        (j,) = op.chunk
        (dout,) = self.env.read(f"dout[{j}]")
        if self.spec.group.size == 1:
            do = dout  # the caller's gradient itself: the kernels take any strides but the last
        else:
            do = self.bufs.take(self.q_shape, self.dtype)
            seq_to_head_into(dout, do, self.spec.group, *self._send_recv())
        self.env.write(f"do[{j}]", (do,))

    def attn_bwd(self, op: Op) -> None:
        i, j = op.chunk
        (q,) = self.env.read(f"q[{j}]")
        k, v = self.env.read(f"kv[{i}]")
        o, lse = self.env.read(f"o[{j}]")
        (do,) = self.env.read(f"do[{j}]")
        # A block that starts an accumulator takes it from the ring (counted by _slot_writes).
        if f"dq[{j}]" in op.reads:
            (dq,) = self.env.read(f"dq[{j}]")
        else:
            dq = self.bufs.take(q.shape, self.acc).zero_()
        if f"dkv[{i}]" in op.reads:
            dk, dv = self.env.read(f"dkv[{i}]")
        else:
            dk, dv = (self.bufs.take(k.shape, self.acc).zero_() for _ in range(2))
        dq, dk, dv = fpdt_kernels.attention_chunk_backward(
            do,
            q,
            k,
            v,
            o,
            lse,
            q_start=j * self.C,
            k_start=i * self.C,
            causal=self.spec.causal and i == j,
            softmax_scale=self.scale,
            dq=dq,
            dk=dk,
            dv=dv,
            **self._documents(),
        )
        self.env.write(f"dq[{j}]", (dq,))
        self.env.write(f"dkv[{i}]", (dk, dv))

    def a2a_dq(self, op: Op) -> None:
        (j,) = op.chunk
        (dq,) = self.env.read(f"dq[{j}]")
        if self._rope_in_a2a():  # in the fp32 accumulator, which nothing reads after this op
            self._rotate(dq, self._tables(j), inverse=True)
        out = self.bufs.take(self.q_shape[:1] + (self.c, self.spec.n_heads, self.spec.head_dim), self.dtype)
        head_to_seq_into(dq, out, self.spec.group, *self._send_recv())  # cast to the input dtype on the way
        self.env.write(f"dqloc[{j}]", (out,))

    def a2a_dkv(self, op: Op) -> None:
        (i,) = op.chunk
        g, n_kv = self.spec.group, self.spec.n_kv_heads
        dk, dv = self.env.read(f"dkv[{i}]")
        if self._rope_in_a2a():  # in the fp32 accumulator, which nothing reads after this op
            self._rotate(dk, self._tables(i), inverse=True)
        send, recv = self._send_recv()
        outs = []
        for grad in (dk, dv):
            out = self.bufs.take((self.q_shape[0], self.c, n_kv, self.spec.head_dim), self.dtype)
            # The replicas land where send was, once it has gone out; recv lies after it.
            gathered = self.bufs.scratch("comm", (grad.numel(),), self.dtype) if n_kv % g.size else None
            kv_head_to_seq_grad_into(grad, out, g, n_kv, send, recv, gathered)
            outs.append(out)
        self.env.write(f"dkvloc[{i}]", tuple(outs))

    def _proj_bwd(self, i: int, grads, start: int) -> None:
        """The QKV projection's backward for chunk ``i``: ``grads`` are the gradients of the parts
        (q; or k and v) whose weight rows follow ``start``. One part at a time, accumulated in
        place: no concatenated gradient and no product the size of ``dx``'s chunk (fp32 ``dw``
        takes its products in place too)."""
        (x,) = self.env.read(f"x[{i}]")
        x2 = x.reshape(-1, x.shape[-1])
        dx = self._local(self.dx, i)  # [B, c, h]
        for t in grads:
            g = t.reshape(t.shape[0], t.shape[1], -1)  # [B, c, n*d]
            rows = slice(start, start + g.shape[-1])
            start = rows.stop
            w = self.wqkv[rows]
            dx.baddbmm_(g, w.expand(g.shape[0], *w.shape))
            g2 = g.reshape(-1, g.shape[-1])
            if self.dw.dtype == g2.dtype:
                self.dw[rows].addmm_(g2.t(), x2)
            else:
                self.dw[rows] += (g2.t() @ x2).float()
            if self.db is not None:
                self.db[rows] += g2.float().sum(0)

    def proj_bwd_q(self, op: Op) -> None:
        (j,) = op.chunk
        (dq,) = self.env.read(f"dqloc[{j}]")
        if self.spec.rope is not None and self.positions is not None:
            dq = self._doc_rope(dq, j, inverse=True)
        self._proj_bwd(j, (dq,), 0)

    def proj_bwd_kv(self, op: Op) -> None:
        (i,) = op.chunk
        dk, dv = self.env.read(f"dkvloc[{i}]")
        if self.spec.rope is not None and self.positions is not None:
            dk = self._doc_rope(dk, i, inverse=True)
        self._proj_bwd(i, (dk, dv), self.spec.n_heads * self.spec.head_dim)

    def _handlers(self):
        return {kind: getattr(self, kind.value) for kind in Kind}

    # --- drivers -----------------------------------------------------------------------------
    def _run(self, schedule: Schedule, ready: dict | None = None) -> dict:
        self.bufs = DeviceBuffers(self.device, self._slot_counts(schedule), self._scratch_bytes(schedule))
        self.env.buffers = self.bufs
        try:
            events = run_schedule(
                schedule, self._handlers(), self.device, buffers=self.bufs, ready=ready, timeline=self.spec.timeline
            )
            if schedule.direction == "forward" and schedule.save:
                self.bufs.park()  # for the backward's first fetches
            return events
        finally:
            self.env.buffers = self.bufs = None

    def forward(self, save: bool) -> torch.Tensor:
        B, s, _ = self.x.shape
        spec = self.spec
        self.out = torch.empty(B, s, spec.n_heads, spec.head_dim, dtype=self.dtype, device=self.device)
        schedule = forward_schedule(spec.chunks, causal=spec.causal, offload=spec.offload, save=save, pairs=self.pairs)
        self.ready = self._run(schedule)
        out, self.out = self.out, None
        if not save:
            self.close()
        elif spec.offload:  # keep only the host copies (x stays referenced by autograd anyway)
            for name in self.env.names():
                self.env.pop(name)
            self.x = None
        return out

    def backward(self, dout: torch.Tensor):
        spec = self.spec
        self.dout = dout
        self.dx = torch.zeros(dout.shape[0], dout.shape[1], self.wqkv.shape[1], dtype=self.dtype, device=self.device)
        # Summed over the chunks in the accumulator dtype (fp32; float64 for float64 inputs).
        self.dw = torch.zeros(self.wqkv.shape, dtype=self.acc, device=self.device)
        self.db = None if self.bqkv is None else torch.zeros(self.bqkv.shape, dtype=self.acc, device=self.device)
        for j in range(spec.chunks):
            self.env.write(f"dout[{j}]", (self._local(dout, j),))
        schedule = backward_schedule(
            spec.chunks, causal=spec.causal, offload=spec.offload, pairs=self.pairs, order=self.backward_order()
        )
        self._run(schedule, ready=self.ready)
        dx, dw, db = self.dx, self.dw, self.db
        self.close()
        return dx, dw, db

    def close(self) -> None:
        """Drop device state and give the host buffers back to the store."""
        for name in self.env.names():
            self.env.pop(name)
        self.dout = self.dx = self.dw = self.db = None
        self.ready = {}
        self._finalizer()


class _FPDTAttention(torch.autograd.Function):
    """The whole FPDT attention of one block as one autograd node: the forward runs the forward
    schedule and keeps the runner (its host copies and device state), the backward runs the
    backward schedule on it.

    Under ``torch.autocast`` the pipeline computes in the autocast dtype, as autocast's own
    matmuls would: the input and weights are cast once at entry and every chunk, fetch and
    all-to-all is in that dtype; gradients return in the dtypes of the inputs (fp32 master
    weights get fp32 gradients from the fp32 accumulators).
    """

    @staticmethod
    def forward(ctx, x, wqkv, bqkv, spec, save):
        state = autocast_state(x.device)
        ctx.dtypes = (x.dtype, wqkv.dtype)
        if state is not None:
            x, wqkv = x.to(state[1]), wqkv.to(state[1])
            bqkv = None if bqkv is None else bqkv.to(state[1])
        with restore_autocast(None, x.device):  # the pipeline casts nothing itself
            runner = _Runner(spec, x, wqkv, bqkv)
            out = runner.forward(save)
        ctx.runner = runner if save else None
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.runner is None:
            raise RuntimeError("the FPDT forward ran without saving for the backward")
        runner, ctx.runner = ctx.runner, None
        x_dtype, w_dtype = ctx.dtypes
        # x is needed by the projection backward; with offload it comes from the host store.
        with restore_autocast(None, dout.device):
            dx, dw, db = runner.backward(dout.to(runner.dtype).contiguous())
        return (
            dx.to(x_dtype) if ctx.needs_input_grad[0] else None,
            dw.to(w_dtype) if ctx.needs_input_grad[1] else None,
            db.to(w_dtype) if db is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
        )


def fpdt_attention_core(x: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None, spec: FPDTSpec) -> torch.Tensor:
    """Attention of this rank's FPDT-layout tokens ``x [B, S/P, h]`` -> ``[B, S/P, H, d]``.

    Differentiable w.r.t. ``x``, ``wqkv`` and ``bqkv``. Saves for the backward only when grad
    mode is on and an input requires grad (a no-grad forward, e.g. the first pass of
    activation checkpointing, copies nothing to the host except KV chunks a later query chunk
    of the same forward still needs; non-causal, the chunks it prepares ahead, see
    :func:`~parallel.schedule.forward_schedule`).
    """
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, wqkv, bqkv))
    return _FPDTAttention.apply(x, wqkv, bqkv, spec, save)
