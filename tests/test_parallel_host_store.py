"""Host store: bit-identical round trips and a buffer count that does not grow with steps."""

import pytest
import torch

import fpdt_kernels
from parallel import AttentionWeights, HostStore, RotaryEmbedding, SPGroup, fpdt_attention


@pytest.fixture(autouse=True)
def _torch_backend():
    with fpdt_kernels.use_backend("torch"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_round_trip_is_bit_identical(dtype):
    store = HostStore()
    assert store.pin_memory == torch.cuda.is_available()
    src = (torch.randn(3, 17, 5) * 1e3).to(dtype)
    if dtype.is_floating_point:
        src[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)
    buf = store.acquire(src.shape, src.dtype)
    assert store.owns(buf.tensor) and not store.owns(src)
    buf.tensor.copy_(src)
    back = torch.empty_like(src).copy_(buf.tensor)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[src.element_size()]
    assert torch.equal(back.view(bits), src.view(bits))
    store.release(buf)
    assert store.bytes_in_use == 0
    again = store.acquire(src.shape, src.dtype)
    assert again is buf and store.allocations == 1
    other = store.acquire((4,), dtype)
    assert other is not buf and store.allocations == 2
    store.release(again)
    store.release(other)
    store.clear()
    assert store.bytes_allocated == 0 and not store.owns(buf.tensor)


def _fpdt_grads(x, w, rope, offload, store, chunks=4, causal=True):
    x = x.detach().clone().requires_grad_(True)
    for p in w.parameters():
        p.grad = None
    y = fpdt_attention(x, w, rope, group=SPGroup.single(), chunks=chunks, offload=offload, store=store, causal=causal)
    y.backward(torch.ones_like(y))
    return [y.detach(), x.grad] + [p.grad.clone() for p in w.parameters()]


@pytest.mark.parametrize("causal", [True, False])
def test_offload_round_trip_changes_no_bit(causal):
    # The same block with offload on and off runs the same arithmetic; only the copies through
    # the host store differ, so every output and gradient must be bit-identical.
    torch.manual_seed(0)
    w = AttentionWeights.random(32, 4, 2, 8, bias=True)
    x = torch.randn(2, 24, 32)
    rope = RotaryEmbedding(8)
    store = HostStore()
    on = _fpdt_grads(x, w, rope, True, store, chunks=3, causal=causal)
    off = _fpdt_grads(x, w, rope, False, None, chunks=3, causal=causal)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)
    assert store.allocations > 0 and store.bytes_in_use == 0


def test_allocations_do_not_grow_with_steps():
    torch.manual_seed(0)
    layers = [AttentionWeights.random(32, 4, 4, 8) for _ in range(2)]
    rope = RotaryEmbedding(8)
    store = HostStore()
    counts, peaks = [], []
    for _step in range(4):
        x = torch.randn(1, 32, 32, requires_grad=True)
        h = x
        for w in layers:  # two layers alive at once: both hold host buffers until the backward
            h = h + fpdt_attention(h, w, rope, group=SPGroup.single(), chunks=4, offload=True, store=store)
        h.sum().backward()
        counts.append(store.allocations)
        peaks.append(store.peak_bytes_in_use)
        assert store.bytes_in_use == 0
    assert counts[0] > 0
    assert counts == [counts[0]] * 4, counts
    assert store.bytes_allocated == peaks[-1]  # one layer's worth per layer, no more


def test_dropped_graph_returns_buffers():
    store = HostStore()
    w = AttentionWeights.random(16, 2, 2, 8)
    x = torch.randn(1, 8, 16, requires_grad=True)
    y = fpdt_attention(x, w, None, group=SPGroup.single(), chunks=2, offload=True, store=store)
    assert store.bytes_in_use > 0
    del y  # graph freed without a backward
    assert store.bytes_in_use == 0


def test_saved_tensors_on_host_only_moves_the_named_activation(monkeypatch):
    """``only=o``: the activation an op saves goes to the host, the weight it saves beside it does
    not (it is model state, already on the device), and the gradients are unchanged."""
    import parallel.host_store as hs

    moved = []
    real = hs._pack_to_host
    monkeypatch.setattr(hs, "_pack_to_host", lambda t: moved.append(tuple(t.shape)) or real(t))
    o = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    with hs.saved_tensors_on_host(only=o):
        y = torch.nn.functional.linear(o, w)
    y.square().sum().backward()
    assert moved == [(6, 4)]
    o2, w2 = o.detach().requires_grad_(), w.detach().requires_grad_()
    torch.nn.functional.linear(o2, w2).square().sum().backward()
    assert torch.equal(o.grad, o2.grad) and torch.equal(w.grad, w2.grad)
