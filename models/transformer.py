"""One decoder-only Transformer for the GPT and Llama families, single-device and rank-unaware.

    model = Transformer(get_config("llama-tiny"))
    loss = model(tokens, labels=labels)        # mean over non-ignored tokens (scalar, fp32)
    logits = model(tokens)                     # [B, S, V] (small models and tests only)

Pre-norm blocks: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; final norm; LM head.
Attention runs through ``Attention.strategy`` (an :class:`parallel.attention.AttentionStrategy`,
``local`` by default), which ``parallel.parallelize`` swaps for another registered strategy
(``ulysses``, ``fpdt``, ``ring``, ``usp``) from outside. The model then sees only this rank's
tokens ``[B, S/P]`` in the strategy's layout.

Loss: ``sum of token losses / number of non-ignored tokens``, both passed through
``Transformer.sum_across_ranks`` first. That hook is the identity on one process;
``parallelize`` installs an all-reduce (sum) whose backward is the identity, so every rank gets
the loss of the whole sequence and each rank's backward yields its share of the gradient.

Gradient reduction (done by ``parallel.parallelize``, not here): without FSDP, each parameter
gradient is all-reduced (SUM) over all ranks as the backward produces it, so every rank's
``.grad`` equals the single-process gradient of the global batch; with FSDP2 it is
reduce-scattered (SUM), so every rank holds its shard of that gradient.

Packed documents: ``model(tokens, labels, positions, cu_seqlens)`` with ``cu_seqlens`` the int32
offsets of the documents over the flattened ``[B * S]`` tokens of the whole sequence (every row
boundary a document boundary, flash-attn's convention): attention stays inside each document and
RoPE restarts at each (``positions``, from ``parallel.shard_batch``, are then positions inside
documents). The loss equals that of running every document on its own and combining the token
losses.

Activation checkpointing (``cfg.checkpoint``) uses reentrant checkpoints: drive the backward
with ``loss.backward()`` (``torch.autograd.grad`` does not see the parameter gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.amp import autocast_state, restore_autocast
from parallel.attention import AttentionStrategy
from parallel.host_store import saved_tensors_on_host
from parallel.layout import check_cu_seqlens, document_positions
from parallel.rotary import RotaryEmbedding
from parallel.tensors import eager_under_compile, has_values
from parallel.weights import AttentionWeights

from .chunked import chunked_cross_entropy, chunked_mlp, cross_entropy_reference, mlp_reference, tiled_rms_norm
from .config import ModelConfig


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` run in its input's dtype: under autocast the residual stream is bf16 while
    the weight stays fp32, and PyTorch's fused kernel needs one dtype (it falls back to a slower
    composite otherwise). The kernel accumulates the statistics in fp32 either way; the weight's
    gradient flows back through the cast in fp32. With a ``tile`` (the chunked recipe) it runs per
    tile and only the input is saved (``models.chunked.tiled_rms_norm``): autograd's RMSNorm keeps
    the normalised input too, and its backward makes five fp32 sequence-long temporaries. Without
    grad (a checkpoint's first forward) it runs per tile too: where PyTorch has no fused kernel
    (CPU) its RMSNorm makes three fp32 copies of the whole input, the device peak at 1M tokens;
    and the checkpoint's forward computes what its recompute will."""

    def forward(self, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        if tile is not None:
            return tiled_rms_norm(x, self.weight, self.eps, tile=tile)
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` taking (and ignoring) the tile the blocks pass: PyTorch's fused layer_norm
    already saves only its input and statistics, and its backward makes no sequence-long
    temporaries but the input gradient."""

    def forward(self, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        return super().forward(x)


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden, eps=cfg.norm_eps)
    return LayerNorm(cfg.hidden, eps=cfg.norm_eps)


def default_tiles(local_tokens: int, chunks: int) -> tuple[int, int]:
    """The paper's tile sizes: MLP ``C/(2P)`` and loss ``C/(32P)`` tokens, i.e. this rank's
    ``S/P`` tokens over ``2u`` and ``32u`` (rounded up)."""
    return max(1, -(-local_tokens // (2 * chunks))), max(1, -(-local_tokens // (32 * chunks)))


class Attention(nn.Module):
    """Fused QKV projection ``wqkv [(H+2Hkv)*d, h]`` (rows ``[Q | K | V]``), output ``wo [h, H*d]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Hkv, d, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden
        self.n_heads, self.n_kv_heads = H, Hkv
        self.wqkv = nn.Parameter(torch.empty((H + 2 * Hkv) * d, h))
        self.bqkv = nn.Parameter(torch.zeros((H + 2 * Hkv) * d)) if cfg.bias else None
        self.wo = nn.Parameter(torch.empty(h, H * d))
        self.bo = nn.Parameter(torch.zeros(h)) if cfg.bias else None
        self.rope = RotaryEmbedding(d, cfg.rope_theta)
        self.strategy = AttentionStrategy()

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:  # [B, S/P, h] -> same
        w = AttentionWeights(self.wqkv, self.wo, self.n_heads, self.n_kv_heads, self.bqkv, self.bo)
        return self.strategy(x, w, self.rope, cu_seqlens)


class MLP(nn.Module):
    """``w1 [ffn, h]`` (GELU input / SwiGLU gate), ``w3 [ffn, h]`` (SwiGLU up), ``w2 [h, ffn]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f = cfg.hidden, cfg.ffn_hidden
        self.activation = cfg.activation
        self.w1 = nn.Parameter(torch.empty(f, h))
        self.b1 = nn.Parameter(torch.zeros(f)) if cfg.bias else None
        self.w3 = nn.Parameter(torch.empty(f, h)) if cfg.activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(h, f))
        self.b2 = nn.Parameter(torch.zeros(h)) if cfg.bias else None

    def forward(
        self, x: torch.Tensor, tile: int | None, norm: nn.Module | None = None, output_needed: bool = True
    ) -> torch.Tensor:
        """``x + MLP(norm(x))``, the block's second half. ``tile``: tokens per tile for the chunked
        MLP, ``None`` for the plain one. With a tile and an RMSNorm, norm, MLP and residual run
        inside the chunked MLP's tiles (what the backward keeps: ``x`` alone).
        ``output_needed=False`` (a checkpoint's recompute): the chunked MLP skips its forward,
        whose values nobody reads, and the output's values are undefined; the plain MLP must
        run to save its activations."""
        args = (self.w1, self.b1, self.w3, self.w2, self.b2)
        if tile is None:
            return x + mlp_reference(x if norm is None else norm(x), *args, activation=self.activation)
        if isinstance(norm, RMSNorm):
            # Donated: a block's output gradient is read by this MLP alone (the next block's
            # input gradient, or the final norm's, each a buffer of its own).
            return chunked_mlp(x, *args, activation=self.activation, tile=tile, norm_weight=norm.weight,
                               norm_eps=norm.eps, residual=True, donate_grad=True,
                               compute_output=output_needed)  # fmt: skip
        h = x if norm is None else norm(x, tile)
        return x + chunked_mlp(h, *args, activation=self.activation, tile=tile, compute_output=output_needed)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def _layer(
        self, x: torch.Tensor, mlp_tile: int | None, cu_seqlens: torch.Tensor | None, output_needed: bool = True
    ) -> torch.Tensor:
        # The chunked recipe's tile also tiles the norms' backward (None: the plain norms).
        x = x + self.attn(self.norm1(x, mlp_tile), cu_seqlens)
        return self.mlp(x, mlp_tile, self.norm2, output_needed)  # x + MLP(norm2(x))

    def forward(self, x: torch.Tensor, mlp_tile: int | None = None, cu_seqlens: torch.Tensor | None = None):
        if not (self.cfg.checkpoint and torch.is_grad_enabled()):
            return self._layer(x, mlp_tile, cu_seqlens)
        # Reentrant checkpoint: its forward runs without grad (so the FPDT block saves nothing)
        # and saves only the layer input, which saved_tensors_on_host then moves to host memory.
        # Parameter gradients are accumulated into ``.grad`` by the recompute's own backward, so
        # use ``loss.backward()`` rather than ``torch.autograd.grad``.
        run = functools.partial(self._layer, mlp_tile=mlp_tile, cu_seqlens=cu_seqlens)
        # The output needs a graph whenever the layer's parameters train, also where its input
        # has none (frozen embeddings): an anchor input that requires grad gives it one.
        anchor = () if x.requires_grad or not any(p.requires_grad for p in self.parameters()) else (_GRAD_ANCHOR,)
        if self.cfg.checkpoint_on_host:
            return _checkpoint_on_host(run, x, *anchor)
        return _CheckpointedLayer.apply(run, x, *anchor)


# An input of _CheckpointedLayer that only makes its output require grad (it gets no gradient).
_GRAD_ANCHOR = torch.empty(0, requires_grad=True)


# torch.compile runs this layer as it is (a graph break around it): Dynamo cannot capture the
# saved-tensor hooks that move the checkpoint to host memory.
@eager_under_compile
def _checkpoint_on_host(run, x: torch.Tensor, *anchor: torch.Tensor) -> torch.Tensor:
    with saved_tensors_on_host():
        return _CheckpointedLayer.apply(run, x, *anchor)


# Backward nodes that never read their forward's output (what a layer may end in).
_OUTPUT_NOT_SAVED = ("AddBackward0", "_ChunkedMLPBackward")


class _CheckpointedLayer(torch.autograd.Function):
    """A reentrant activation checkpoint of one layer (``torch.utils.checkpoint``'s reentrant
    variant, with two differences): the forward runs ``run(x)`` without grad and saves only
    ``x``; the backward recomputes with grad in the forward's autocast state and back-propagates.
    The recomputed output is only the root of that backward, so:

    * the recompute runs as ``run(x, output_needed=False)``: the layer's last op (the chunked
      MLP) skips its forward, whose values nothing reads, since its backward recomputes each
      tile from its saved input anyway (one MLP forward fewer per layer and step);
    * the layer ends in a residual add, whose backward reads neither operand nor result, so the
      output's storage is released before the backward runs instead of staying alive (one
      sequence-long tensor) until it ends; the chunked MLP with its residual reads its output
      no more. (``torch.utils.checkpoint`` keeps it: it cannot know what the last op saved.)
    """

    @staticmethod
    def forward(ctx, run, x, *anchor):
        ctx.run = run
        ctx.autocast = autocast_state(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        with torch.enable_grad(), restore_autocast(ctx.autocast, x.device):
            y = ctx.run(x, output_needed=False)
        # Safe only when nothing saved y: a residual add's backward and the chunked MLP's read
        # neither. y then points at dy's memory (same shape and dtype) and its own is freed.
        if type(y.grad_fn).__name__ in _OUTPUT_NOT_SAVED and (y.shape, y.dtype) == (dy.shape, dy.dtype):
            y.data = dy
        torch.autograd.backward(y, dy)
        return None, x.grad, *[None] * (len(ctx.needs_input_grad) - 2)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class Transformer(nn.Module):
    """GPT or Llama, per ``cfg`` (see :class:`models.ModelConfig`).

    ``forward(tokens [B, S/P], labels=None, positions=None)``: with ``labels`` (same shape,
    ``-100`` = ignored) returns the fp32 scalar loss, the mean token cross entropy over the whole
    sequence (all ranks); without, the logits ``[B, S/P, V]``. ``labels[b, t]`` is the target of
    position ``t`` itself: already shifted, unlike transformers' ``labels=input_ids`` (for a
    window ``w`` of ``S + 1`` ids: ``tokens, labels = w[:, :-1], w[:, 1:]``). ``positions``
    (optional, from ``parallel.shard_batch``) are checked against the attention strategy's token
    layout.
    """

    def __init__(self, cfg: ModelConfig):
        if not isinstance(cfg, ModelConfig):
            got = repr(cfg) if len(repr(cfg)) <= 80 else repr(cfg)[:77] + "..."
            msg = "Transformer takes a ModelConfig, e.g. Transformer(get_config('llama-tiny'))"
            msg += f"; got {type(cfg).__name__} {got}"
            if isinstance(cfg, str):
                msg += f" (a preset name: Transformer(get_config({cfg!r})))"
            elif isinstance(cfg, dict):
                msg += " (a dict of fields: Transformer(ModelConfig(**fields)))"
            raise TypeError(msg)
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.reset_parameters()

    @property
    def strategy(self) -> AttentionStrategy:
        """The attention strategy of the blocks (``parallel.parallelize`` sets it)."""
        return self.blocks[0].attn.strategy

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, ``init_std``) matrices, residual outputs scaled by ``1/sqrt(2L)``; norms 1, biases 0."""
        std = self.cfg.init_std
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() < 2:
                    p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
                else:
                    s = out_std if name.endswith(("attn.wo", "mlp.w2")) else std
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * s)

    def residual_dtype(self, device: torch.device) -> torch.dtype:
        """The residual stream's dtype: the compute dtype of autocast when it is on (a residual
        ``x + f(x)`` in bf16 then stays bf16), fp32 with ``cfg.residual_fp32``, else the
        embedding's (the parameters' dtype, as FSDP2's mixed precision casts them)."""
        if self.cfg.residual_fp32:
            return torch.float32
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.embed.weight.dtype

    def _tiles(self, local_tokens: int) -> tuple[int | None, int | None]:
        cfg, u = self.cfg, self.strategy.layout_chunks
        mlp_default, loss_default = default_tiles(local_tokens, u)
        mlp = (cfg.mlp_tile or mlp_default) if cfg.chunked_mlp else None
        loss = (cfg.loss_tile or loss_default) if cfg.chunked_loss else None
        return mlp, loss

    def _check_inputs(self, tokens, labels, positions, cu_seqlens) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [B, S/P], got {tuple(tokens.shape)} {tokens.dtype}")
        if labels is not None and labels.shape != tokens.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        V = self.cfg.vocab_size
        # The value checks read data: a run on fake tensors (shapes only) has none to read.
        if has_values(tokens) and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(f"token ids must be in [0, {V}); got min {int(tokens.min())}, max {int(tokens.max())}")
        strategy = self.strategy
        seq_len = tokens.shape[1] * strategy.group.size
        strategy.check(seq_len, self.cfg.n_heads, self.cfg.n_kv_heads)
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, tokens.shape[0], seq_len)
        if positions is not None and has_values(positions):
            if cu_seqlens is None:
                expected = strategy.positions(seq_len).to(positions.device)
            else:
                expected = strategy.shard(document_positions(cu_seqlens, tokens.shape[0], seq_len)).to(positions.device)
            if positions.shape[-1] != expected.shape[-1] or positions.ne(expected).any():
                raise ValueError(
                    f"positions do not match the {strategy.kind!r} token layout of this rank "
                    f"(chunks={strategy.layout_chunks}); take tokens, labels and positions from parallel.shard_batch"
                )

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_inputs(tokens, labels, positions, cu_seqlens)
        mlp_tile, loss_tile = self._tiles(tokens.numel())
        x = self.embed(tokens).to(self.residual_dtype(tokens.device))  # [B, S/P, h]
        for block in self.blocks:
            x = block(x, mlp_tile, cu_seqlens)
        x = self.norm(x, loss_tile)
        if labels is None:
            return F.linear(x, self.head_weight).float()  # [B, S/P, V]
        if loss_tile is None:
            loss_sum, count = cross_entropy_reference(x, self.head_weight, labels)
        else:
            loss_sum, count = chunked_cross_entropy(x, self.head_weight, labels, tile=loss_tile)
        total = self.sum_across_ranks(loss_sum)
        count = self.sum_across_ranks(count.to(torch.float32))
        return total / count.clamp(min=1.0)
