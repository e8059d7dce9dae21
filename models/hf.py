"""Load a Hugging Face ``transformers`` ``LlamaForCausalLM`` into a :class:`models.Transformer`.

    hf = LlamaForCausalLM(LlamaConfig(...))
    model = from_hf_llama(hf)                       # config taken from hf.config
    model = from_hf_llama(hf.state_dict(), config)  # a state dict needs our ModelConfig

transformers itself is only needed to pass a model; this file does not import it.
"""

from __future__ import annotations

import torch

from .config import ModelConfig, check_field_names
from .transformer import Transformer

# What config_from_hf_llama reads without a default: a transformers LlamaConfig has them all.
_HF_CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "rms_norm_eps")  # fmt: skip
_HOW_TO_GET = (
    "get a LlamaForCausalLM with transformers.LlamaForCausalLM.from_pretrained(repo_id_or_path), or pass "
    "its state_dict() with config= a models.ModelConfig"
)


def _describe(obj) -> str:
    text = repr(obj)
    return f"{type(obj).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _check_source(hf_model_or_state_dict, config) -> None:
    """Raise ``TypeError`` unless the arguments of :func:`from_hf_llama` are a ``LlamaForCausalLM``
    (anything with ``state_dict()`` and a ``config``) or a state dict, and ``config`` a ModelConfig."""
    if config is not None and not isinstance(config, ModelConfig):
        raise TypeError(
            f"config must be a models.ModelConfig or None (None: read from the LlamaForCausalLM's .config), got "
            f"{_describe(config)}; "
            "e.g. config_from_hf_llama(hf_model.config) or get_config('llama-tiny')"
        )
    src = hf_model_or_state_dict
    if isinstance(src, dict):
        return
    if isinstance(src, Transformer):
        raise TypeError(
            "hf_model_or_state_dict is already a models.Transformer; from_hf_llama converts a Hugging Face "
            f"LlamaForCausalLM (or its state_dict) into one: {_HOW_TO_GET}"
        )
    if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
        raise TypeError(
            f"hf_model_or_state_dict={src!r} is a name or path; from_hf_llama does not download or read files: "
            f"{_HOW_TO_GET}"
        )
    if not callable(getattr(src, "state_dict", None)) or (config is None and not hasattr(src, "config")):
        lacks = "a state_dict() method" if not callable(getattr(src, "state_dict", None)) else "a Hugging Face .config"
        raise TypeError(
            f"hf_model_or_state_dict must be a transformers LlamaForCausalLM or its state_dict (a dict), got "
            f"{_describe(src)}, which lacks {lacks}; {_HOW_TO_GET}"
        )


def _hf_rope_theta(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"only plain RoPE is supported; this model uses rope_type={rope_type!r}")
    theta = params.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    if theta is None:
        raise ValueError("the Hugging Face config has no rope_theta")
    return float(theta)


