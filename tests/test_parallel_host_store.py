"""Host store: bit-identical round trips, a buffer count that does not grow with steps, and a
pinned reservation that tracks what its buffers hold (compaction)."""

import math

import pytest
import torch

import fpdt_kernels
import parallel.host_store as hs
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


def _fpdt_grads(x, w, rope, offload, store, chunks=4, causal=True, order="auto"):
    x = x.detach().clone().requires_grad_(True)
    for p in w.parameters():
        p.grad = None
    y = fpdt_attention(
        x,
        w,
        rope,
        group=SPGroup.single(),
        chunks=chunks,
        offload=offload,
        store=store,
        causal=causal,
        backward_order=order,
    )
    y.backward(torch.ones_like(y))
    return [y.detach(), x.grad] + [p.grad.clone() for p in w.parameters()]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("order", ["kv", "query"])
def test_offload_round_trip_changes_no_bit(causal, order):
    # The same block with offload on and off, in the same backward order, runs the same
    # arithmetic; only the copies through the host store differ, so every output and gradient
    # must be bit-identical.
    torch.manual_seed(0)
    w = AttentionWeights.random(32, 4, 2, 8, bias=True)
    x = torch.randn(2, 24, 32)
    rope = RotaryEmbedding(8)
    store = HostStore()
    on = _fpdt_grads(x, w, rope, True, store, chunks=3, causal=causal, order=order)
    off = _fpdt_grads(x, w, rope, False, None, chunks=3, causal=causal, order=order)
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
    # One layer's worth per layer, no more: what is in use at the peak (the end of the forward),
    # and the buffer of one output projection's input, which the last layer gives back before its
    # attention backward takes its gradient buffers (a pool per shape holds each shape's most).
    assert store.bytes_allocated == peaks[-1] + x.numel() * x.element_size()


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


