"""Single-process model tests: chunked MLP and loss against plain autograd, the whole model with
and without chunking and checkpointing, presets, input checks, and Hugging Face Llama parity.

Attention runs on the ``torch`` backend (PyTorch's CPU flash kernel): conftest turns the Triton
interpreter on without CUDA, and the interpreter is too slow for whole-model tests.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fpdt_kernels
import models
from models.chunked import cross_entropy_reference, mlp_reference
from parallel.distributed import SPGroup
from parallel.parallelize import parallelize, shard_batch


@pytest.fixture(autouse=True)
def _torch_backend():
    with fpdt_kernels.use_backend("torch"):
        yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Norm-wise relative error below ``rel`` (sums over tiles round differently from one matmul)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel(got, want) < rel, f"relative error {_rel(got, want):.2e} >= {rel:.0e}"


def _batch(cfg, B=2, S=24, seed=0, ignore=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels[0, :ignore] = -100
    labels[1, -1] = -100
    return tokens, labels


# --- chunked MLP ---------------------------------------------------------------------------------


MLP_CASES = [("gelu", True), ("gelu", False), ("swiglu", False), ("swiglu", True)]


@pytest.mark.parametrize("tile", [1, 7, 26, 1000], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("activation,bias", MLP_CASES, ids=[f"{a}-{'bias' if b else 'nobias'}" for a, b in MLP_CASES])
def test_chunked_mlp_matches_unchunked(activation, bias, tile):
    g = torch.Generator().manual_seed(1)
    h, f, B, S = 12, 40, 2, 13  # N = 26 tokens: tiles 7 and 1000 do not divide it

    def p(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).requires_grad_()

    w1, w2 = p(f, h), p(h, f)
    w3 = p(f, h) if activation == "swiglu" else None
    b1, b2 = (p(f), p(h)) if bias else (None, None)
    x = torch.randn(B, S, h, generator=g).requires_grad_()
    dy = torch.randn(B, S, h, generator=g)
    params = [t for t in (x, w1, b1, w3, w2, b2) if t is not None]

    ref = mlp_reference(x, w1, b1, w3, w2, b2, activation)
    ref_grads = torch.autograd.grad(ref, params, dy)
    out = models.chunked_mlp(x, w1, b1, w3, w2, b2, activation=activation, tile=tile)
    grads = torch.autograd.grad(out, params, dy)

    _close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want)


def test_chunked_mlp_leaves_its_saved_input_alone():
    # The reference implementation writes dx into the saved x; here another op (LayerNorm,
    # which saves its input, and a product that saves its operands) shares x and must still work.
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    w1, w2 = torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)
    x = torch.nn.functional.layer_norm(x0, (8,))
    before, version = x.detach().clone(), x._version
    y = models.chunked_mlp(x, w1, None, None, w2, None, activation="gelu", tile=4) + x * x
    y.sum().backward()
    assert x._version == version
    assert torch.equal(x.detach(), before)
    x_ref = x0.detach().clone().requires_grad_()
    xr = torch.nn.functional.layer_norm(x_ref, (8,))
    (mlp_reference(xr, w1, None, None, w2, None, "gelu") + xr * xr).sum().backward()
    _close(x0.grad, x_ref.grad)


# --- chunked loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [1, 5, 26, 64], ids=lambda t: f"tile{t}")
def test_chunked_loss_matches_unchunked(tile):
    g = torch.Generator().manual_seed(3)
    B, S, h, V = 2, 13, 8, 37
    x = torch.randn(B, S, h, generator=g).requires_grad_()
    w = torch.randn(V, h, generator=g).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 3:9] = -100
    labels[1, 0] = -100

    ref_sum, ref_count = cross_entropy_reference(x, w, labels)
    ref_grads = torch.autograd.grad(ref_sum / ref_count, (x, w))
    loss_sum, count = models.chunked_cross_entropy(x, w, labels, tile=tile)
    grads = torch.autograd.grad(loss_sum / count, (x, w))

    assert count.item() == ref_count.item() == B * S - 7
    assert loss_sum.dtype == torch.float32
    _close(loss_sum, ref_sum, rel=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want)
    ignored = (labels == -100).nonzero()
    assert ignored.numel()
    assert torch.all(grads[0][ignored[:, 0], ignored[:, 1]] == 0)  # ignored tokens get no gradient


def test_chunked_loss_all_ignored_is_zero():
    x = torch.randn(1, 4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss_sum, count = models.chunked_cross_entropy(x, w, torch.full((1, 4), -100), tile=3)
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and count.item() == 0
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


def test_chunked_loss_is_stable_for_huge_logits():
    # softmax().log() (the reference implementation) gives inf when a label's probability underflows.
    x = torch.tensor([[[100.0, 0.0]]], requires_grad=True)
    w = torch.tensor([[10.0, 0.0], [-10.0, 0.0]], requires_grad=True)
    loss_sum, _ = models.chunked_cross_entropy(x, w, torch.tensor([[1]]), tile=1)
    assert loss_sum.item() == pytest.approx(2000.0)
    loss_sum.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_chunked_loss_makes_the_logits_once():
    # Forward and backward together run three head matmuls (logits, dx, dw): the gradients are
    # made while the logits exist, not recomputed by the backward. Without grad: the logits only.
    from torch.utils.flop_counter import FlopCounterMode

    import experiments.bench.step_flops  # noqa: F401  (the counter's formulas for in-place matmuls)

    N, h, V = 24, 8, 37
    x = torch.randn(N, h, requires_grad=True)
    w = torch.randn(V, h, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    with FlopCounterMode(display=False) as counter:
        loss_sum, count = models.chunked_cross_entropy(x, w, labels, tile=5)
        (loss_sum / count).backward()
    assert counter.get_total_flops() == 3 * 2 * N * h * V
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        models.chunked_cross_entropy(x, w, labels, tile=5)
    assert counter.get_total_flops() == 2 * N * h * V
    # Only w needs a gradient: no dx matmul.
    with FlopCounterMode(display=False) as counter:
        models.chunked_cross_entropy(x.detach(), w, labels, tile=5)[0].backward()
    assert counter.get_total_flops() == 2 * 2 * N * h * V


def test_chunked_loss_second_backward_raises():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss_sum, _ = models.chunked_cross_entropy(x, w, torch.randint(0, 11, (6,)), tile=4)
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss_sum.backward()


# --- whole model ---------------------------------------------------------------------------------


def _loss_and_grads(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b, rtol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert _rel(grads_a[name], grads_b[name]) < rtol, name


def _twin(cfg, **changes):
    """A model with ``cfg`` and one with ``changes``, sharing weights."""
    torch.manual_seed(0)
    a = models.Transformer(cfg)
    b = models.Transformer(cfg.replace(**changes))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("tiles", [(None, None), (5, 3)], ids=["paper-tiles", "odd-tiles"])
def test_model_chunked_equals_unchunked(preset, tiles):
    cfg = models.get_config(preset, mlp_tile=tiles[0], loss_tile=tiles[1])
    plain, chunked = _twin(cfg.replace(chunked_mlp=False, chunked_loss=False), chunked_mlp=True, chunked_loss=True)
    tokens, labels = _batch(cfg)
    _assert_same(_loss_and_grads(chunked, tokens, labels), _loss_and_grads(plain, tokens, labels))


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("on_host", [False, True], ids=["device-ckpt", "host-ckpt"])
def test_checkpointing_gives_same_gradients(preset, on_host):
    cfg = models.get_config(preset)
    plain, ckpt = _twin(cfg, checkpoint=True, checkpoint_on_host=on_host)
    tokens, labels = _batch(cfg)
    _assert_same(_loss_and_grads(ckpt, tokens, labels), _loss_and_grads(plain, tokens, labels), rtol=1e-6)


@pytest.mark.parametrize("on_host", [False, True], ids=["device-ckpt", "host-ckpt"])
def test_checkpointed_layers_train_behind_frozen_embeddings(on_host):
    """A checkpointed layer whose input needs no gradient (frozen embeddings) still trains its
    own parameters: every gradient as without checkpointing (they were silently None)."""
    cfg = models.get_config("llama-tiny")
    plain, ckpt = _twin(cfg, checkpoint=True, checkpoint_on_host=on_host)
    tokens, labels = _batch(cfg)
    grads = []
    for model in (plain, ckpt):
        model.embed.weight.requires_grad_(False)
        model(tokens, labels=labels).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, g in grads[0].items():
        assert _rel(grads[1][name], g) < 1e-6, name


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_checkpoint_recompute_skips_the_chunked_mlp_forward(preset):
    # A checkpointed step executes, beyond the plain step, exactly one more forward of each
    # layer's first half (norm1, attention, residual): the chunked MLP's backward recomputes its
    # tiles from the saved input, so the recompute does not run the MLP's forward.
    from torch.utils.flop_counter import FlopCounterMode

    cfg = models.get_config(preset)
    plain, ckpt = _twin(cfg, checkpoint=True)
    tokens, labels = _batch(cfg)

    def step_flops(model):
        with FlopCounterMode(display=False) as counter:
            model(tokens, labels=labels).backward()
        return counter.get_total_flops()

    block = plain.blocks[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        x = plain.embed(tokens)
        x + block.attn(block.norm1(x, 1))
    first_half = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block.mlp(x, 1, block.norm2)
    assert counter.get_total_flops() > first_half > 0  # the MLP is the larger half here
    assert step_flops(ckpt) - step_flops(plain) == cfg.n_layers * first_half


def test_host_checkpoints_keep_only_layer_inputs_on_host(monkeypatch):
    # The host hook must see exactly one saved tensor per layer: its [B, S, h] input, copied
    # into host-marked memory (on CPU; on CUDA it is save_on_cpu with pinned buffers).
    import parallel.host_store as host_store

    cfg = models.get_config("llama-tiny", checkpoint=True, checkpoint_on_host=True)
    model = models.Transformer(cfg)
    packed = []
    real = host_store._pack_to_host

    def spy(t):
        out = real(t)
        packed.append((tuple(t.shape), out.data_ptr() != t.data_ptr()))
        return out

    monkeypatch.setattr(host_store, "_pack_to_host", spy)
    tokens, labels = _batch(cfg)
    model(tokens, labels=labels).backward()
    assert packed == [((2, 24, cfg.hidden), True)] * cfg.n_layers


def test_default_tiles_follow_paper_ratios():
    model = models.Transformer(models.get_config("llama-tiny"))
    assert model._tiles(4096) == (2048, 128)  # C/(2P), C/(32P) with u = 1
    assert models.Transformer(models.get_config("gpt-tiny", mlp_tile=7, loss_tile=3))._tiles(4096) == (7, 3)
    off = models.Transformer(models.get_config("gpt-tiny", chunked_mlp=False, chunked_loss=False))
    assert off._tiles(4096) == (None, None)


class _LargestTensor(TorchDispatchMode):
    """Records the largest output (in elements) of any op run while it is active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "unchunked"])
