"""Sequence-tiled MLP, RMSNorm and LM-head loss, as autograd Functions.

All run over tiles of ``tile`` tokens (rows of the flattened ``[N, h]`` input, ``N = B*S/P``),
so neither the ``[N, ffn]`` MLP activation nor the ``[N, V]`` logits ever exist at once. The MLP
and RMSNorm keep only their input and the weights for the backward and recompute each tile's
intermediate there; the loss, when a backward will follow, makes its gradients in the forward
with each tile's logits, so the backward only scales them. Weight gradients accumulate in fp32.
The saved input is never overwritten: the MLP's input gradient is a fresh tensor, or the output
gradient the caller donates (``donate_grad``) (the reference implementation writes ``dx`` into
the saved ``x``, which breaks any other op, e.g. a fused LayerNorm, that saved the same tensor).

    y = chunked_mlp(x, w1, b1, w3, w2, b2, activation="swiglu", tile=4096)
    loss_sum, count = chunked_cross_entropy(hidden, head_weight, labels, tile=512)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parallel.amp import autocast_state, restore_autocast
from parallel.tensors import has_values

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
    def forward(ctx, x, w1, b1, w3, w2, b2, norm_w, eps, activation, tile, residual, donate_grad, compute_output):
        x2 = x.reshape(-1, x.shape[-1])  # [N, h]
        # The output is a tensor of its own, not a view: a checkpoint may release its memory.
        out = x.new_empty(*x.shape[:-1], w2.shape[0])
        y = out.view(-1, w2.shape[0])  # [N, h]
        # The backward reads only the saved input, so a caller that discards the values (a
        # checkpoint's recompute, which only roots its backward at the output) skips the MLP.
        for t in _tiles(x2.shape[0], tile) if compute_output else ():
            xt = _normed(x2[t], norm_w, eps)[0]
            a, u = _mlp_inner(xt, w1, b1, w3, activation)  # [n, ffn]
            y[t] = F.linear(_mlp_act(a, u, activation), w2, b2)
            if residual:
                y[t] += x2[t]
        ctx.save_for_backward(x, w1, b1, w3, w2, b2, norm_w)
        ctx.activation, ctx.tile, ctx.eps, ctx.residual = activation, tile, eps, residual
        ctx.donate_grad = donate_grad
        ctx.autocast = autocast_state(x.device)
        return out

    @staticmethod
    def backward(ctx, dy):
        with restore_autocast(ctx.autocast, dy.device):
            return _ChunkedMLP._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, w1, b1, w3, w2, b2, norm_w = ctx.saved_tensors
        activation, tile = ctx.activation, ctx.tile
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])

        def acc_buf(w, i):
            return torch.zeros(w.shape, dtype=torch.float32, device=w.device) if w is not None and need[i] else None

        dw1, db1, dw3, dw2, db2, dnw = (
            acc_buf(w, i) for w, i in ((w1, 1), (b1, 2), (w3, 3), (w2, 4), (b2, 5), (norm_w, 6))
        )
        dx = None
        if need[0]:
            # A donated output gradient (nothing else reads it) becomes the input gradient: tile t
            # of dy is read before tile t of dx is written.
            donate = ctx.donate_grad and dy2.shape == x2.shape and dy2.dtype == x2.dtype and dy2.is_contiguous()
            dx = dy2 if donate else torch.empty_like(x2)
        for t in _tiles(x2.shape[0], tile):
            xt, xhat, rstd = _normed(x2[t], norm_w, ctx.eps)
            dyt = dy2[t]
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
            if dx is not None or dnw is not None:
                dxt = da @ w1
                if du is not None:
                    dxt = dxt + du @ w3
                if norm_w is not None:  # through the norm: the gradient of its input
                    dxt = _rms_backward(dxt, xhat, rstd, norm_w, dnw, x.dtype)
                if dx is not None:
                    dx[t] = dxt + dyt if ctx.residual else dxt

        def cast(g, w):
            return None if g is None else g.to(w.dtype)

        return (
            None if dx is None else dx.reshape(x.shape),
            cast(dw1, w1),
            cast(db1, b1),
            cast(dw3, w3),
            cast(dw2, w2),
            cast(db2, b2),
            cast(dnw, norm_w),
            None,
            None,
            None,
            None,
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
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    residual: bool = False,
    donate_grad: bool = False,
    compute_output: bool = True,
) -> torch.Tensor:
    """MLP over tiles of ``tile`` tokens: ``x [..., h] -> [..., h]``, recomputing in the backward.

    ``gelu``: ``W2 gelu(W1 x + b1) + b2``; ``swiglu``: ``W2 (silu(W1 x + b1) * W3 x) + b2``.
    ``w1, w3 [ffn, h]``, ``w2 [h, ffn]``; biases optional; ``w3`` only for SwiGLU.
    ``norm_weight``: apply RMSNorm (``norm_eps``) to each tile first, so the normalised input is
    recomputed per tile in the backward instead of kept for the whole sequence. ``residual``:
    return ``x + MLP(...)``, so the backward writes the input's whole gradient (the residual's
    and the MLP's) into one buffer. The output is never read by the backward. ``donate_grad``:
    the output's gradient is read by nothing else, so the backward may write the input's
    gradient into its memory (one sequence-long buffer fewer at the backward's peak).
    ``compute_output=False``: the caller only roots a backward at the output and never reads its
    values (an activation checkpoint's recompute), so the forward computes nothing and returns
    an output whose values are undefined; the backward is the same, since it recomputes each
    tile from the saved input anyway.
    """
    if activation not in ("gelu", "swiglu"):
        raise ValueError(f"activation={activation!r}; use 'gelu' or 'swiglu'")
    if (w3 is not None) != (activation == "swiglu"):
        raise ValueError("w3 (the SwiGLU up projection) must be given for 'swiglu' and only for it")
    if tile < 1:
        raise ValueError(f"tile={tile} must be >= 1 tokens")
    return _ChunkedMLP.apply(
        x, w1, b1, w3, w2, b2, norm_weight, norm_eps, activation, tile, residual, donate_grad, compute_output
    )


# --- RMSNorm ------------------------------------------------------------------------------------


def _rms_stats(xt: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile's fp32 ``x / rms(x)`` and ``1 / rms(x)``."""
    xf = xt.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * rstd, rstd


def _normed(xt: torch.Tensor, norm_w: torch.Tensor | None, eps: float):
    """A tile's RMSNorm in its dtype (statistics in fp32), with the fp32 ``x/rms`` and ``1/rms``
    its backward needs; without ``norm_w``, the tile itself."""
    if norm_w is None:
        return xt, None, None
    xhat, rstd = _rms_stats(xt, eps)
    return (xhat * norm_w.float()).to(xt.dtype), xhat, rstd


def _rms_backward(dy: torch.Tensor, xhat, rstd, norm_w: torch.Tensor, dw: torch.Tensor | None, dtype) -> torch.Tensor:
    """One tile of RMSNorm's backward: the input gradient, in ``dtype``; adds the weight's gradient
    into the fp32 ``dw`` when given."""
    g = dy.float()
    if dw is not None:
        dw += (g * xhat).sum(0)
    gw = g * norm_w.float()
    return (rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))).to(dtype)


