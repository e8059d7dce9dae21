"""Bad input to the public model and parallel API gets a clear error naming the argument (CPU)."""

import dataclasses
import pathlib

import pytest
import torch

import models
from models import config as config_module
from parallel import parallelize, shard_batch
from parallel.distributed import SPGroup

# --- get_config / ModelConfig ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        # sizes: ints >= 1 (checked before head_dim = hidden / n_heads divides by them)
        ({"n_heads": 0}, ValueError, r"n_heads=0 must be >= 1"),
        ({"n_layers": -2}, ValueError, r"n_layers=-2 must be >= 1"),
        ({"hidden": "64"}, TypeError, r"hidden='64' \(str\) must be an int >= 1"),
        ({"hidden": 64.0}, TypeError, r"hidden=64.0 \(float\) must be an int >= 1"),
        ({"n_layers": 2.5}, TypeError, r"n_layers=2.5 \(float\) must be an int >= 1"),
        ({"vocab_size": True}, TypeError, r"vocab_size=True \(bool\) must be an int"),
        ({"n_kv_heads": 0}, ValueError, r"n_kv_heads=0 must be >= 1 \(or None"),
        ({"head_dim": 8.0}, TypeError, r"head_dim=8.0 \(float\) must be an int >= 1 \(or None"),
        ({"loss_tile": "256"}, TypeError, r"loss_tile='256' \(str\) must be an int >= 1 \(or None"),
        ({"mlp_tile": 0}, ValueError, r"mlp_tile=0 must be >= 1"),
        # head_dim: at most what the attention kernels take, set or derived
        ({"head_dim": 512}, ValueError, r"head_dim=512 is more than .* use head_dim <= 256"),
        ({"hidden": 1024, "n_heads": 2}, ValueError, r"head_dim=512 \(hidden/n_heads = 1024/2\).*<= 256"),
        # positive finite floats
        ({"rope_theta": 0}, ValueError, r"rope_theta=0 must be a finite float > 0"),
        ({"rope_theta": -10000.0}, ValueError, r"rope_theta=-10000.0 must be a finite float > 0"),
        ({"norm_eps": -1}, ValueError, r"norm_eps=-1 must be a finite float > 0"),
        ({"norm_eps": float("nan")}, ValueError, r"norm_eps=nan must be a finite float > 0"),
        ({"init_std": float("inf")}, ValueError, r"init_std=inf must be a finite float > 0"),
        ({"rope_theta": "1e4"}, TypeError, r"rope_theta='1e4' \(str\) must be a float > 0"),
        ({"norm_eps": False}, TypeError, r"norm_eps=False \(bool\) must be a float > 0"),
        # bools are bools
        ({"checkpoint": "no"}, TypeError, r"checkpoint='no' \(str\) must be True or False"),
        ({"bias": 1}, TypeError, r"bias=1 \(int\) must be True or False"),
        ({"residual_fp32": None}, TypeError, r"residual_fp32=None \(NoneType\) must be True or False"),
        # choices and strings
        ({"norm": None}, ValueError, r"norm=None; use one of \('layernorm', 'rmsnorm'\)"),
        ({"activation": "relu"}, ValueError, r"activation='relu'; use one of"),
    ],
)
def test_get_config_bad_override_raises(overrides, error, match):
    with pytest.raises(error, match=match):
        models.get_config("llama-tiny", **overrides)
    with pytest.raises(error, match=match):
        models.ModelConfig(**overrides)


@pytest.mark.parametrize("typo,suggestion", [("hiden", "hidden"), ("n_kv_head", "n_kv_heads"), ("zzz", None)])
def test_get_config_unknown_field_lists_the_valid_ones(typo, suggestion):
    with pytest.raises(TypeError, match=rf"unknown ModelConfig field\(s\) '{typo}'") as info:
        models.get_config("gpt-tiny", **{typo: 64})
    message = str(info.value)
    assert "valid fields: name, vocab_size, hidden," in message
    assert all(f.name in message for f in dataclasses.fields(models.ModelConfig))
    assert (f"did you mean '{suggestion}'" in message) if suggestion else ("did you mean" not in message)