def test_chunked_step_never_materialises_logits_or_mlp_activation(chunked):
    cfg = models.get_config(
        "llama-tiny", vocab_size=512, ffn_hidden=256, chunked_mlp=chunked, chunked_loss=chunked, mlp_tile=32
    )
    model = models.Transformer(cfg)
    tokens, labels = _batch(cfg, B=2, S=128)
    N = tokens.numel()
    with _LargestTensor() as probe:
        model(tokens, labels=labels).backward()
    if chunked:  # nothing bigger than a weight or an [N, h] / [N, (H+2Hkv)d] activation
        qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        assert probe.largest <= max(N * cfg.hidden, N * qkv, *(p.numel() for p in model.parameters()))
        assert probe.largest < min(N * cfg.vocab_size, N * cfg.ffn_hidden) / 2
    else:
        assert probe.largest >= N * cfg.vocab_size  # the probe does see the full logits


def test_logits_without_labels_match_loss():
    cfg = models.get_config("llama-tiny")
    model = models.Transformer(cfg)
    tokens, labels = _batch(cfg)
    logits = model(tokens)
    assert logits.shape == (2, 24, cfg.vocab_size) and logits.dtype == torch.float32
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1))
    torch.testing.assert_close(model(tokens, labels=labels), want, rtol=1e-5, atol=0)


