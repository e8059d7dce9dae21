"""Model configuration: one dataclass for both families, and the presets the paper trains.

GPT presets follow the GPT-3 / Megatron shapes (LayerNorm, GELU MLP with biases, tied
embeddings) with rotary positions instead of a learned table, which would not scale to millions
of tokens. Llama presets follow Llama 3 (RMSNorm, SwiGLU without biases, GQA, RoPE theta
500000, untied embeddings).

    cfg = get_config("llama3-8b")
    cfg = get_config("llama-tiny", checkpoint=True, loss_tile=256)   # overrides
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and runtime switches of a :class:`models.Transformer`.

    Shape: ``vocab_size``, ``hidden`` (``h``), ``n_layers``, ``n_heads`` (``H``), ``n_kv_heads``
    (``Hkv``, ``None`` = ``H``), ``ffn_hidden`` (MLP inner width), ``head_dim`` (``None`` =
    ``h / H``), ``rope_theta``, ``norm`` (``layernorm | rmsnorm``) and ``norm_eps``,
    ``activation`` (``gelu``: ``W2 gelu(W1 x + b1) + b2``; ``swiglu``: ``W2 (silu(W1 x) * W3 x)``),
    ``bias`` (biases in every linear layer except the LM head), ``tie_embeddings``.

    Runtime: ``chunked_mlp``/``chunked_loss`` switch the sequence-tiled MLP and LM-head loss on;
    ``mlp_tile``/``loss_tile`` are tile sizes in tokens (``None``: the paper's ratios, ``C/(2P)``
    and ``C/(32P)`` tokens, i.e. ``S/P`` local tokens divided by ``2u`` and ``32u``);
    ``checkpoint`` recomputes every layer in the backward, keeping only its input, which
    ``checkpoint_on_host`` keeps in host memory (pinned on CUDA). ``init_std``: weight init.
    ``residual_fp32``: under mixed precision (autocast), keep the residual stream (the embedding
    output, every layer's input and output, and so the layer checkpoints) in fp32 instead of the
    compute dtype; the default, the compute dtype, is Megatron's and halves those bytes.
    """

    name: str = "custom"
    vocab_size: int = 256
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int = 256
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    chunked_mlp: bool = True
    chunked_loss: bool = True
    mlp_tile: int | None = None
    loss_tile: int | None = None
    checkpoint: bool = False
    checkpoint_on_host: bool = False
    residual_fp32: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.hidden % self.n_heads:
                raise ValueError(f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)
        for field in ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}; use one of {NORMS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; use one of {ACTIVATIONS}")
        for field in ("mlp_tile", "loss_tile"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{field}={value} must be >= 1 tokens (or None for the paper's default)")

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed; derived defaults (``head_dim = h/H``, ``Hkv = H``)
        follow a changed ``hidden``/``n_heads`` unless they were set explicitly."""
        if {"hidden", "n_heads"} & changes.keys():
            if "head_dim" not in changes and self.head_dim * self.n_heads == self.hidden:
                changes["head_dim"] = None
            if "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
                changes["n_kv_heads"] = None
        return dataclasses.replace(self, **changes)

    def layer_params(self) -> int:
        """Parameters of one block: attention, MLP and its two norms."""
        h, f, d = self.hidden, self.ffn_hidden, self.head_dim
        H, Hkv = self.n_heads, self.n_kv_heads
        attn = (H + 2 * Hkv) * d * h + h * H * d + (((H + 2 * Hkv) * d + h) if self.bias else 0)
        n_mats = 3 if self.activation == "swiglu" else 2
        mlp = n_mats * h * f + ((f + h) if self.bias else 0)
        return attn + mlp + 2 * self._norm_params()

    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        emb = self.vocab_size * self.hidden * (1 if self.tie_embeddings else 2)
        return self.n_layers * self.layer_params() + self._norm_params() + emb

    def _norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layernorm" else 1)


def _gpt(name: str, n_layers: int, hidden: int, n_heads: int, vocab_size: int = 50304) -> ModelConfig:
    # GPT-2/3 BPE vocabulary (50257) padded to a multiple of 128, as Megatron does.
    return ModelConfig(
        name=name,
        vocab_size=vocab_size,
        hidden=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        ffn_hidden=4 * hidden,
        rope_theta=10000.0,
        norm="layernorm",
        norm_eps=1e-5,
        activation="gelu",
        bias=True,
        tie_embeddings=True,
    )


def _llama(name: str, n_layers: int, hidden: int, n_heads: int, n_kv_heads: int, ffn_hidden: int, **kw) -> ModelConfig:
    kw.setdefault("vocab_size", 128256)
    kw.setdefault("rope_theta", 500000.0)
    return ModelConfig(
        name=name,
        hidden=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_hidden=ffn_hidden,
        norm="rmsnorm",
        norm_eps=1e-5,
        activation="swiglu",
        bias=False,
        tie_embeddings=False,
        **kw,
    )


PRESETS: dict[str, ModelConfig] = {
    # CPU-sized models for tests: 4 query heads split over P in {1, 2, 4}; the Llama one has
    # 2 KV heads (GQA, sharded at P=2 and replicated at P=4) and an odd-sized FFN.
    "gpt-tiny": _gpt("gpt-tiny", n_layers=2, hidden=32, n_heads=4, vocab_size=96),
    "llama-tiny": _llama(
        "llama-tiny", n_layers=2, hidden=32, n_heads=4, n_kv_heads=2, ffn_hidden=88, vocab_size=96, rope_theta=10000.0
    ),
    # GPT-3 table (Brown et al. 2020, Table 2.1) as used by Megatron-LM; 13B uses 5120 = 40 x 128.
    "gpt-2.7b": _gpt("gpt-2.7b", n_layers=32, hidden=2560, n_heads=32),
    "gpt-6.7b": _gpt("gpt-6.7b", n_layers=32, hidden=4096, n_heads=32),
    "gpt-13b": _gpt("gpt-13b", n_layers=40, hidden=5120, n_heads=40),
    # DeepSpeed-Ulysses' 30B GPT: 64 layers x 6144 (12 L h^2 = 29.0B + embeddings).
    "gpt-30b": _gpt("gpt-30b", n_layers=64, hidden=6144, n_heads=64),
    # Llama 3 (Meta, "The Llama 3 Herd of Models", Table 3).
    "llama3-8b": _llama("llama3-8b", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336),
    "llama3-70b": _llama("llama3-70b", n_layers=80, hidden=8192, n_heads=64, n_kv_heads=8, ffn_hidden=28672),
    # Llama 3.2 1B (Meta's model card / config.json): a Llama-3-shaped model that trains on one
    # GPU with its optimizer states; ties its embeddings.
    "llama3.2-1b": _llama("llama3.2-1b", n_layers=16, hidden=2048, n_heads=32, n_kv_heads=8, ffn_hidden=8192).replace(
        tie_embeddings=True
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with ``overrides`` applied; ``ValueError`` lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
