"""Single-process checks of the attention blocks: FPDT (P=1) against the local oracle,
activation checkpointing, no-grad forwards, timelines and boundary errors."""

import dataclasses

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fpdt_kernels
from parallel import (
    AttentionStrategy,
    AttentionWeights,
    HostStore,
    Kind,
    RotaryEmbedding,
    SPGroup,
    Timeline,
    fpdt_attention,
    local_attention,
    ulysses_attention,
)


@pytest.fixture(autouse=True)
def _torch_backend():
    with fpdt_kernels.use_backend("torch"):
        yield


def _close(got, want, tol=1e-5):
    err = (got - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), err


def _fresh(w):
    names = [k for k in ("wqkv", "wo", "bqkv", "bo") if getattr(w, k) is not None]
    return dataclasses.replace(w, **{k: getattr(w, k).detach().clone().requires_grad_(True) for k in names})


def _run(fn, x, w, dy):
    x = x.detach().clone().requires_grad_(True)
    w = _fresh(w)
    y = fn(x, w)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in w.parameters()]


@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "on-device"])
@pytest.mark.parametrize("Hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("order", ["kv", "query"])
def test_fpdt_single_rank_matches_local(chunks, offload, Hkv, causal, order):
    torch.manual_seed(chunks * 7 + Hkv)
    w = AttentionWeights.random(40, 4, Hkv, 10, bias=Hkv == 2)
    rope = RotaryEmbedding(10)
    x, dy = torch.randn(2, 36, 40), torch.randn(2, 36, 40)
    want = _run(lambda x, w: local_attention(x, w, rope, causal=causal), x, w, dy)
    got = _run(
        lambda x, w: fpdt_attention(
            x,
            w,
            rope,
            group=SPGroup.single(),
            chunks=chunks,
            offload=offload,
            causal=causal,
            store=HostStore(),
            backward_order=order,
        ),
        x,
        w,
        dy,
    )
    for g, r in zip(got, want, strict=True):
        _close(g, r)


def test_ulysses_single_rank_is_local():
    torch.manual_seed(0)
    w = AttentionWeights.random(32, 4, 2, 8)
    x, dy = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    want = _run(lambda x, w: local_attention(x, w, None), x, w, dy)
    got = _run(lambda x, w: ulysses_attention(x, w, None, group=SPGroup.single()), x, w, dy)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def _layer(strategy, rope):
    def layer(x, w):
        h = torch.nn.functional.rms_norm(x, (x.shape[-1],))
        return x + strategy(h, w, rope)

    return layer


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(reentrant):
    torch.manual_seed(0)
    w = AttentionWeights.random(32, 4, 2, 8, bias=True)
    rope = RotaryEmbedding(8)
    x, dy = torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    store = HostStore()
    layer = _layer(AttentionStrategy("fpdt", chunks=4, offload=True, store=store), rope)
    want = _run(layer, x, w, dy)

    def checkpointed(x, w):
        return checkpoint(lambda x, *p: layer(x, w), x, *w.parameters(), use_reentrant=reentrant)

    got = _run(checkpointed, x, w, dy)
    for g, r in zip(got, want, strict=True):
        _close(g, r)
    assert store.bytes_in_use == 0


def test_nograd_forward_copies_nothing_the_backward_would_need():
    torch.manual_seed(0)
    w = AttentionWeights.random(32, 4, 2, 8)
    x = torch.randn(1, 32, 32)
    for chunks in (1, 4):
        store, timeline = HostStore(), Timeline()
        with torch.no_grad():
            y = fpdt_attention(x, w, None, group=SPGroup.single(), chunks=chunks, store=store, timeline=timeline)
        moved = [op.buffer for _, op in timeline.ops() if op.kind == Kind.OFFLOAD]
        assert moved == [f"kv[{i}]" for i in range(chunks - 1)]  # only what later query chunks read
        assert store.bytes_in_use == 0
        _close(y, local_attention(x, w, None))
    # The reentrant checkpoint's first forward runs under no_grad: the same holds inside it.
    store, timeline = HostStore(), Timeline()
    xr = x.clone().requires_grad_(True)

    def block(x):
        return fpdt_attention(x, w, None, group=SPGroup.single(), chunks=4, store=store, timeline=timeline)

    y = checkpoint(block, xr, use_reentrant=True)
    first = [op.buffer for label, op in timeline.ops() if op.kind == Kind.OFFLOAD]
    assert first == ["kv[0]", "kv[1]", "kv[2]"]
    y.sum().backward()
    after = [op.buffer for label, op in timeline.ops() if op.kind == Kind.OFFLOAD and label == "forward"]
    assert {"x[0]", "q[3]", "o[3]"} <= set(after)  # the recompute saves for the backward


def test_timeline_rows():
    timeline = Timeline()
    w = AttentionWeights.random(16, 2, 2, 8)
    x = torch.randn(1, 8, 16, requires_grad=True)
    fpdt_attention(x, w, None, group=SPGroup.single(), chunks=2, store=HostStore(), timeline=timeline).sum().backward()
    rows = timeline.rows()
    assert {r["label"] for r in rows} == {"forward", "backward"}
    assert all(r["end_ms"] >= r["start_ms"] >= 0 for r in rows)
    kinds = {r["kind"] for r in rows}
    assert {"attn_fwd", "attn_bwd", "fetch", "offload", "a2a_qkv", "proj_bwd_q"} <= kinds


def test_invalid_configurations_raise():
    w = AttentionWeights.random(48, 6, 3, 8)
    x = torch.randn(1, 12, 48)
    with pytest.raises(ValueError, match=r"seq_len=12 is not divisible by gpus\*chunks=8; use a multiple of 8"):
        fpdt_attention(x, w, None, group=SPGroup.single(), chunks=8)
    with pytest.raises(ValueError, match="H=6 query heads are not divisible by P=4"):
        fpdt_attention(x, w, None, group=SPGroup(None, 0, 4), chunks=1)
    with pytest.raises(ValueError, match="Hkv=3 KV heads cannot be split over P=2"):
        ulysses_attention(x, w, None, group=SPGroup(None, 0, 2))
    with pytest.raises(ValueError, match=r"unknown strategy 'rings'; use one of \('local', 'ulysses', 'fpdt', 'ring'"):
        AttentionStrategy("rings")
    with pytest.raises(ValueError, match="only 'fpdt' takes chunks > 1"):
        AttentionStrategy("ulysses", chunks=2)
    with pytest.raises(ValueError, match="'local' runs in one process"):
        AttentionStrategy("local", SPGroup(None, 1, 2))
    with pytest.raises(ValueError, match=r"wqkv must be \[\(H\+2\*Hkv\)\*d, h\]"):
        AttentionWeights(torch.zeros(10, 48), torch.zeros(48, 48), n_heads=6, n_kv_heads=3)
    with pytest.raises(ValueError, match="invalid group"):
        SPGroup(None, 2, 2)
    strategy = AttentionStrategy("fpdt", SPGroup(None, 1, 2), chunks=2)
    with pytest.raises(ValueError, match="use a multiple of 4"):
        strategy.check(10, 4, 4)
    assert strategy.positions(8).tolist() == [2, 3, 6, 7]


def test_fpdt_bf16_follows_local_and_keeps_dtypes():
    torch.manual_seed(0)
    w = AttentionWeights.random(32, 4, 2, 8, bias=True, dtype=torch.bfloat16)
    rope = RotaryEmbedding(8)
    x, dy = torch.randn(2, 32, 32, dtype=torch.bfloat16), torch.randn(2, 32, 32, dtype=torch.bfloat16)
    want = _run(lambda x, w: local_attention(x, w, rope), x, w, dy)
    got = _run(lambda x, w: fpdt_attention(x, w, rope, group=SPGroup.single(), chunks=4, store=HostStore()), x, w, dy)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        _close(g.float(), r.float(), tol=3e-2)


def test_float64_gradients_stay_float64():
    # Every gradient of the FPDT block, the projection weights' too, is summed over the chunks in
    # the inputs' float64: equal to the one-process block to float64 rounding.
    torch.manual_seed(0)
    w = AttentionWeights.random(32, 4, 2)
    w = AttentionWeights(w.wqkv.detach().double().requires_grad_(), w.wo.detach().double().requires_grad_(), 4, 2)
    x = torch.randn(2, 64, 32, dtype=torch.float64, requires_grad=True)
    rope = RotaryEmbedding(8, 10000.0)
    with fpdt_kernels.use_backend("naive"):
        want = torch.autograd.grad(local_attention(x, w, rope).square().sum(), [x, *w.parameters()])
        got = torch.autograd.grad(
            fpdt_attention(x, w, rope, group=SPGroup.single(), chunks=4).square().sum(), [x, *w.parameters()]
        )
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