def _aliased(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views share any byte."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.data_ptr() != sb.data_ptr():
        return False
    ea, eb = a.element_size(), b.element_size()
    lo_a, lo_b = a.storage_offset() * ea, b.storage_offset() * eb
    return lo_a < lo_b + b.numel() * eb and lo_b < lo_a + a.numel() * ea


def test_compaction_carves_exact_views_when_idle():
    # Buffers of 5 * 2^k bytes: one allocation each reserves 1.6x pinned. Once all are back, the
    # next acquire lays them out in shared allocations that reserve within a few percent.
    store = HostStore()
    shapes = [((5, 1024), torch.float32)] * 3 + [((5, 512), torch.bfloat16)] * 2 + [((3, 7), torch.int64)]
    bufs = [store.acquire(shape, dt) for shape, dt in shapes]
    asked = sum(math.prod(s) * dt.itemsize for s, dt in shapes)
    assert store.buffer_bytes == asked and store.compactions == 0
    assert store.pinned_bytes == sum(hs.pinned_reserved_bytes(b.tensor.nbytes) for b in bufs) > 1.5 * asked
    old = [b.tensor for b in bufs]
    for b in bufs:
        store.release(b)
    again = store.acquire(*shapes[0])  # idle, with loose buffers: compacts first
    assert store.compactions == 1 and store.allocations == len(shapes)
    assert asked <= store.pinned_bytes <= 1.25 * asked
    assert not any(store.owns(t) for t in old) and all(store.owns(b.tensor) for b in bufs)
    for b, (shape, dt) in zip(bufs, shapes, strict=True):  # the same buffers, as exact-size views
        assert b.tensor.shape == shape and b.tensor.dtype == dt
    assert len({b.tensor.untyped_storage().data_ptr() for b in bufs}) < len(bufs)  # of shared allocations
    assert not any(_aliased(a.tensor, b.tensor) for k, a in enumerate(bufs) for b in bufs[k + 1 :])
    src = torch.randn(5, 1024)
    again.tensor.copy_(src)
    assert torch.equal(torch.empty_like(src).copy_(again.tensor), src)
    store.release(again)
    assert not store.compact()  # nothing loose: the layout stays
    store.clear()
    assert store.bytes_allocated == store.pinned_bytes == store.buffer_bytes == 0


def test_zero_byte_buffers_are_buffers_of_their_own():
    # An empty tensor has no storage to name: each one must still be its own block, so that two
    # of them are two holders' buffers, and the store's accounting and clear() still add up.
    store = HostStore()
    empty = [store.acquire(shape, dt) for shape, dt in [((0,), torch.float32)] * 2 + [((3, 0), torch.bfloat16)]]
    full = [store.acquire((5, 1024), torch.float32) for _ in range(3)]  # 1.6x pinned each: worth compacting
    assert len({id(b) for b in empty}) == 3 and store.allocations == 6
    assert store.buffer_bytes == 3 * full[0].tensor.nbytes and not store.owns(torch.empty(0))
    for b in [*empty, *full]:
        store.release(b)
    again = store.acquire((0,), torch.float32)  # idle with loose buffers: compacts, empty ones included
    assert store.compactions == 1 and again.tensor.shape == (0,)
    store.release(again)
    store.clear()
    assert store.bytes_allocated == store.pinned_bytes == store.buffer_bytes == 0


def test_compact_refuses_while_buffers_are_in_use():
    store = HostStore()
    buf = store.acquire((5, 100), torch.float32)
    with pytest.raises(RuntimeError, match="in use"):
        store.compact()
    store.release(buf)


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_host_reservation_of_a_checkpointed_fpdt_model(monkeypatch, n_kv_heads):
    """Host bytes a GPU run reserves (PyTorch's pinned allocator: a power of two per allocation)
    for host-kept layer checkpoints and FPDT offload, within 1.25x of what the design keeps there:
    every layer's input, and one layer's offloaded chunks (the recompute of one layer at a time).
    S = 5 * 256 tokens, so every buffer is 5 * 2^k bytes: 1.6x if each were its own allocation.
    The design's bytes come from the shapes alone."""
    from models import Transformer, get_config
    from parallel import AttentionStrategy

    store = HostStore()
    monkeypatch.setattr(hs, "_default", store)  # checkpoints and chunks both go to the default store
    B, S, u = 1, 1280, 4
    cfg = get_config("llama-tiny", checkpoint=True, checkpoint_on_host=True, n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for block in model.blocks:
        block.attn.strategy = AttentionStrategy("fpdt", SPGroup.single(), chunks=u, offload=True)
    tokens, labels = (torch.randint(0, cfg.vocab_size, (B, S)) for _ in range(2))
    reserved, allocations = [], []
    for _step in range(3):
        model(tokens, labels=labels).backward()
        assert store.bytes_in_use == 0
        reserved.append(store.pinned_bytes)
        allocations.append(store.allocations)

    f32, c = 4, S // u  # fp32 model; one rank: a chunk is c tokens
    h, H, Hkv, d = cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    checkpoints = cfg.n_layers * B * S * h * f32
    q = B * c * H * d * f32  # also o, the output gradient and the fp32 dq of a chunk
    chunk = {"x": B * c * h * f32, "q": q, "k": B * c * Hkv * d * f32, "v": B * c * Hkv * d * f32, "o": q,
             "lse": B * H * c * f32}  # fmt: skip
    # The output projection's input, and the backward's gradient round trips, by the order that
    # moves fewer bytes. GQA (4 query heads, 2 KV heads) loops over query chunks: the fp32 K/V
    # gradients of chunks 0..u-2 wait on the host. MHA loops over KV chunks: u - 1 output
    # gradients and the fp32 dq round trips (each acquires its new buffer before it gives the old
    # one back: u dq at once).
    if Hkv < H:
        grads = (u - 1) * (chunk["k"] + chunk["v"])
    else:
        grads = (u - 1) * q + u * q
    layer = u * sum(chunk.values()) + B * S * H * d * f32 + grads
    design = checkpoints + layer
    one_each = cfg.n_layers * hs.pinned_reserved_bytes(B * S * h * f32) + u * sum(
        hs.pinned_reserved_bytes(n) for n in chunk.values()
    )
    assert one_each > 1.5 * (checkpoints + u * sum(chunk.values()))  # what loose buffers would reserve
    assert allocations == [allocations[0]] * 3 and reserved[1] == reserved[2]  # settled after a step
    assert reserved[-1] <= 1.25 * design, (reserved, design)
    assert store.buffer_bytes == design  # and the store holds what the design says, no more


def test_a_buffer_goes_back_once_and_to_its_own_store():
    store, other = HostStore(pin_memory=False), HostStore(pin_memory=False)
    buf = store.acquire((4, 8), torch.float32)
    store.release(buf)
    with pytest.raises(ValueError, match="released twice, or acquired from another store"):
        store.release(buf)
    with pytest.raises(ValueError, match="released twice, or acquired from another store"):
        other.release(store.acquire((4, 8), torch.float32))
    with pytest.raises(TypeError, match="release takes a HostBuffer from acquire\\(\\), got NoneType"):
        store.release(None)
    assert store.bytes_in_use == 4 * 8 * 4 and other.bytes_in_use == 0  # the one still out
    a, b = store.acquire((4, 8), torch.float32), store.acquire((4, 8), torch.float32)
    assert a is not b
