"""The FPDT runner on one rank: its device ring is exactly what a run holds at its peak and never
runs dry, scratch regions fit, and its arguments reach the kernels as given."""

from collections import Counter

import pytest
import torch

import fpdt_kernels
import parallel.executor as executor
import parallel.fpdt as fpdt
from parallel import AttentionWeights, HostStore, RotaryEmbedding, SPGroup, fpdt_attention, local_attention


@pytest.fixture(autouse=True)
def _torch_backend():
    with fpdt_kernels.use_backend("torch"):
        yield


@pytest.fixture
def runs(monkeypatch):
    """Every DeviceBuffers the runner makes, with the most slots of each key it held at once."""
    made = []

    class Recording(fpdt.DeviceBuffers):
        def __init__(self, device, slots, scratch):
            super().__init__(device, slots, scratch)
            self.sized, self.held = Counter(slots), Counter()
            made.append(self)

        def take(self, shape, dtype):
            t = super().take(shape, dtype)
            self.held |= Counter(key for _, key in self._taken.values())
            if not hasattr(self, "first_taken"):
                self.first_taken = t.untyped_storage().data_ptr()
            return t

    monkeypatch.setattr(fpdt, "DeviceBuffers", Recording)
    return made


@pytest.mark.parametrize("chunks", [1, 3, 4])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "on-device"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Hkv", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("order", ["kv", "query"])
def test_ring_is_the_peak_and_never_runs_dry(runs, chunks, offload, causal, Hkv, order):
    torch.manual_seed(0)
    w = AttentionWeights.random(32, 4, Hkv, 8)
    x = torch.randn(2, 12 * chunks, 32, requires_grad=True)
    rope = RotaryEmbedding(8) if Hkv == 4 else None
    y = fpdt_attention(
        x,
        w,
        rope,
        group=SPGroup.single(),
        chunks=chunks,
        offload=offload,
        causal=causal,
        store=HostStore(),
        backward_order=order,
    )
    y.sum().backward()
    assert len(runs) == 2  # forward and backward
    for bufs in runs:
        assert bufs.grown == 0
        assert bufs.held == bufs.sized  # every slot is used at the peak: the ring is not oversized


def test_ring_does_not_grow_with_the_chunk_count(runs):
    # Double buffering: with offload the ring holds a few chunks, however many there are.
    totals = []
    for chunks in (4, 8):
        runs.clear()
        w = AttentionWeights.random(32, 4, 4, 8)
        x = torch.randn(1, 4 * chunks, 32, requires_grad=True)
        fpdt_attention(x, w, None, group=SPGroup.single(), chunks=chunks, store=HostStore()).sum().backward()
        totals.append([sum(b.sized.values()) for b in runs])
    assert totals[0] == totals[1], totals


def test_backward_fetches_into_slots_the_forward_handed_over(runs):
    # The saving forward parks its free slots: the backward's first fetch lands in one of them, so
    # on CUDA it waits for the forward's last use of that slot, not for the caller's stream.
    w = AttentionWeights.random(32, 4, 4, 8)
    x = torch.randn(1, 32, 32, requires_grad=True)
    y = fpdt_attention(x, w, None, group=SPGroup.single(), chunks=4, store=HostStore())
    parked = executor._parked[("cpu", None)]
    forward_slots = {t.untyped_storage().data_ptr() for ts in parked.values() for t, _ in ts}
    assert forward_slots
    y.sum().backward()
    _, backward = runs
    assert backward.first_taken in forward_slots


def test_nograd_forward_ring(runs):
    w = AttentionWeights.random(32, 4, 2, 8)
    with torch.no_grad():
        fpdt_attention(torch.randn(1, 32, 32), w, None, group=SPGroup.single(), chunks=4, store=HostStore())
    (bufs,) = runs
    assert bufs.grown == 0 and bufs.held == bufs.sized


def test_softmax_scale_zero_is_kept():
    # 0.0 is a scale (uniform attention over the visible keys), not "use the default". The naive
    # backend: PyTorch's CPU flash kernel returns NaN for causal attention with scale 0.0.
    torch.manual_seed(0)
    w = AttentionWeights.random(16, 2, 2, 8)
    x = torch.randn(1, 8, 16)
    rope = RotaryEmbedding(8)
    with fpdt_kernels.use_backend("naive"):
        got = fpdt_attention(x, w, rope, group=SPGroup.single(), chunks=2, softmax_scale=0.0, store=HostStore())
        want = local_attention(x, w, rope, softmax_scale=0.0)
        default = local_attention(x, w, rope)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, default)


def test_slots_are_handed_out_oldest_release_first():
    # The slot given back longest ago is the one whose users are likeliest done: a fetch taking
    # it rarely waits, where the newest would make it wait for the offload that just gave it back.
    key = (16, torch.float32)
    bufs = executor.DeviceBuffers(torch.device("cpu"), {key: 3}, {})
    a, b, c = (bufs.take((4, 4), torch.float32) for _ in range(3))
    for t in (b, a, c):  # given back in this order
        bufs.release(t)
        bufs.settle(())
    ptr = lambda t: t.untyped_storage().data_ptr()
    assert [ptr(bufs.take((16,), torch.float32)) for _ in range(3)] == [ptr(b), ptr(a), ptr(c)]
