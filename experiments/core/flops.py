"""Model FLOPs of one training step: the numerator of every MFU we print.

Convention (also written into every result row as ``flop_convention``):

* Matmul FLOPs only, ``2*m*n*k`` per ``[m, k] @ [k, n]``; norms, activations, softmax, RoPE and
  the optimizer are not counted.
* A training step is forward + backward = 3x the forward (the backward computes gradients of
  inputs and of weights), with **no recompute**: activation checkpointing and FPDT's backward
  recomputation are overheads of the method, not useful work, so they lower MFU.
* Causal attention counts the half square (``S^2/2`` score entries; ``mfu``). ``mfu_full_attention``
  counts the full square, as Megatron-LM's formula and many papers do; report which one you cite.
* GQA: the K/V projections have ``Hkv*d`` columns. SwiGLU: three ``h x ffn`` matrices; GELU: two.

For a GPT with MHA, a ``4h`` GELU MLP, no GQA and full-square attention this is Megatron-LM's
``72*B*S*L*h^2*(1 + S/(6h) + V/(12*L*h))`` (Narayanan et al. 2021, eq. 3 without the recompute
term); ``tests/test_flops.py`` checks the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOP_CONVENTION = (
    "matmul FLOPs, train step = 3x forward, no recompute; "
    "mfu: causal attention = half square; mfu_full_attention: full square"
)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step (all ranks together), by part."""

    dense: float  # QKV, output projection, MLP and LM head
    attention_causal: float  # scores + weighted sum, half square
    attention_full: float  # scores + weighted sum, full square

    @property
    def causal(self) -> float:
        return self.dense + self.attention_causal

    @property
    def full(self) -> float:
        return self.dense + self.attention_full


def forward_flops_per_token_dense(cfg) -> float:
    """Forward matmul FLOPs per token outside the attention core (weights only)."""
    h, f, d = cfg.hidden, cfg.ffn_hidden, cfg.head_dim
    H, Hkv = cfg.n_heads, cfg.n_kv_heads
    qkv = 2 * h * (H + 2 * Hkv) * d
    out = 2 * H * d * h
    mlp = 2 * h * f * (3 if cfg.activation == "swiglu" else 2)
    head = 2 * h * cfg.vocab_size
    return cfg.n_layers * (qkv + out + mlp) + head


def step_flops(cfg, seq_len: int, batch_size: int = 1, square_tokens: float | None = None) -> StepFlops:
    """FLOPs of one forward+backward step over ``batch_size`` sequences of ``seq_len`` tokens.

    ``cfg`` is a :class:`models.ModelConfig` (any object with its shape fields works).
    ``square_tokens``: the attention's query-key pairs before the causal halving, summed over the
    batch: ``batch_size * seq_len**2`` (the default) for one document per sequence, the sum of
    every document's length squared for packed documents (attention stays inside documents).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    tokens = batch_size * seq_len
    dense = 3 * tokens * forward_flops_per_token_dense(cfg)
    square = batch_size * seq_len * seq_len if square_tokens is None else square_tokens
    # QK^T and PV: 2 matmuls x 2 FLOPs x (query, key) pairs x H x d per layer.
    full = 3 * cfg.n_layers * 4 * square * cfg.n_heads * cfg.head_dim
    return StepFlops(dense=float(dense), attention_causal=full / 2.0, attention_full=float(full))


def megatron_formula(batch_size: int, seq_len: int, n_layers: int, hidden: int, vocab_size: int) -> float:
    """Megatron-LM's GPT training FLOPs per step without recompute (full-square attention)."""
    B, S, L, h, V = batch_size, seq_len, n_layers, hidden, vocab_size
    return 72.0 * B * S * L * h * h * (1 + S / (6.0 * h) + V / (12.0 * L * h))