def test_get_config_name_must_be_a_string():
    with pytest.raises(TypeError, match=r"name=\['llama-tiny'\] \(list\) must be a preset name"):
        models.get_config(["llama-tiny"])
    with pytest.raises(ValueError, match="unknown model preset 'llama-huge'; valid presets: gpt-tiny"):
        models.get_config("llama-huge")
    with pytest.raises(TypeError, match=r"name=3 \(int\) must be a str"):
        models.ModelConfig(name=3)
    with pytest.raises(TypeError, match=r"name=None \(NoneType\) must be a str"):
        models.get_config("gpt-tiny").replace(name=None)


def test_every_config_field_has_a_check():
    checked = [
        *config_module._SIZES,
        *config_module._OPTIONAL_SIZES,
        *config_module._POSITIVE_FLOATS,
        *config_module._BOOLS,
        *config_module._CHOICES,
        *config_module._STRINGS,
    ]
    assert sorted(checked) == sorted(f.name for f in dataclasses.fields(models.ModelConfig))


@pytest.mark.parametrize("name", list(models.PRESETS))
def test_presets_construct_unchanged(name):
    cfg = models.get_config(name)
    assert models.ModelConfig(**dataclasses.asdict(cfg)) == cfg
    assert cfg.head_dim <= 256 and cfg.n_heads % cfg.n_kv_heads == 0


def test_valid_overrides_still_accepted():
    # None for the optional fields, ints for float fields, and the derived defaults as before.
    cfg = models.get_config(
        "llama-tiny", n_kv_heads=None, head_dim=None, mlp_tile=None, loss_tile=3, rope_theta=10000, init_std=1
    )
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.loss_tile, cfg.rope_theta) == (4, 8, 3, 10000)
    assert models.get_config("gpt-tiny", hidden=64, n_heads=8).head_dim == 8
    assert models.get_config("llama-tiny", head_dim=256).head_dim == 256
    assert models.get_config("llama-tiny", checkpoint=True, checkpoint_on_host=True).checkpoint_on_host is True


# --- Transformer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,extra",
    [
        ("llama-tiny", r"\(a preset name: Transformer\(get_config\('llama-tiny'\)\)\)"),
        (None, r"got NoneType None"),
        ({"hidden": 32}, r"\(a dict of fields: Transformer\(ModelConfig\(\*\*fields\)\)\)"),
        (32, r"got int 32"),
    ],
)
def test_transformer_takes_a_model_config(cfg, extra):
    expected = r"Transformer takes a ModelConfig, e\.g\. Transformer\(get_config\('llama-tiny'\)\)"
    with pytest.raises(TypeError, match=expected) as info:
        models.Transformer(cfg)
    assert info.match(extra)


# --- from_hf_llama -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,config,match",
    [
        (None, None, r"hf_model_or_state_dict must be a transformers LlamaForCausalLM .* NoneType None"),
        ("meta-llama/Llama-3.2-1B", None, r"hf_model_or_state_dict='meta-llama/Llama-3.2-1B' is a name or path"),
        (pathlib.Path("weights"), None, r"hf_model_or_state_dict=PosixPath\('weights'\) is a name or path"),
        ("transformer", None, r"hf_model_or_state_dict is already a models\.Transformer"),
        (torch.nn.Linear(2, 2), None, r"hf_model_or_state_dict must be .* got Linear .* lacks a Hugging Face \.config"),
        ({}, "llama-tiny", r"config must be a models\.ModelConfig or None .* got str 'llama-tiny'"),
        ({}, {"hidden": 32}, r"config must be a models\.ModelConfig or None .* got dict"),
    ],
)
def test_from_hf_llama_rejects_wrong_objects(source, config, match):
    if source == "transformer":
        source = models.Transformer(models.get_config("llama-tiny"))
    with pytest.raises(TypeError, match=match) as info:
        models.from_hf_llama(source, config)
    assert info.match("LlamaForCausalLM")  # what it expects
    if config is None:
        assert info.match(r"from_pretrained\(repo_id_or_path\)")  # and how to get one


def test_from_hf_llama_bare_state_dict_needs_config():
    with pytest.raises(ValueError, match="a bare state dict needs config="):
        models.from_hf_llama({})


@pytest.mark.parametrize("hf_cfg", [None, "meta-llama/Llama-3.2-1B", torch.nn.Linear(2, 2)])
def test_config_from_hf_llama_takes_a_llama_config(hf_cfg):
    with pytest.raises(TypeError, match=r"hf_cfg must be a transformers LlamaConfig .* lacks .*hidden_size"):
        models.config_from_hf_llama(hf_cfg)


