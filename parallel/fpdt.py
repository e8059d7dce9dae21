"""The FPDT attention block: Ulysses done chunk by chunk, with host offload.

``fpdt_attention_core`` is a ``torch.autograd.Function`` whose forward and backward each build a
schedule (:mod:`parallel.schedule`) and run it (:mod:`parallel.executor`); this file holds the
handlers that implement each op kind on one rank. The QKV projection of chunk ``i`` and its
backward are fused into the pipeline, so full-length Q/K/V never exist; the output projection
runs outside, under autograd, on the local ``[B, S/P, H*d]`` output.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

import kernels

from .all_to_all import _head_to_seq, _seq_to_head, kv_head_to_seq_grad, kv_seq_to_head
from .distributed import SPGroup
from .executor import Env, Timeline, run_schedule
from .host_store import HostBuffer, HostStore
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_backward
from .schedule import Kind, Op, backward_schedule, forward_schedule


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


def _release_all(store: HostStore, host: dict[str, tuple[HostBuffer, ...]]) -> None:
    for bufs in host.values():
        for buf in bufs:
            store.release(buf)
    host.clear()


class _Runner:
    """One rank's state for one FPDT block call: device buffers (``env``) and host copies."""

    def __init__(self, spec: FPDTSpec, x: torch.Tensor, wqkv, bqkv):
        self.spec = spec
        self.x, self.wqkv, self.bqkv = x, wqkv, bqkv
        self.device = x.device
        self.cuda = x.device.type == "cuda"
        self.dtype = x.dtype
        B, s, _ = x.shape
        self.c = s // spec.chunks  # local tokens per chunk
        self.C = self.c * spec.group.size  # global tokens per chunk
        self.scale = spec.softmax_scale or 1.0 / math.sqrt(spec.head_dim)
        self.env = Env(self.cuda)
        self.store = spec.store
        self.host: dict[str, tuple[HostBuffer, ...]] = {}
        # Host buffers return to the pool when the backward finishes, or when this runner is
        # dropped without one (e.g. the graph was freed).
        self._finalizer = weakref.finalize(self, _release_all, self.store, self.host)
        for i in range(spec.chunks):
            self.env.write(f"x[{i}]", (self._local(x, i),))

    def _local(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t[:, i * self.c : (i + 1) * self.c]

    def _rope(self, i: int):
        return self.spec.rope.span(i * self.C, self.C, device=self.device)

    # --- ops shared by both directions -------------------------------------------------------
    def offload(self, op: Op) -> None:
        name = op.buffer
        bufs = []
        for t in self.env.read(name):
            buf = self.store.acquire(t.shape, t.dtype)
            if self.cuda:
                buf.wait_writable()
            buf.tensor.copy_(t, non_blocking=self.cuda)
            bufs.append(buf)
        old = self.host.get(name)
        if old is not None:  # overwrite (dq round trip): give the previous buffers back
            for buf in old:
                self.store.release(buf)
        self.host[name] = tuple(bufs)

    def fetch(self, op: Op) -> None:
        name = op.buffer
        out = []
        for buf in self.host[name]:
            t = torch.empty(buf.tensor.shape, dtype=buf.tensor.dtype, device=self.device)
            t.copy_(buf.tensor, non_blocking=self.cuda)
            if self.cuda:
                buf.mark_read()
            out.append(t)
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
        self.env.write(f"qkv[{i}]", (q.reshape(B, c, H, d), k.reshape(B, c, Hkv, d), v.reshape(B, c, Hkv, d)))

    def a2a_qkv(self, op: Op) -> None:
        (i,) = op.chunk
        g = self.spec.group
        q, k, v = self.env.read(f"qkv[{i}]")
        q = _seq_to_head(q, g)  # [B, c, H, d] -> [B, C, H/P, d]
        k, v = kv_seq_to_head(k, g), kv_seq_to_head(v, g)  # -> [B, C, Hkv', d]
        if self.spec.rope is not None:
            cos, sin = self._rope(i)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        self.env.write(f"q[{i}]", (q.contiguous(),))
        self.env.write(f"kv[{i}]", (k.contiguous(), v.contiguous()))

    def attn_fwd(self, op: Op) -> None:
        i, j = op.chunk
        (q,) = self.env.read(f"q[{i}]")
        k, v = self.env.read(f"kv[{j}]")
        acc = self.env.read(f"o[{i}]") if f"o[{i}]" in op.reads else (None, None)
        o, lse = kernels.attention_chunk_forward(
            q,
            k,
            v,
            q_start=i * self.C,
            k_start=j * self.C,
            causal=self.spec.causal and i == j,
            softmax_scale=self.scale,
            out=acc[0],
            lse=acc[1],
        )
        self.env.write(f"o[{i}]", (o, lse))

    def a2a_out(self, op: Op) -> None:
        (i,) = op.chunk
        o, lse = self.env.read(f"o[{i}]")
        o = o.to(self.dtype)
        self._local(self.out, i).copy_(_head_to_seq(o, self.spec.group))  # -> [B, c, H, d]
        self.env.write(f"o[{i}]", (o, lse))  # saved for the backward in the input dtype

    # --- backward ----------------------------------------------------------------------------
    def a2a_do(self, op: Op) -> None:
        (j,) = op.chunk
        (dout,) = self.env.read(f"dout[{j}]")
        do = _seq_to_head(dout, self.spec.group)
        self.env.write(f"do[{j}]", (do.contiguous(),))

    def attn_bwd(self, op: Op) -> None:
        i, j = op.chunk
        (q,) = self.env.read(f"q[{j}]")
        k, v = self.env.read(f"kv[{i}]")
        o, lse = self.env.read(f"o[{j}]")
        (do,) = self.env.read(f"do[{j}]")
        dq = self.env.read(f"dq[{j}]")[0] if f"dq[{j}]" in op.reads else None
        dk, dv = self.env.read(f"dkv[{i}]") if f"dkv[{i}]" in op.reads else (None, None)
        dq, dk, dv = kernels.attention_chunk_backward(
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
        )
        self.env.write(f"dq[{j}]", (dq,))
        self.env.write(f"dkv[{i}]", (dk, dv))

    def a2a_dq(self, op: Op) -> None:
        (j,) = op.chunk
        (dq,) = self.env.read(f"dq[{j}]")
        if self.spec.rope is not None:
            dq = apply_rotary_backward(dq, *self._rope(j))
        self.env.write(f"dqloc[{j}]", (_head_to_seq(dq.to(self.dtype), self.spec.group),))

    def a2a_dkv(self, op: Op) -> None:
        (i,) = op.chunk
        dk, dv = self.env.read(f"dkv[{i}]")
        if self.spec.rope is not None:
            dk = apply_rotary_backward(dk, *self._rope(i))
        g, n_kv = self.spec.group, self.spec.n_kv_heads
        dk = kv_head_to_seq_grad(dk.to(self.dtype), g, n_kv)
        dv = kv_head_to_seq_grad(dv.to(self.dtype), g, n_kv)
        self.env.write(f"dkvloc[{i}]", (dk, dv))

    def _proj_bwd(self, i: int, grads, rows: slice) -> None:
        (x,) = self.env.read(f"x[{i}]")
        g = torch.cat([t.flatten(2) for t in grads], dim=-1)  # [B, c, n*d]
        dx = self._local(self.dx, i)
        dx += torch.matmul(g, self.wqkv[rows])
        g2 = g.reshape(-1, g.shape[-1])
        self.dw[rows] += (g2.t() @ x.reshape(-1, x.shape[-1])).float()
        if self.db is not None:
            self.db[rows] += g2.float().sum(0)

    def proj_bwd_q(self, op: Op) -> None:
        (j,) = op.chunk
        (dq,) = self.env.read(f"dqloc[{j}]")
        self._proj_bwd(j, (dq,), slice(0, self.spec.n_heads * self.spec.head_dim))

    def proj_bwd_kv(self, op: Op) -> None:
        (i,) = op.chunk
        dk, dv = self.env.read(f"dkvloc[{i}]")
        start = self.spec.n_heads * self.spec.head_dim
        self._proj_bwd(i, (dk, dv), slice(start, start + 2 * self.spec.n_kv_heads * self.spec.head_dim))

    def _handlers(self):
        return {kind: getattr(self, kind.value) for kind in Kind}

    # --- drivers -----------------------------------------------------------------------------
    def forward(self, save: bool) -> torch.Tensor:
        B, s, _ = self.x.shape
        spec = self.spec
        self.out = torch.empty(B, s, spec.n_heads, spec.head_dim, dtype=self.dtype, device=self.device)
        sched = forward_schedule(spec.chunks, causal=spec.causal, offload=spec.offload, save=save)
        run_schedule(sched, self._handlers(), self.device, timeline=spec.timeline, label="forward")
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
        self.dw = torch.zeros(self.wqkv.shape, dtype=torch.float32, device=self.device)
        self.db = None if self.bqkv is None else torch.zeros(self.bqkv.shape, dtype=torch.float32, device=self.device)
        for j in range(spec.chunks):
            self.env.write(f"dout[{j}]", (self._local(dout, j),))
        sched = backward_schedule(spec.chunks, causal=spec.causal, offload=spec.offload)
        run_schedule(sched, self._handlers(), self.device, timeline=spec.timeline, label="backward")
        dx, dw, db = self.dx, self.dw, self.db
        self.close()
        return dx, dw, db

    def close(self) -> None:
        """Drop device state and give the host buffers back to the store."""
        for name in self.env.names():
            self.env.pop(name)
        self.dout = self.dx = self.dw = self.db = None
        self._finalizer()


class _FPDTAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wqkv, bqkv, spec, save):
        runner = _Runner(spec, x, wqkv, bqkv)
        out = runner.forward(save)
        ctx.runner = runner if save else None
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.runner is None:
            raise RuntimeError("the FPDT forward ran without saving for the backward")
        runner, ctx.runner = ctx.runner, None
        # x is needed by the projection backward; with offload it comes from the host store.
        dx, dw, db = runner.backward(dout.contiguous())
        wqkv_dtype = runner.wqkv.dtype
        return (
            dx if ctx.needs_input_grad[0] else None,
            dw.to(wqkv_dtype) if ctx.needs_input_grad[1] else None,
            db.to(wqkv_dtype) if db is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
        )


def fpdt_attention_core(x: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None, spec: FPDTSpec) -> torch.Tensor:
    """Attention of this rank's FPDT-layout tokens ``x [B, S/P, h]`` -> ``[B, S/P, H, d]``.

    Differentiable w.r.t. ``x``, ``wqkv`` and ``bqkv``. Saves for the backward only when grad
    mode is on and an input requires grad (a no-grad forward, e.g. the first pass of
    activation checkpointing, copies nothing to the host except KV chunks a later query chunk
    of the same forward still needs).
    """
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, wqkv, bqkv))
    return _FPDTAttention.apply(x, wqkv, bqkv, spec, save)