def config_from_hf_llama(hf_cfg, **overrides) -> ModelConfig:
    """Our :class:`ModelConfig` for a ``transformers`` ``LlamaConfig`` (plus runtime overrides)."""
    missing = [f for f in _HF_CONFIG_FIELDS if not hasattr(hf_cfg, f)]
    if missing:
        raise TypeError(
            f"hf_cfg must be a transformers LlamaConfig (hf_model.config, or LlamaConfig.from_pretrained(...)), got "
            f"{_describe(hf_cfg)}, which lacks {', '.join(missing)}"
        )
    check_field_names(overrides)
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_cfg.hidden_act!r}: only SwiGLU (silu) Llama MLPs are supported")
    attn_bias = bool(getattr(hf_cfg, "attention_bias", False))
    mlp_bias = bool(getattr(hf_cfg, "mlp_bias", False))
    if mlp_bias:
        # The MLP here is W2 (silu(W1 x + b1) * W3 x) + b2: HF's up_proj bias has no place in it.
        raise ValueError("mlp_bias=True: this Transformer's SwiGLU MLP has no up-projection bias, so its weights "
                         "cannot be loaded exactly; only mlp_bias=False Llama models are supported")  # fmt: skip
    if attn_bias:
        raise ValueError("attention_bias=True needs the MLP biases too (one `bias` switch here), and mlp_bias=True "
                         "is not supported: only Llama models without biases load")  # fmt: skip
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    fields = dict(
        name="hf-llama",
        vocab_size=hf_cfg.vocab_size,
        hidden=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=getattr(hf_cfg, "num_key_value_heads", None) or hf_cfg.num_attention_heads,
        ffn_hidden=hf_cfg.intermediate_size,
        head_dim=head_dim,
        rope_theta=_hf_rope_theta(hf_cfg),
        norm="rmsnorm",
        norm_eps=hf_cfg.rms_norm_eps,
        activation="swiglu",
        bias=attn_bias,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


class _Reads(dict):
    """A state dict that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _convert(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = _Reads({k.removeprefix("model."): v for k, v in sd.items()})
    out = _converted(sd, cfg)
    # Every weight must land somewhere: a key left over means the config does not describe these
    # weights (more layers, biases, an untied head), and loading without it would be wrong.
    left = sorted(k for k in set(sd) - sd.read if not k.endswith("rotary_emb.inv_freq"))
    if cfg.tie_embeddings and "lm_head.weight" in left:
        if not torch.equal(sd["lm_head.weight"], sd["embed_tokens.weight"]):
            raise ValueError("lm_head.weight differs from embed_tokens.weight, but the config ties them; use "
                             "tie_embeddings=False")  # fmt: skip
        left.remove("lm_head.weight")
    if left:
        raise ValueError(f"the state dict holds weights this config has no place for: {left[:6]}"
                         f"{' ...' if len(left) > 6 else ''} ({len(left)} keys); check n_layers, bias and "
                         "tie_embeddings against the model that saved them")  # fmt: skip
    return out


def _converted(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"embed.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        a = src + "self_attn."
        out[dst + "norm1.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "norm2.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "attn.wqkv"] = torch.cat([sd[a + p + "_proj.weight"] for p in "qkv"])  # rows [Q | K | V]
        out[dst + "attn.wo"] = sd[a + "o_proj.weight"]
        out[dst + "mlp.w1"] = sd[src + "mlp.gate_proj.weight"]
        out[dst + "mlp.w3"] = sd[src + "mlp.up_proj.weight"]
        out[dst + "mlp.w2"] = sd[src + "mlp.down_proj.weight"]
        if cfg.bias:
            out[dst + "attn.bqkv"] = torch.cat([sd[a + p + "_proj.bias"] for p in "qkv"])
            out[dst + "attn.bo"] = sd[a + "o_proj.bias"]
            out[dst + "mlp.b1"] = sd[src + "mlp.gate_proj.bias"]
            out[dst + "mlp.b2"] = sd[src + "mlp.down_proj.bias"]
    return out


def from_hf_llama(hf_model_or_state_dict, config: ModelConfig | None = None) -> Transformer:
    """A :class:`Transformer` with the weights of a ``LlamaForCausalLM`` (or its ``state_dict``).

    ``config``: our config; required for a bare state dict, otherwise read from ``hf.config``.
    GQA, RoPE theta, RMSNorm eps and tied/untied heads carry over. Weights keep their dtype.
    Anything else (a repo id, a models.Transformer, another module) is a ``TypeError`` that says
    what to pass.
    """
    _check_source(hf_model_or_state_dict, config)
    if isinstance(hf_model_or_state_dict, dict):
        if config is None:
            raise ValueError("a bare state dict needs config= (a models.ModelConfig); pass the model to infer it")
        sd = hf_model_or_state_dict
    else:
        sd = hf_model_or_state_dict.state_dict()
        config = config or config_from_hf_llama(hf_model_or_state_dict.config)
    if config.activation != "swiglu" or config.norm != "rmsnorm":
        raise ValueError(f"a Llama model needs activation='swiglu' and norm='rmsnorm', got {config}")
    try:
        weights = _convert(sd, config)
    except KeyError as e:
        raise ValueError(f"not a LlamaForCausalLM state dict for {config.n_layers} layers: missing {e}") from None
    dtype = weights["embed.weight"].dtype
    model = Transformer(config).to(dtype)
    model.load_state_dict(weights, strict=True)
    return model
