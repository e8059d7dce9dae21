"""Sequence-tiled MLP and LM-head loss, as autograd Functions.

Both run over tiles of ``tile`` tokens (rows of the flattened ``[N, h]`` input, ``N = B*S/P``)
and keep only their input and the weights for the backward, recomputing the per-tile
intermediate there, so neither the ``[N, ffn]`` MLP activation nor the ``[N, V]`` logits ever
exist at once. Weight gradients accumulate in fp32. The input gradient is a fresh tensor: the
saved input is never overwritten (the reference implementation writes ``dx`` into the saved
``x``, which breaks any other op, e.g. a fused LayerNorm, that saved the same tensor).

    y = chunked_mlp(x, w1, b1, w3, w2, b2, activation="swiglu", tile=4096)
    loss_sum, count = chunked_cross_entropy(hidden, head_weight, labels, tile=512)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parallel.amp import autocast_state, restore_autocast

IGNORE_INDEX = -100


def _tiles(n: int, tile: int):
    for start in range(0, n, tile):
        yield slice(start, min(start + tile, n))


# --- MLP ----------------------------------------------------------------------------------------


def _gelu_and_grad(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (erf) GELU and its derivative, in fp32."""
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    return a * cdf, cdf + a * pdf


def _mlp_inner(x, w1, b1, w3, activation):
    """Recompute one tile's inner activation: ``a = x W1^T + b1``, ``u = x W3^T`` (SwiGLU)."""
    a = F.linear(x, w1, b1)
    u = F.linear(x, w3) if activation == "swiglu" else None
    return a, u


def _mlp_act(a, u, activation):
    if activation == "swiglu":
        return (F.silu(a.float()) * u.float()).to(a.dtype)
    return _gelu_and_grad(a.float())[0].to(a.dtype)


class _ChunkedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w3, w2, b2, activation, tile):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [N, h]
        y = x2.new_empty(x2.shape[0], w2.shape[0])  # [N, h]
        for t in _tiles(x2.shape[0], tile):
            a, u = _mlp_inner(x2[t], w1, b1, w3, activation)  # [n, ffn]
            y[t] = F.linear(_mlp_act(a, u, activation), w2, b2)
        ctx.save_for_backward(x, w1, b1, w3, w2, b2)
        ctx.activation, ctx.tile = activation, tile
        ctx.autocast = autocast_state(x.device)
        return y.reshape(*shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        with restore_autocast(ctx.autocast, dy.device):
            return _ChunkedMLP._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, w1, b1, w3, w2, b2 = ctx.saved_tensors
        activation, tile = ctx.activation, ctx.tile
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])

        def acc_buf(w, i):
            return torch.zeros(w.shape, dtype=torch.float32, device=w.device) if w is not None and need[i] else None

        dw1, db1, dw3, dw2, db2 = (acc_buf(w, i) for w, i in ((w1, 1), (b1, 2), (w3, 3), (w2, 4), (b2, 5)))
        dx = torch.empty_like(x2) if need[0] else None
        for t in _tiles(x2.shape[0], tile):
            xt, dyt = x2[t], dy2[t]
            a, u = _mlp_inner(xt, w1, b1, w3, activation)  # recomputed [n, ffn]
            af = a.float()
            dhid = (dyt @ w2).float()  # [n, ffn]
            if activation == "swiglu":
                sig = torch.sigmoid(af)
                silu = af * sig
                hid = silu * u.float()
                du = (dhid * silu).to(x.dtype)
                da = (dhid * u.float() * sig * (1.0 + af * (1.0 - sig))).to(x.dtype)
            else:
                hid, dgelu = _gelu_and_grad(af)
                du = None
                da = (dhid * dgelu).to(x.dtype)
            if dw2 is not None:
                dw2 += dyt.t() @ hid.to(x.dtype)
            if db2 is not None:
                db2 += dyt.float().sum(0)
            if dw1 is not None:
                dw1 += da.t() @ xt
            if db1 is not None:
                db1 += da.float().sum(0)
            if dw3 is not None:
                dw3 += du.t() @ xt
            if dx is not None:
                dxt = da @ w1
                if du is not None:
                    dxt = dxt + du @ w3
                dx[t] = dxt

        def cast(g, w):
            return None if g is None else g.to(w.dtype)

        return (
            None if dx is None else dx.reshape(x.shape),
            cast(dw1, w1),
            cast(db1, b1),
            cast(dw3, w3),
            cast(dw2, w2),
            cast(db2, b2),
            None,
            None,
        )


