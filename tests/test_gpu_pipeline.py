"""The FPDT chunk pipeline on a real CUDA device (P=1): what the CPU tests cannot see.

On CPU the executor runs every op in order, so a missing stream wait or an early buffer reuse is
invisible there. Here the copies run on their own streams; ``torch.cuda._sleep`` in front of every
host-device copy delays it on its stream, so any op that does not wait for the copy it depends on
reads stale or unwritten memory and the result changes. Offload on and off run the same kernels in
the same order, so their outputs and gradients must be bit-identical.

``test_gpu_fpdt_under_sanitizer_backend`` is the case the prepared GPU script also runs under
``TORCH_CUDA_SANITIZER=1`` with the naive backend (the sanitizer sees PyTorch ops, not Triton
launches).
"""

import dataclasses

import pytest
import torch

import kernels
from parallel import AttentionWeights, HostStore, RotaryEmbedding, SPGroup, fpdt_attention, local_attention
from parallel.fpdt import _Runner

pytestmark = pytest.mark.gpu

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


def _fpdt(rope, chunks, offload):
    group = SPGroup.single()
    return lambda x, w: fpdt_attention(x, w, rope, group=group, chunks=chunks, offload=offload, store=HostStore())


@pytest.mark.parametrize("chunks", [2, 8])
def test_gpu_fpdt_offload_is_bit_identical(chunks, slow_copies):
    w, rope, x, dy = _block(torch.bfloat16)
    with kernels.use_backend("triton"):
        on_device = _run(_fpdt(rope, chunks, offload=False), x, w, dy)
        offloaded = _run(_fpdt(rope, chunks, offload=True), x, w, dy)
        again = _run(_fpdt(rope, chunks, offload=True), x, w, dy)
    for a, b, c in zip(on_device, offloaded, again, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_gpu_fpdt_matches_local_fp32():
    w, rope, x, dy = _block(torch.float32, S=768)
    with kernels.use_backend("triton"):
        want = _run(lambda x, w: local_attention(x, w, rope), x, w, dy)
        got = _run(_fpdt(rope, 4, offload=True), x, w, dy)
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