def test_config_from_hf_llama_unknown_override_lists_fields():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
    )
    expected = r"unknown ModelConfig field\(s\) 'checkpointing' \(did you mean 'checkpoint'\?\)"
    with pytest.raises(TypeError, match=expected):
        models.config_from_hf_llama(hf_cfg, checkpointing=True)
    assert models.config_from_hf_llama(hf_cfg, checkpoint=True).checkpoint is True


# --- parallelize / shard_batch chunks ------------------------------------------------------------

BAD_CHUNKS = [
    (2.5, TypeError, r"chunks=2.5 \(float\) must be an int >= 1"),
    ("4", TypeError, r"chunks='4' \(str\) must be an int >= 1"),
    (True, TypeError, r"chunks=True \(bool\) must be an int >= 1"),
    (None, TypeError, r"chunks=None \(NoneType\) must be an int >= 1"),
    (0, ValueError, r"chunks=0 must be an int >= 1"),
    (-4, ValueError, r"chunks=-4 must be an int >= 1"),
]


@pytest.mark.parametrize("strategy", ["fpdt", "ulysses"])
@pytest.mark.parametrize("chunks,error,match", BAD_CHUNKS)
def test_parallelize_chunks_must_be_a_positive_int(chunks, error, match, strategy):
    model = models.Transformer(models.get_config("llama-tiny", n_layers=1))
    with pytest.raises(error, match=match):
        parallelize(model, strategy, group=SPGroup.single(), chunks=chunks)
    assert not getattr(model, "_parallelized", False)


@pytest.mark.parametrize("strategy", ["fpdt", "local"])
@pytest.mark.parametrize("chunks,error,match", BAD_CHUNKS)
def test_shard_batch_chunks_must_be_a_positive_int(chunks, error, match, strategy):
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(error, match=match):
        shard_batch(tokens, tokens, strategy, chunks=chunks, group=SPGroup.single())


def test_valid_chunks_unchanged():
    tokens = torch.arange(16).reshape(1, 16)
    t, lab, pos = shard_batch(tokens, tokens, "fpdt", chunks=2, group=SPGroup(None, 1, 2))
    assert t.tolist() == [[4, 5, 6, 7, 12, 13, 14, 15]] and torch.equal(lab, t) and pos.tolist() == t[0].tolist()
    model = parallelize(models.Transformer(models.get_config("llama-tiny", n_layers=1)), "fpdt", chunks=4,
                        group=SPGroup.single())  # fmt: skip
    assert model.strategy.chunks == 4


# --- shard_batch tokens / labels -----------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens,labels,name,got",
    [
        ([[1, 2]], None, "tokens", r"got list \[\[1, 2\]\]"),
        (None, None, "tokens", r"got NoneType None"),
        (torch.zeros(1, 4), None, "tokens", r"got a torch\.float32 tensor of shape \(1, 4\)"),
        (torch.zeros(1, 4, dtype=torch.bool), None, "tokens", r"got a torch\.bool tensor"),
        (torch.zeros(1, 4, dtype=torch.long), [[1, 2, 3, 4]], "labels", r"got list \[\[1, 2, 3, 4\]\]"),
        (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4), "labels", r"got a torch\.float32 tensor"),
    ],
)
def test_shard_batch_takes_integer_tensors(tokens, labels, name, got):
    with pytest.raises(TypeError, match=rf"{name} must be an integer tensor \[B, S\] of token ids") as info:
        shard_batch(tokens, labels, "local")
    assert info.match(got)


def test_shard_batch_shape_errors_unchanged():
    tokens = torch.zeros(2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"tokens must be \[B, S\]"):
        shard_batch(tokens[0], None, "local")
    with pytest.raises(ValueError, match=r"labels \(2, 5\) must have the shape of tokens \(2, 10\)"):
        shard_batch(tokens, tokens[:, :5], "local")
    t, lab, _ = shard_batch(tokens.int(), None, "local")
    assert t.dtype == torch.int32 and lab is None


# --- fpdt-only settings on other strategies -------------------------------------------------------