def mlp_reference(x, w1, b1, w3, w2, b2, activation: str) -> torch.Tensor:
    """The untiled MLP under plain autograd: ``W2 act(x) + b2``; the oracle for tests."""
    a, u = _mlp_inner(x, w1, b1, w3, activation)
    hid = F.silu(a) * u if activation == "swiglu" else F.gelu(a)
    return F.linear(hid, w2, b2)


def chunked_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    activation: str,
    tile: int,
) -> torch.Tensor:
    """MLP over tiles of ``tile`` tokens: ``x [..., h] -> [..., h]``, recomputing in the backward.

    ``gelu``: ``W2 gelu(W1 x + b1) + b2``; ``swiglu``: ``W2 (silu(W1 x + b1) * W3 x) + b2``.
    ``w1, w3 [ffn, h]``, ``w2 [h, ffn]``; biases optional; ``w3`` only for SwiGLU.
    """
    if activation not in ("gelu", "swiglu"):
        raise ValueError(f"activation={activation!r}; use 'gelu' or 'swiglu'")
    if (w3 is not None) != (activation == "swiglu"):
        raise ValueError("w3 (the SwiGLU up projection) must be given for 'swiglu' and only for it")
    if tile < 1:
        raise ValueError(f"tile={tile} must be >= 1 tokens")
    return _ChunkedMLP.apply(x, w1, b1, w3, w2, b2, activation, tile)


# --- LM head + cross entropy ---------------------------------------------------------------------


def _tile_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x @ w.t()).float()  # [n, V] fp32


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, tile):
        x2 = x.reshape(-1, x.shape[-1])  # [N, h]
        lab = labels.reshape(-1)
        valid = lab != IGNORE_INDEX
        safe = torch.where(valid, lab, 0)
        lse = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for t in _tiles(x2.shape[0], tile):
            logits = _tile_logits(x2[t], w)  # [n, V]
            lse[t] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[t, None])[:, 0]
            total += torch.where(valid[t], lse[t] - picked, 0.0).sum()
        ctx.save_for_backward(x, w, safe, valid, lse)
        ctx.tile = tile
        ctx.autocast = autocast_state(x.device)
        return total

    @staticmethod
    def backward(ctx, dtotal):
        with restore_autocast(ctx.autocast, dtotal.device):
            return _ChunkedCrossEntropy._backward(ctx, dtotal)

    @staticmethod
    def _backward(ctx, dtotal):
        x, w, safe, valid, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        dx = torch.empty_like(x2) if need[0] else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[1] else None
        scale = valid.to(torch.float32) * dtotal.float()  # [N]
        for t in _tiles(x2.shape[0], ctx.tile):
            logits = _tile_logits(x2[t], w)  # recomputed [n, V]
            g = torch.exp(logits - lse[t, None])  # softmax
            g.scatter_add_(1, safe[t, None], torch.full_like(lse[t, None], -1.0))
            g = (g * scale[t, None]).to(x.dtype)  # d loss_sum / d logits
            if dx is not None:
                dx[t] = g @ w
            if dw is not None:
                dw += g.t() @ x2[t]
        return (
            None if dx is None else dx.reshape(x.shape),
            None if dw is None else dw.to(w.dtype),
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross entropy of ``hidden [..., h] @ weight[V, h]^T`` against ``labels [...]``.

    Returns ``(loss_sum, count)``: the fp32 sum over tokens whose label is not ``-100`` (log-softmax
    in fp32) and the number of such tokens (int64). Differentiable w.r.t. ``hidden`` and
    ``weight``. Tiles of ``tile`` tokens; the ``[N, V]`` logits never exist at once.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match hidden states {tuple(hidden.shape)} without the last dim"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if tile < 1:
        raise ValueError(f"tile={tile} must be >= 1 tokens")
    V = weight.shape[0]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {V}) or {IGNORE_INDEX} (ignored); got {labels[bad][0].item()}")
    loss_sum = _ChunkedCrossEntropy.apply(hidden, weight, labels.long(), tile)
    return loss_sum, (labels != IGNORE_INDEX).sum()


def cross_entropy_reference(hidden, weight, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Untiled ``(loss_sum, count)`` with full logits under plain autograd; the test oracle."""
    logits = (hidden @ weight.t()).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()