def test_local_parallelize_and_shard_batch_are_identity():
    cfg = models.get_config("gpt-tiny")
    plain, local = _twin(cfg)
    local = parallelize(local, "local")
    tokens, labels = _batch(cfg)
    t, lab, pos = shard_batch(tokens, labels, "local")
    assert torch.equal(t, tokens) and torch.equal(lab, labels) and torch.equal(pos, torch.arange(24))
    assert [n for n, _ in local.named_parameters()] == [n for n, _ in plain.named_parameters()]
    got = local(t, labels=lab, positions=pos)
    torch.testing.assert_close(got, plain(tokens, labels=labels), rtol=0, atol=0)


# --- presets and configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params_b,shape",
    [
        ("gpt-2.7b", 2.65, (32, 2560, 32, 32, 10240)),
        ("gpt-6.7b", 6.65, (32, 4096, 32, 32, 16384)),
        ("gpt-13b", 12.84, (40, 5120, 40, 40, 20480)),
        ("gpt-30b", 29.31, (64, 6144, 64, 64, 24576)),
        ("llama3-8b", 8.03, (32, 4096, 32, 8, 14336)),
        ("llama3-70b", 70.55, (80, 8192, 64, 8, 28672)),
    ],
)
def test_presets_have_published_shapes(name, params_b, shape):
    cfg = models.get_config(name)
    assert (cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden) == shape
    assert cfg.num_params() / 1e9 == pytest.approx(params_b, abs=0.01)
    if name.startswith("llama"):
        assert (cfg.vocab_size, cfg.rope_theta, cfg.norm, cfg.norm_eps) == (128256, 500000.0, "rmsnorm", 1e-5)
        assert (cfg.activation, cfg.bias, cfg.tie_embeddings) == ("swiglu", False, False)
    else:
        assert (cfg.norm, cfg.activation, cfg.bias) == ("layernorm", "gelu", True)