class _TiledRMSNorm(torch.autograd.Function):
    """RMSNorm that saves only its input: the backward recomputes the statistics per tile, so the
    normalised input (which autograd's RMSNorm keeps) and the backward's fp32 temporaries exist
    for one tile at a time instead of the whole sequence."""

    @staticmethod
    def forward(ctx, x, weight, eps, tile):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.tile = eps, tile
        # Per tile in fp32, as the backward recomputes it (autocast would make fp32 copies of
        # the whole input for PyTorch's own RMSNorm).
        out = x.new_empty(x.shape)
        x2, y = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
        for t in _tiles(x2.shape[0], tile):
            y[t] = _normed(x2[t], weight, eps)[0]
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, x.shape[-1])
        dx = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        for t in _tiles(x2.shape[0], ctx.tile):
            xhat, rstd = _rms_stats(x2[t], ctx.eps)
            dxt = _rms_backward(dy2[t], xhat, rstd, weight, dw, x.dtype)
            if dx is not None:
                dx[t] = dxt
        return (
            None if dx is None else dx.reshape(x.shape),
            None if dw is None else dw.to(weight.dtype),
            None,
            None,
        )


def tiled_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, tile: int) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, in ``x``'s dtype (statistics in fp32); the
    backward runs over tiles of ``tile`` tokens and keeps only ``x`` and ``weight``."""
    if tile < 1:
        raise ValueError(f"tile={tile} must be >= 1 tokens")
    return _TiledRMSNorm.apply(x, weight, eps, tile)


# --- LM head + cross entropy ---------------------------------------------------------------------


def _tile_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x @ w.t()).float()  # [n, V] fp32


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The loss and, when a backward will follow, its gradients in the same pass over the tiles:
    each tile's logits are made once (the gradient of a sum of token losses is linear in the
    upstream scalar, so the backward only scales what the forward accumulated), instead of being
    recomputed by the backward, which would cost one more ``[N, h] x [h, V]`` matmul."""

    @staticmethod
    def forward(ctx, x, w, labels, tile, with_grad):
        x2 = x.reshape(-1, x.shape[-1])  # [N, h]
        lab = labels.reshape(-1)
        valid = lab != IGNORE_INDEX
        safe = torch.where(valid, lab, 0)
        need_dx, need_dw = (with_grad and n for n in ctx.needs_input_grad[:2])
        dx = torch.empty_like(x2) if need_dx else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
        weight = valid.to(torch.float32)  # [N]: ignored tokens add no loss and no gradient
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for t in _tiles(x2.shape[0], tile):
            logits = _tile_logits(x2[t], w)  # [n, V]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            picked = logits.gather(1, safe[t, None])
            # Out of place: torch 2.11's torch.compile gives a Function whose output was made by
            # zeros() and then added to in place a zero gradient (2.13 does not).
            total = total + ((lse - picked)[:, 0] * weight[t]).sum()
            if dx is None and dw is None:
                continue
            g = logits.sub_(lse).exp_()  # softmax, in the logits' memory
            g.scatter_add_(1, safe[t, None], torch.full_like(lse, -1.0))
            g = g.mul_(weight[t, None]).to(x.dtype)  # d loss_sum / d logits
            if dx is not None:
                dx[t] = g @ w
            if dw is not None:
                if g.dtype == x2.dtype == dw.dtype:
                    dw.addmm_(g.t(), x2[t])  # no [V, h] product: it costs a pass over dw's bytes per tile
                else:
                    dw += g.t() @ x2[t]
        # Kept on ctx, not saved: they are results, and saved-tensor hooks must not move them.
        ctx.grads = (dx, dw)
        ctx.x_shape, ctx.w_dtype = x.shape, w.dtype
        return total

    @staticmethod
    def backward(ctx, dtotal):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_cross_entropy's backward ran twice: its gradients are computed by the forward "
                "and scaled in place by the first backward; recompute the loss instead of retain_graph=True"
            )
        (dx, dw), ctx.grads = ctx.grads, None
        return (
            None if dx is None else dx.mul_(dtotal).reshape(ctx.x_shape),
            None if dw is None else dw.mul_(dtotal).to(ctx.w_dtype),
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross entropy of ``hidden [..., h] @ weight[V, h]^T`` against ``labels [...]``.

    Returns ``(loss_sum, count)``: the fp32 sum over tokens whose label is not ``-100`` (log-softmax
    in fp32) and the number of such tokens (int64). Differentiable w.r.t. ``hidden`` and
    ``weight``. Tiles of ``tile`` tokens; the ``[N, V]`` logits never exist at once. With grad
    enabled the forward also computes the gradients (so the logits are made once, not again in
    the backward): call it under ``torch.no_grad()`` when no backward follows.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match hidden states {tuple(hidden.shape)} without the last dim"
        )
    if tile < 1:
        raise ValueError(f"tile={tile} must be >= 1 tokens")
    check_labels(labels, weight.shape[0])
    # The gradients are made in the forward whenever a backward may follow.
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum = _ChunkedCrossEntropy.apply(hidden, weight, labels.long(), tile, with_grad)
    return loss_sum, (labels != IGNORE_INDEX).sum()


def check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Labels are int64 or int32 token ids in ``[0, vocab_size)``, or ``IGNORE_INDEX`` (-100)."""
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    V = vocab_size
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V)) if has_values(labels) else None
    if bad is not None and bool(bad.any()):
        raise ValueError(f"labels must be in [0, {V}) or {IGNORE_INDEX} (ignored); got {labels[bad][0].item()}")


def cross_entropy_reference(hidden, weight, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Untiled ``(loss_sum, count)`` with full logits under plain autograd; the test oracle."""
    check_labels(labels, weight.shape[0])
    logits = (hidden @ weight.t()).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()
