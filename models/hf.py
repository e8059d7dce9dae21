"""Load a Hugging Face ``transformers`` ``LlamaForCausalLM`` into a :class:`models.Transformer`.

    hf = LlamaForCausalLM(LlamaConfig(...))
    model = from_hf_llama(hf)                       # config taken from hf.config
    model = from_hf_llama(hf.state_dict(), config)  # a state dict needs our ModelConfig

transformers itself is only needed to pass a model; this file does not import it.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .transformer import Transformer


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
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_cfg.hidden_act!r}: only SwiGLU (silu) Llama MLPs are supported")
    attn_bias = bool(getattr(hf_cfg, "attention_bias", False))
    mlp_bias = bool(getattr(hf_cfg, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(f"attention_bias={attn_bias} and mlp_bias={mlp_bias} must agree (one `bias` switch here)")
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


def _convert(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
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
    """
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