@pytest.mark.parametrize("strategy", ["local", "ulysses"])
def test_fpdt_settings_on_another_strategy_warn(strategy):
    model = models.Transformer(models.get_config("llama-tiny", n_layers=1))
    with pytest.warns(UserWarning, match=rf"chunks=4, offload=True apply to fpdt only; '{strategy}' runs without"):
        parallelize(model, strategy, group=SPGroup.single(), chunks=4, offload=True)
    strat = next(m.strategy for m in model.modules() if "strategy" in vars(m))
    assert strat.chunks == 1  # (offload is read by fpdt only)


@pytest.mark.parametrize(
    "args, match",
    [
        (("fpdt", 256, -2, 1, 4, 4), r"sp=-2 \(sequence-parallel ranks\) must be >= 1"),
        (("usp", 256, 0, 1, 4, 4), r"sp=0 \(sequence-parallel ranks\) must be >= 1"),
        (("fpdt", 0, 1, 1, 4, 4), r"seq_len=0 must be >= 1"),
    ],
)
def test_check_setup_counts_are_positive(args, match):
    from parallel import check_setup

    with pytest.raises(ValueError, match=match):
        check_setup(*args)


def test_init_mesh_sizes_are_positive():
    from parallel.distributed import init_mesh

    with pytest.raises(ValueError, match=r"sp=0 must be >= 1 \(or None\)"):
        init_mesh(0)
    # One process: a mesh of several ranks names what it asked for (either size) and how to get it.
    with pytest.raises(ValueError, match=r"^ulysses=2 needs 2 ranks; torch.distributed is not initialised .*torchrun"):
        init_mesh(ulysses=2)
    with pytest.raises(ValueError, match=r"^sp=4 needs 4 ranks; ulysses=2 needs 2 ranks; "):
        init_mesh(4, 2)


@pytest.mark.parametrize("chunked_loss", [True, False], ids=["chunked", "plain"])
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t: torch.full_like(t, 96), r"labels must be in \[0, 96\) or -100 \(ignored\); got 96"),
        (lambda t: torch.full_like(t, -1), r"labels must be in \[0, 96\) or -100 \(ignored\); got -1"),
        (lambda t: t.float(), r"labels must be an int64 or int32 tensor, got torch.float32"),
    ],
    ids=["past-vocab", "negative", "float"],
)
def test_labels_are_checked_by_either_loss(chunked_loss, make, match):
    model = models.Transformer(models.get_config("llama-tiny", n_layers=1, chunked_loss=chunked_loss))
    tokens = torch.randint(0, 96, (1, 16))
    with pytest.raises(ValueError, match=match):
        model(tokens, labels=make(tokens))
    int32 = model(tokens, labels=tokens.int())  # int32 labels work on both paths
    assert torch.equal(int32, model(tokens, labels=tokens))


@pytest.mark.parametrize("base", [0, -1.0, float("nan")])
def test_rotary_base_must_be_positive(base):
    from parallel import RotaryEmbedding

    with pytest.raises(ValueError, match="needs a base \\(rope_theta\\) > 0"):
        RotaryEmbedding(8, base)


def test_attention_blocks_check_their_input():
    from parallel import AttentionWeights, HostStore, RotaryEmbedding, SPGroup, fpdt_attention, local_attention
    from parallel.schedule import forward_schedule

    w = AttentionWeights.random(32, 4, 2)  # head dim 8
    rope, one = RotaryEmbedding(8), SPGroup.single()
    good = torch.randn(2, 64, 32)
    block = dict(group=one, chunks=4)
    cases = [
        (lambda: fpdt_attention(torch.randn(2, 64, 16), w, rope, **block), ValueError, r"x must be \[B >= 1, S, h=32"),
        (lambda: local_attention(torch.randn(64, 32), w, rope), ValueError, r"got \(64, 32\)"),
        (lambda: fpdt_attention(torch.randn(0, 64, 32), w, rope, **block), ValueError, r"x must be \[B >= 1"),
        (lambda: local_attention(good, w, RotaryEmbedding(16)), ValueError, r"rope rotates head dim 16, but .* d=8"),
        (lambda: fpdt_attention(good, w, rope, group=None, chunks=4), TypeError, r"group must be a parallel.SPGroup"),
        (lambda: fpdt_attention(good, w, rope, store="host", **block), TypeError, r"store must be a parallel\.Host"),
        (lambda: forward_schedule(0, causal=True, offload=True, save=True), ValueError, r"chunks=0 must be an int"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    fpdt_attention(good, w, rope, store=HostStore(pin_memory=False), **block)  # the valid call still runs