def test_config_replace_rederives_head_dim():
    cfg = models.get_config("gpt-tiny", hidden=64, n_heads=8)
    assert (cfg.head_dim, cfg.n_kv_heads) == (8, 8)
    assert models.get_config("llama-tiny", n_heads=8).n_kv_heads == 2  # GQA stays as set


def test_tiny_presets_build_and_count_their_parameters():
    for name in ("gpt-tiny", "llama-tiny"):
        model = models.Transformer(models.get_config(name))
        assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params()


# --- bad inputs ----------------------------------------------------------------------------------


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model preset 'llama-7b'") as e:
        models.get_config("llama-7b")
    for name in models.PRESETS:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"hidden": 30, "n_heads": 4}, "not divisible by n_heads"),
        ({"norm": "batchnorm"}, "norm='batchnorm'"),
        ({"activation": "relu"}, "activation='relu'"),
        ({"mlp_tile": 0}, "mlp_tile=0"),
    ],
)
def test_bad_config_raises(changes, match):
    with pytest.raises(ValueError, match=match):
        models.get_config("gpt-tiny", **changes)
    with pytest.raises(ValueError, match=match):
        models.ModelConfig(**changes)


def test_bad_model_inputs_raise():
    cfg = models.get_config("llama-tiny")
    model = models.Transformer(cfg)
    tokens, labels = _batch(cfg)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        model(tokens + cfg.vocab_size)
    with pytest.raises(ValueError, match="labels .* must have the shape of tokens"):
        model(tokens, labels=labels[:, :-1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 96\) or -100"):
        model(tokens, labels=labels.clamp(min=-1))
    with pytest.raises(ValueError, match="integer tensor"):
        model(tokens.float())
    with pytest.raises(ValueError, match="positions do not match"):
        model(tokens, labels=labels, positions=torch.arange(24).flip(0))
    with pytest.raises(ValueError, match="positions do not match"):
        model(tokens, labels=labels, positions=torch.arange(12))
    with pytest.raises(ValueError, match="unknown strategy 'rings'"):
        parallelize(model, "rings")
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        parallelize(model, "fpdt", chunks=2, fsdp=True)
    parallelize(model, "local")
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(model, "local")
    with pytest.raises(ValueError, match="needs a model with attention modules"):
        parallelize(torch.nn.Linear(2, 2), "local")


def test_shard_batch_follows_the_fpdt_layout():
    # S=16, P=2, u=2: rank 1 holds tokens 4-7 and 12-15 (no process group needed to shard).
    tokens = torch.arange(16).repeat(2, 1)
    t, lab, pos = shard_batch(tokens, tokens + 100, "fpdt", chunks=2, group=SPGroup(None, 1, 2))
    want = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])
    assert torch.equal(t, want.repeat(2, 1)) and torch.equal(lab, want.repeat(2, 1) + 100)
    assert torch.equal(pos, want)
    t, _, pos = shard_batch(tokens, None, "ulysses", group=SPGroup(None, 1, 4))
    assert torch.equal(t[0], torch.arange(4, 8)) and torch.equal(pos, torch.arange(4, 8))


