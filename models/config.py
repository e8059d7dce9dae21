"""Model configuration: one dataclass for both families, and the presets the paper trains.

GPT presets follow the GPT-3 / Megatron shapes (LayerNorm, GELU MLP with biases, tied
embeddings) with rotary positions instead of a learned table, which would not scale to millions
of tokens. Llama presets follow Llama 3 (RMSNorm, SwiGLU without biases, GQA, RoPE theta
500000, untied embeddings; ``llama3.2-1b`` ties them, as Llama 3.2 does).

    cfg = get_config("llama3-8b")
    cfg = get_config("llama-tiny", checkpoint=True, loss_tile=256)   # overrides
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass

from fpdt_kernels.attention.api import MAX_HEAD_DIM

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")

# What each field of ModelConfig takes (checked by ``check_fields``; every field is listed once):
# sizes are ints >= 1, the optional ones may also be None (a derived or paper default).
_SIZES = ("vocab_size", "hidden", "n_layers", "n_heads", "ffn_hidden")
_OPTIONAL_SIZES = ("n_kv_heads", "head_dim", "mlp_tile", "loss_tile")
_POSITIVE_FLOATS = ("rope_theta", "norm_eps", "init_std")
_BOOLS = ("bias", "tie_embeddings", "chunked_mlp", "chunked_loss", "checkpoint", "checkpoint_on_host", "residual_fp32")
_CHOICES = {"norm": NORMS, "activation": ACTIVATIONS}
_STRINGS = ("name",)


def _check_int(field: str, value, optional: bool) -> None:
    none = " (or None for the default)" if optional else ""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field}={value!r} ({type(value).__name__}) must be an int >= 1{none}")
    if value < 1:
        raise ValueError(f"{field}={value} must be >= 1{none}")


def check_fields(cfg: ModelConfig) -> None:
    """Raise ``TypeError``/``ValueError`` naming the field, its value and what is allowed unless
    every field of ``cfg`` has its type and range (before any derived default is computed)."""
    for field in _STRINGS:
        value = getattr(cfg, field)
        if not isinstance(value, str):
            raise TypeError(f"{field}={value!r} ({type(value).__name__}) must be a str")
    for field in _SIZES:
        _check_int(field, getattr(cfg, field), optional=False)
    for field in _OPTIONAL_SIZES:
        _check_int(field, getattr(cfg, field), optional=True)
    for field in _POSITIVE_FLOATS:
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{field}={value!r} ({type(value).__name__}) must be a float > 0")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{field}={value} must be a finite float > 0")
    for field in _BOOLS:
        value = getattr(cfg, field)
        if not isinstance(value, bool):
            raise TypeError(f"{field}={value!r} ({type(value).__name__}) must be True or False")
    for field, allowed in _CHOICES.items():
        value = getattr(cfg, field)
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{field}={value!r}; use one of {allowed}")


def check_field_names(names) -> None:
    """Raise ``TypeError`` listing the valid fields unless every name in ``names`` is a field of
    :class:`ModelConfig` (a typo in an override)."""
    valid = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = [n for n in names if n not in valid]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(str(n), valid, n=1)
            hints.append(f"{n!r} (did you mean {close[0]!r}?)" if close else repr(n))
        raise TypeError(f"unknown ModelConfig field(s) {', '.join(hints)}; valid fields: {', '.join(valid)}")


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
        check_fields(self)  # types and ranges first: the derived defaults below divide by them
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        derived = self.head_dim is None
        if derived:
            if self.hidden % self.n_heads:
                raise ValueError(f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)
        if self.head_dim > MAX_HEAD_DIM:
            source = f" (hidden/n_heads = {self.hidden}/{self.n_heads})" if derived else ""
            raise ValueError(f"head_dim={self.head_dim}{source} is more than the attention kernels take; use "
                             f"head_dim <= {MAX_HEAD_DIM} (more heads, or set head_dim)")  # fmt: skip
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed; derived defaults (``head_dim = h/H``, ``Hkv = H``)
        follow a changed ``hidden``/``n_heads`` unless they were set explicitly. An unknown field is a
        ``TypeError`` that lists the valid ones."""
        check_field_names(changes)
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
    if not isinstance(name, str):
        raise TypeError(f"name={name!r} ({type(name).__name__}) must be a preset name (str): {', '.join(PRESETS)}")
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
