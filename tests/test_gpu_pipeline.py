"""The FPDT chunk pipeline on a real CUDA device (P=1): what the CPU tests cannot see.

On CPU the executor runs every op in order, so a missing stream wait or an early buffer reuse is
invisible there. Here the copies run on their own streams; ``torch.cuda._sleep`` in front of every
host-device copy delays it on its stream, so any op that does not wait for the copy it depends on
reads stale or unwritten memory and the result changes. Offload on and off run the same kernels in
the same order, so their outputs and gradients must be bit-identical.

``test_gpu_fpdt_under_sanitizer_backend`` is the case the prepared GPU script also runs under
``TORCH_CUDA_SANITIZER=1`` with the naive backend (the sanitizer sees PyTorch ops, not Triton
launches).

Memory and ordering: side streams allocate nothing (no allocator segment belongs to them, no new
segment after the first step); the caller's stream does not wait for the forward's last offload,
and the backward still reads what it wrote; host-kept checkpoints (copies on the side streams,
prefetched) give the same bits with delayed copies; pinned buffers count what the host
allocator reserves. A device ring running dry would be a sizing bug: its warning fails a test.
"""

import dataclasses

import pytest
import torch

import fpdt_kernels
import models
import parallel.host_store as host_store
from parallel import (
    AttentionWeights,
    HostStore,
    RotaryEmbedding,
    SPGroup,
    Stream,
    fpdt_attention,
    local_attention,
)
from parallel.executor import side_streams
from parallel.fpdt import _Runner

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("error:no free device slot:RuntimeWarning")]

# ~1 ms of GPU cycles at 1.5-2 GHz: longer than any op at these sizes.
SLEEP_CYCLES = 2_000_000


def _block(dtype, H=8, Hkv=2, d=64, S=1024, h=512, seed=0):
    torch.manual_seed(seed)
    w = AttentionWeights.random(h, H, Hkv, d, dtype=dtype, device="cuda")
    x = torch.randn(2, S, h, dtype=dtype, device="cuda")
    dy = torch.randn(2, S, h, dtype=dtype, device="cuda")
    return w, RotaryEmbedding(d), x, dy


def _run(fn, x, w, dy):
    x = x.detach().clone().requires_grad_(True)
    names = [k for k in ("wqkv", "wo", "bqkv", "bo") if getattr(w, k) is not None]
    w = dataclasses.replace(w, **{k: getattr(w, k).detach().clone().requires_grad_(True) for k in names})
    y = fn(x, w)
    y.backward(dy)
    torch.cuda.synchronize()
    return [y.detach(), x.grad] + [p.grad for p in w.parameters()]


@pytest.fixture
def slow_copies(monkeypatch):
    """Delay every offload and fetch on the stream that issues it."""
    for name in ("offload", "fetch"):
        original = getattr(_Runner, name)

        def delayed(self, op, _original=original):
            torch.cuda._sleep(SLEEP_CYCLES)
            _original(self, op)

        monkeypatch.setattr(_Runner, name, delayed)


def _fpdt(rope, chunks, offload, order="auto"):
    group = SPGroup.single()
    return lambda x, w: fpdt_attention(
        x, w, rope, group=group, chunks=chunks, offload=offload, store=HostStore(), backward_order=order
    )