def test_parallelize_rejects_head_splits_it_cannot_do():
    model = models.Transformer(models.get_config("llama-tiny"))  # H=4, Hkv=2
    with pytest.raises(ValueError, match="not divisible by P=3"):
        parallelize(model, "ulysses", group=SPGroup(None, 0, 3))
    with pytest.raises(ValueError, match="'local' runs in one process"):
        parallelize(model, "local", group=SPGroup(None, 0, 2))


def test_bf16_model_runs_chunked_close_to_fp32():
    cfg = models.get_config("llama-tiny", mlp_tile=5, loss_tile=7)
    fp32, bf16 = _twin(cfg)
    bf16 = bf16.to(torch.bfloat16)
    tokens, labels = _batch(cfg)
    loss32, loss16 = fp32(tokens, labels=labels), bf16(tokens, labels=labels)
    loss16.backward()
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in bf16.parameters())


def test_bad_shard_batch_raises():
    tokens = torch.zeros(2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="seq_len=10 is not divisible by gpus\\*chunks=4"):
        shard_batch(tokens, None, "fpdt", chunks=4)
    with pytest.raises(ValueError, match="tokens must be \\[B, S\\]"):
        shard_batch(tokens[0], None, "local")


# --- Hugging Face parity -------------------------------------------------------------------------


