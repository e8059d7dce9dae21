"""GPT and Llama (one :class:`Transformer`), chunked MLP and loss, Hugging Face Llama loading.

    from models import Transformer, get_config
    model = Transformer(get_config("llama-tiny"))
    loss = model(tokens, labels=labels)

Parallelism is applied from outside: ``parallel.parallelize(model, "fpdt", ...)``.
"""

from .chunked import IGNORE_INDEX, chunked_cross_entropy, chunked_mlp
from .config import PRESETS, ModelConfig, get_config
from .hf import config_from_hf_llama, from_hf_llama
from .transformer import Transformer

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "ModelConfig",
    "Transformer",
    "chunked_cross_entropy",
    "chunked_mlp",
    "config_from_hf_llama",
    "from_hf_llama",
    "get_config",
]