@pytest.mark.parametrize("chunks", [2, 8])
def test_gpu_fpdt_offload_is_bit_identical(chunks, slow_copies):
    # Bit-identical results need sums that do not depend on timing: the split backward (the
    # default) and MHA (GQA's dK/dV add the query heads of a group with atomics).
    w, rope, x, dy = _block(torch.bfloat16, Hkv=8)
    with fpdt_kernels.use_backend("triton"):
        on_device = _run(_fpdt(rope, chunks, offload=False, order="kv"), x, w, dy)
        offloaded = _run(_fpdt(rope, chunks, offload=True, order="kv"), x, w, dy)
        again = _run(_fpdt(rope, chunks, offload=True, order="kv"), x, w, dy)
    for a, b, c in zip(on_device, offloaded, again, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


@pytest.mark.parametrize("order", ["kv", "query"])
def test_gpu_fpdt_matches_local_fp32(order):
    # GQA 4:1 in both backward orders (the copies and the slots they reuse differ on the streams).
    w, rope, x, dy = _block(torch.float32, S=768)
    with fpdt_kernels.use_backend("triton"):
        want = _run(lambda x, w: local_attention(x, w, rope), x, w, dy)
        got = _run(_fpdt(rope, 4, offload=True, order=order), x, w, dy)
    for g, r in zip(got, want, strict=True):
        err = (g - r).abs().max().item()
        assert err <= 1e-4 * r.abs().max().item(), err


def test_gpu_fpdt_under_sanitizer_backend(slow_copies):
    """FPDT (offload, 4 chunks) against the local block; meant for the naive backend under
    ``TORCH_CUDA_SANITIZER=1``, where every cross-stream access is checked."""
    w, rope, x, dy = _block(torch.float32, H=4, Hkv=2, d=32, S=256, h=128)
    want = _run(lambda x, w: local_attention(x, w, rope), x, w, dy)
    got = _run(_fpdt(rope, 4, offload=True), x, w, dy)
    for g, r in zip(got, want, strict=True):
        err = (g - r).abs().max().item()
        assert err <= 1e-4 * r.abs().max().item(), err


def test_gpu_fpdt_side_streams_allocate_nothing():
    w, rope, x, dy = _block(torch.bfloat16)
    store = HostStore()
    fn = lambda x, w: fpdt_attention(x, w, rope, group=SPGroup.single(), chunks=4, offload=True, store=store)  # noqa: E731
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with fpdt_kernels.use_backend("triton"):
        for _ in range(2):  # compiles, host buffers, allocator segments: the steady state from here
            _run(fn, x, w, dy)
        segments = torch.cuda.memory_stats()["segment.all.allocated"]
        torch.cuda.reset_peak_memory_stats()
        reserved = torch.cuda.memory_reserved()
        for _ in range(3):
            _run(fn, x, w, dy)
    stats = torch.cuda.memory_stats()
    sides = {s.cuda_stream for s in side_streams(x.device).values()}
    assert [seg for seg in torch.cuda.memory_snapshot() if seg["stream"] in sides] == []
    assert stats["segment.all.allocated"] == segments  # no cudaMalloc after the first step
    assert torch.cuda.max_memory_reserved() == reserved and stats["num_alloc_retries"] == 0
    assert store.allocations > 0 and store.bytes_in_use == 0


# ~1 s: far longer than the whole block at these sizes.
LONG_SLEEP_CYCLES = 2_000_000_000


def test_gpu_fpdt_forward_does_not_wait_for_its_last_offload(monkeypatch):
    chunks = 4
    original = _Runner.offload

    def slow_last(self, op):
        if op.buffer == f"o[{chunks - 1}]":
            torch.cuda._sleep(LONG_SLEEP_CYCLES)
        original(self, op)

    # Bit-identical needs the same sums in the same order: MHA (no atomics over a query group)
    # and one backward order on both sides.
    w, rope, x, dy = _block(torch.bfloat16, Hkv=8)
    with fpdt_kernels.use_backend("triton"):
        want = _run(_fpdt(rope, chunks, offload=False, order="kv"), x, w, dy)
        monkeypatch.setattr(_Runner, "offload", slow_last)
        xg = x.detach().clone().requires_grad_(True)
        wg = dataclasses.replace(w, wqkv=w.wqkv.detach().clone().requires_grad_(True))
        y = _fpdt(rope, chunks, offload=True, order="kv")(xg, wg)
        after = torch.cuda.Event()
        after.record()
        after.synchronize()  # the caller's stream is through the forward and the output projection
        assert not side_streams(x.device)[Stream.D2H].query()  # while the last offload still runs
        y.backward(dy)  # the backward's fetch of o[3] waits for that offload through its event
        torch.cuda.synchronize()
    torch.testing.assert_close(y.detach(), want[0], rtol=0, atol=0)
    torch.testing.assert_close(xg.grad, want[1], rtol=0, atol=0)


def test_gpu_fpdt_host_checkpoints_with_delayed_copies(monkeypatch):
    # Layer inputs kept on the host (reentrant checkpoints, the paper's recipe) with every copy
    # delayed on its stream: the loss and gradients of checkpoints kept on the device (a copy
    # read before it lands gives garbage, far outside the tolerance, which only allows for
    # atomics in the model's backward kernels), every pack on the device-to-host stream and every
    # copy back but the first prefetched on the host-to-device stream.
    cfg = models.get_config("llama-tiny", checkpoint=True)
    streams = []
    real = host_store.copy_rows

    def delayed(dst, src, non_blocking):
        torch.cuda._sleep(SLEEP_CYCLES)
        streams.append(torch.cuda.current_stream())
        real(dst, src, non_blocking)

    monkeypatch.setattr(host_store, "copy_rows", delayed)
    g = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, cfg.vocab_size, (2, 64), generator=g).cuda() for _ in range(2))
    store = host_store.default_host_store()
    results, allocations = [], []
    with fpdt_kernels.use_backend("naive"):
        for on_host in (False, True, True):
            torch.manual_seed(0)
            model = models.Transformer(cfg.replace(checkpoint_on_host=on_host)).cuda()
            in_use = store.bytes_in_use
            loss = model(tokens, labels=labels)
            loss.backward()
            torch.cuda.synchronize()
            results.append([loss.detach()] + [p.grad for p in model.parameters()])
            assert store.bytes_in_use == in_use  # buffers back in the store after the backward
            allocations.append(store.allocations)
    for plain, a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, plain, rtol=1e-5, atol=1e-6)
    assert allocations[1] == allocations[2]  # pinned buffers reused by the next step
    sides = side_streams(tokens.device)
    n = cfg.n_layers
    assert streams.count(sides[Stream.D2H]) == 2 * n  # every pack, on the device-to-host stream
    assert streams.count(sides[Stream.H2D]) == 2 * (n - 1)  # every layer but the last prefetched


def test_gpu_fpdt_pinned_buffers_count_what_is_reserved():
    if not hasattr(torch.cuda, "host_memory_stats"):
        pytest.skip("this PyTorch has no torch.cuda.host_memory_stats to compare with")
    torch.cuda.synchronize()  # every pinned block freed so far is reusable ...
    torch._C._host_emptyCache()  # ... and goes back to the system: new buffers are new blocks

    def owned():
        s = torch.cuda.host_memory_stats()
        key = next((k for k in ("reserved_bytes.current", "allocated_bytes.current") if k in s), None)
        assert key is not None, f"no pinned-bytes figure among {sorted(s)}"
        return s[key]

    before = owned()
    store = HostStore()
    bufs = [store.acquire(shape, dt) for shape, dt in (((3, 1000, 7), torch.bfloat16), ((5, 999), torch.float32))]
    assert owned() - before == store.bytes_allocated  # what the host allocator made
    assert store.bytes_allocated == 65536 + 32768 > sum(b.tensor.nbytes for b in bufs)