def _hf_llama(**kw):
    import transformers  # the `test` extra: a missing transformers fails these tests, never skips them

    hf_cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **kw,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so the parity test sees them
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_hf_llama_parity(chunked):
    hf = _hf_llama()
    model = models.from_hf_llama(hf)
    cfg = model.cfg
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (2, 500000.0, 1e-6, False)
    if not chunked:
        model = models.from_hf_llama(hf, cfg.replace(chunked_mlp=False, chunked_loss=False))

    tokens, hf_labels = _batch(cfg, B=2, S=20)
    # transformers shifts labels inside the loss; ours are already aligned with the inputs.
    labels = torch.cat([hf_labels[:, 1:], torch.full((2, 1), -100)], dim=1)

    out = hf(input_ids=tokens, labels=hf_labels)
    out.loss.backward()
    loss = model(tokens, labels=labels)
    loss.backward()
    torch.testing.assert_close(model(tokens), out.logits.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)

    hf_grads = {n.removeprefix("model."): p.grad for n, p in hf.named_parameters()}
    ours = dict(model.named_parameters())
    pairs = [("embed.weight", hf_grads["embed_tokens.weight"]), ("head.weight", hf_grads["lm_head.weight"])]
    for i in range(cfg.n_layers):
        hf_attn = [hf_grads[f"layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"]
        pairs += [
            (f"blocks.{i}.attn.wqkv", torch.cat(hf_attn)),
            (f"blocks.{i}.attn.wo", hf_grads[f"layers.{i}.self_attn.o_proj.weight"]),
            (f"blocks.{i}.mlp.w1", hf_grads[f"layers.{i}.mlp.gate_proj.weight"]),
            (f"blocks.{i}.mlp.w3", hf_grads[f"layers.{i}.mlp.up_proj.weight"]),
            (f"blocks.{i}.mlp.w2", hf_grads[f"layers.{i}.mlp.down_proj.weight"]),
            (f"blocks.{i}.norm1.weight", hf_grads[f"layers.{i}.input_layernorm.weight"]),
            (f"blocks.{i}.norm2.weight", hf_grads[f"layers.{i}.post_attention_layernorm.weight"]),
        ]
    pairs.append(("norm.weight", hf_grads["norm.weight"]))
    assert len(pairs) == len(ours)
    for name, want in pairs:
        assert _rel(ours[name].grad, want) < 1e-5, name


def test_hf_llama_state_dict_and_errors():
    hf = _hf_llama()
    cfg = models.config_from_hf_llama(hf.config)
    model = models.from_hf_llama(hf.state_dict(), cfg)
    tokens, _ = _batch(cfg, S=8)
    torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs config="):
        models.from_hf_llama(hf.state_dict())
    with pytest.raises(ValueError, match="missing"):
        models.from_hf_llama({"model.embed_tokens.weight": torch.zeros(101, 48)}, cfg)
    # Weights the config has no place for are an error, never dropped: an untied head under a
    # tied config, or layers past n_layers.
    with pytest.raises(ValueError, match="lm_head.weight differs from embed_tokens.weight, but the config ties"):
        models.from_hf_llama(hf.state_dict(), cfg.replace(tie_embeddings=True))
    with pytest.raises(ValueError, match=r"no place for: \['layers.1.input_layernorm.weight'"):
        models.from_hf_llama(hf.state_dict(), cfg.replace(n_layers=1))


def test_hf_llama_tied_loads_and_biases_are_refused():
    import transformers

    hf = _hf_llama()
    hf.config.tie_word_embeddings = True
    hf.tie_weights()
    model = models.from_hf_llama(hf)
    tokens, _ = _batch(model.cfg, S=8)
    torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)
    for bias in ({"mlp_bias": True, "attention_bias": True}, {"attention_bias": True}):
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=1,
                                       num_attention_heads=6, num_key_value_heads=2, **bias)  # fmt: skip
        with pytest.raises(ValueError, match="only .*Llama models"):
            models.config_from_hf_llama(cfg)


@pytest.mark.parametrize("residual_fp32", [False, True])
def test_residual_stream_dtype_under_autocast(residual_fp32):
    """bf16-mixed keeps the residual stream (every block's input and output) in bf16 unless
    ``residual_fp32``; the parameters stay fp32 either way, and the loss is fp32."""
    cfg = models.get_config("llama-tiny", n_layers=2, residual_fp32=residual_fp32)
    model = models.Transformer(cfg)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    tokens, labels = _batch(cfg, S=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, labels=labels)
    loss.backward()
    want = torch.float32 if residual_fp32 else torch.bfloat16
    assert seen == [(want, want)] * cfg.n_layers
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    # Without autocast the residual follows the parameters (32-true, bf16-true, FSDP's bf16 copies).
    seen.clear()
    model(tokens, labels=labels)
    assert seen[0] == (torch.float32, torch.float32)


def test_residual_checkpoints_on_host_halve_in_bf16(monkeypatch):
    """Host-kept layer checkpoints follow the residual dtype: 2 bytes per element under bf16-mixed."""
    import parallel.host_store as host_store

    packed = []
    real = host_store._pack_to_host
    monkeypatch.setattr(host_store, "_pack_to_host", lambda t: packed.append(t.nbytes) or real(t))
    sizes = {}
    for residual_fp32 in (False, True):
        cfg = models.get_config("llama-tiny", n_layers=2, residual_fp32=residual_fp32, checkpoint=True,
                                checkpoint_on_host=True)  # fmt: skip
        model = models.Transformer(cfg)
        tokens, labels = _batch(cfg, S=32)
        packed.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, labels=labels)
        loss.backward()
        sizes[residual_fp32] = sum(packed)
    assert sizes[True] == 2 * sizes[False] == 2 * cfg.n_layers * 2 * 32 * cfg.hidden * 2
