"""Attention kernels against a float64 reference: outputs, every gradient, chunking, edge rows.

Tolerances follow flash-attn's tests: our error may be at most 2x (outputs) / 3x (gradients)
the error of the same math done by PyTorch in the input dtype, plus a floor of the dtype's
rounding error. Without CUDA the ``triton`` backend runs in the Triton interpreter.
"""

import functools
import os
import re

import pytest
import torch

import fpdt_kernels
from fpdt_kernels import naive
from fpdt_kernels.attention import torch_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_BACKENDS = ["triton", "torch"]

# (Sq, Sk, d, H, Hkv): every length in {1, 17, 63, 113, 128, 200}, Sq != Sk both ways, every
# head dim in {16, 40, 64, 111}, every head split in {4/4, 4/2, 4/1}.
SHAPES = [
    (1, 1, 16, 4, 4),
    (17, 63, 40, 4, 2),
    (63, 17, 111, 4, 1),
    (113, 113, 64, 4, 4),
    (128, 200, 16, 4, 1),
    (200, 128, 40, 4, 2),
    (113, 1, 64, 4, 2),
    (1, 128, 111, 4, 4),
]


def _ids(shape):
    return "sq{}-sk{}-d{}-h{}kv{}".format(*shape)


def _make(shape, dtype, device=DEVICE, batch=2, seed=0):
    sq, sk, d, h, hkv = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, sq, h, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(batch, sk, hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(batch, sk, hkv, d, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(batch, sq, h, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, *grads)


def _rounding(dtype):
    # Error of one round trip through the dtype around values of magnitude ~1.
    x = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    return (x.to(dtype).double() - x).abs().max().item()


_ABS_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Relative error of one tf32x3 product (three TF32 products; the dropped low x low term is about
# 2^-22 of the product): what GPU fp32 dots add beyond fp32 rounding.
TF32X3_EPS = 2.0**-22


def gradient_magnitudes(q, k, v, do, causal, q_start=None, k_start=0):
    """``(|out|, |dq|, |dk|, |dv|)`` as sums of the absolute values of the terms that make each
    element, in float64: the scale of the rounding error of those sums. It is large where a
    gradient is a small difference of large terms: with one key every ``P`` is 1 and
    ``dS = dP - delta`` cancels, so ``dk = scale * sum(dS * q)`` is 0 made of terms of size ``|do||v|``.
    Offsets as in the chunk ops; ``q_start=None`` aligns causal to the bottom right (``flash_attention``)."""
    q, k, v, do = (t.double() for t in (q, k, v, do))
    groups, scale = q.shape[2] // k.shape[2], q.shape[-1] ** -0.5
    q_start = k.shape[1] - q.shape[1] if q_start is None else q_start
    p = torch.softmax(naive._scores(q, k, q_start, k_start, causal, scale), -1).nan_to_num(0.0)
    k, v = (naive._repeat_kv(t, groups) for t in (k, v))
    out = torch.einsum("bhmn,bnhd->bmhd", p, v)
    delta = torch.einsum("bmhd,bmhd->bhm", do, out)
    ds = p * (torch.einsum("bmhd,bnhd->bhmn", do.abs(), v.abs()) + delta.abs()[..., None])

    def per_kv_head(t):  # [B, N, H, d] -> [B, N, Hkv, d]: GQA gradients sum over the group
        return t.unflatten(2, (-1, groups)).sum(3)

    return (
        torch.einsum("bhmn,bnhd->bmhd", p, v.abs()),
        scale * torch.einsum("bhmn,bnhd->bmhd", ds, k.abs()),
        per_kv_head(scale * torch.einsum("bhmn,bmhd->bnhd", ds, q.abs())),
        per_kv_head(torch.einsum("bhmn,bmhd->bnhd", p, do.abs())),
    )


def assert_close_to_reference(q, k, v, do, causal, backend, deterministic=None):
    """Check output and (dq, dk, dv) of ``fpdt_kernels.flash_attention`` against float64
    (``deterministic``: which Triton backward, as ``flash_attention`` takes it)."""
    ref = _fwd_bwd(naive.flash_attention, *(t.double() for t in (q, k, v, do)), causal)
    torch_same_dtype = _fwd_bwd(naive.flash_attention, q, k, v, do, causal)
    ours_fn = functools.partial(fpdt_kernels.flash_attention, deterministic=deterministic)
    with fpdt_kernels.use_backend(backend):
        ours = _fwd_bwd(ours_fn, q, k, v, do, causal)
    tf32x3 = q.is_cuda and q.dtype == torch.float32 and backend == "triton"
    magnitudes = gradient_magnitudes(q, k, v, do, causal) if tf32x3 else (0.0,) * 4
    for name, o, p, r, factor, mag in zip(
        ("out", "dq", "dk", "dv"), ours, torch_same_dtype, ref, (2, 3, 3, 3), magnitudes, strict=True
    ):
        assert o.dtype == q.dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name} has NaN/inf"
        # Floor: the dtype's rounding at the reference's magnitude, plus a tiny absolute term for
        # gradients that are exactly 0 analytically (e.g. a softmax over one key).
        floor = 2 * _rounding(q.dtype) * max(1.0, r.abs().max().item()) + _ABS_FLOOR[q.dtype]
        if tf32x3 and name != "out":
            # The backward recomputes P = exp2(s - lse) with the GPU's approximate exp2/log2 (a
            # few ulp, growing with the logit) where the reference's P is exact; in fp32 that is
            # not hidden under input rounding. Seen on an H200: dv 2.8e-5 vs 1.2e-5 allowed with
            # Sk=1 (every P is 1, so each row's P error adds up): allow ~2e-6 of the largest value.
            floor += 64 * _rounding(q.dtype) * r.abs().max().item()
        # GPU fp32 dots run tf32x3 (FPDT_FP32_PRECISION): each element may also be off by the
        # products' rounding times the size of the terms it sums (seen on an H200 with Sk=1: dk
        # off by 1.02e-5 where it is exactly 0; with FPDT_FP32_PRECISION=ieee it passed).
        err = ((o.double() - r).abs() - TF32X3_EPS * mag).max().item()
        err_pt = (p.double() - r).abs().max().item()
        assert err <= factor * err_pt + floor, f"{name}: error {err:.3e} > {factor} x {err_pt:.3e} + {floor:.1e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradient_magnitudes_bound_the_reference(causal):
    """Each magnitude sums the absolute values of the terms of its element, so it bounds it."""
    q, k, v, do = (t.double() for t in _make((17, 63, 40, 4, 2), torch.float32))
    ref = _fwd_bwd(naive.flash_attention, q, k, v, do, causal)
    for r, mag in zip(ref, gradient_magnitudes(q, k, v, do, causal), strict=True):
        assert mag.shape == r.shape
        assert (r.abs() <= mag + 1e-12).all()
        assert mag.max() < 100 * r.abs().max()  # the same scale, not an arbitrary loosening


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_flash_attention_matches_reference(shape, causal, dtype, backend):
    if DEVICE == "cuda" and backend == "torch":
        pytest.skip("the torch backend's fast path is the CPU flash kernel; on CUDA it is the naive math")
    q, k, v, do = _make(shape, dtype)
    assert_close_to_reference(q, k, v, do, causal, backend)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(17, 63, 40, 4, 2), (113, 113, 64, 4, 4), (113, 1, 64, 4, 2)], ids=_ids)
def test_fused_backward_matches_reference(shape, causal):
    """The fused backward (``deterministic=False``): dK, dV and dQ by one kernel, dQ by atomics.
    (Every other reference test runs the default, split, backward.)"""
    q, k, v, do = _make(shape, torch.float32)
    assert_close_to_reference(q, k, v, do, causal, "triton", deterministic=False)


def test_deterministic_switch_selects_the_backward(monkeypatch):
    """Split unless asked: ``deterministic=False`` selects the fused kernel, for
    ``flash_attention`` and the chunk backward alike; None (the default) and True the split ones."""
    from fpdt_kernels.attention import triton_bwd

    fused = []
    real = triton_bwd.backward_launches
    monkeypatch.setattr(triton_bwd, "backward_launches", lambda *a, **kw: fused.append(kw["fused"]) or real(*a, **kw))
    q, k, v, do = _make((17, 20, 16, 2, 1), torch.float32, batch=1)
    kw = dict(q_start=0, k_start=0, causal=True)
    with fpdt_kernels.use_backend("triton"):
        for deterministic in (None, True, False):
            _fwd_bwd(functools.partial(fpdt_kernels.flash_attention, deterministic=deterministic), q, k, v, do, True)
            out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, **kw)
            fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **kw, deterministic=deterministic)
    assert fused == [False, False, False, False, True, True]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "split"])
def test_chunk_backward_accumulates_at_offsets(deterministic):
    """Both backwards add into running fp32 buffers (as FPDT's pipeline calls them), GQA, at offsets."""
    q, k, v, do = _make((45, 70, 40, 4, 2), torch.float32, batch=1)
    kw = dict(q_start=30, k_start=3, causal=True)
    ref_out, ref_lse = naive.attention_chunk_forward(q.double(), k.double(), v.double(), **kw)
    ref = naive.attention_chunk_backward(do.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, **kw)
    with fpdt_kernels.use_backend("triton"):
        out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, **kw)
        grads = [torch.full(t.shape, 0.5, device=t.device) for t in (q, k, v)]  # running sums
        fpdt_kernels.attention_chunk_backward(
            do, q, k, v, out, lse, **kw, dq=grads[0], dk=grads[1], dv=grads[2], deterministic=deterministic
        )
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g.double(), r + 0.5, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("deterministic", [True, False], ids=["split", "fused"])
def test_launches_past_the_grid_limit_run_over_batch_slices(monkeypatch, deterministic):
    """CUDA caps a grid's second axis, where every kernel puts (batch, head) pairs, at 65535
    blocks: a launch with more runs over slices of the batch (B=4096 and H=16 would not launch).
    With the cap at 9 and H=4, batch 3 runs as slices of 2 and 1: bit for bit what one launch
    gives, for flash_attention and for packed documents accumulated at offsets."""
    from fpdt_kernels.attention import triton_common

    q, k, v, do = _make((21, 29, 16, 4, 2), torch.float32, batch=3)
    cu = torch.tensor([0, 10, 29, 40, 58, 70, 87], dtype=torch.int32, device=q.device)  # rows of S=29
    kw = dict(q_start=8, k_start=0, causal=True)

    def run_all():
        whole = _fwd_bwd(
            functools.partial(fpdt_kernels.flash_attention, deterministic=deterministic), q, k, v, do, True
        )
        out = torch.full(q.shape, 0.25, device=q.device)
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], device=q.device)
        fpdt_kernels.attention_chunk_forward(q, k, v, **kw, out=out, lse=lse, cu_seqlens=cu)
        grads = fpdt_kernels.attention_chunk_backward(
            do, q, k, v, out, lse, **kw, cu_seqlens=cu, deterministic=deterministic
        )
        return [*whole, out, lse, *grads]

    with fpdt_kernels.use_backend("triton"):
        want = run_all()
        slices = []
        real = triton_common.batch_slices
        monkeypatch.setattr(triton_common, "MAX_GRID_Y", 9)
        monkeypatch.setattr(triton_common, "batch_slices", lambda launch: slices.append(real(launch)) or slices[-1])
        got = run_all()
        assert slices and all([part.args["Q" if "Q" in part.args else "Out"].shape[0] for part in parts] == [2, 1]
                              for parts in slices)  # fmt: skip
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
        monkeypatch.setattr(triton_common, "MAX_GRID_Y", 3)
        with pytest.raises(ValueError, match="4 query heads exceed the 3 a CUDA grid dimension holds"):
            fpdt_kernels.flash_attention(q, k, v)


@pytest.fixture
def split_dkdv(monkeypatch):
    """The dK/dV kernel runs its split variant (dV and dK by separate programs) in one small tile:
    autotune picks it only on sm_90 at d=256, so the interpreter would never run it otherwise."""
    from fpdt_kernels.attention import triton_bwd
    from fpdt_kernels.attention.triton_common import tile

    monkeypatch.setattr(triton_bwd._dkdv_kernel, "configs", [tile(16, 32, 4, 2, SPLIT=True, TMA=False, WS=False)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(17, 63, 40, 4, 2), (63, 17, 111, 4, 1), (113, 113, 64, 4, 4)], ids=_ids)
def test_split_dkdv_matches_reference(shape, causal, dtype, split_dkdv):
    q, k, v, do = _make(shape, dtype)
    assert_close_to_reference(q, k, v, do, causal, "triton")


def test_split_dkdv_accumulates_at_offsets(split_dkdv):
    """The chunk API (fp32 accumulators, atomics) through the split variant, at global offsets."""
    q, k, v, do = _make((45, 70, 40, 4, 2), torch.float32)
    kw = dict(q_start=30, k_start=3, causal=True)
    ref_out, ref_lse = naive.attention_chunk_forward(q.double(), k.double(), v.double(), **kw)
    ref = naive.attention_chunk_backward(do.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, **kw)
    with fpdt_kernels.use_backend("triton"):
        out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, **kw)
        grads = fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **kw)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_through_interpreter_upcast(causal):
    # The interpreter multiplies raw bf16 bits in tl.dot; the kernels upcast there. Check it.
    q, k, v, do = _make((63, 113, 40, 4, 2), torch.bfloat16)
    assert_close_to_reference(q, k, v, do, causal, "triton")


def _split_points(n, cuts):
    pts = sorted({0, n, *[c for c in cuts if 0 < c < n]})
    return list(zip(pts[:-1], pts[1:], strict=False))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "causal,q_offset", [(False, 0), (True, 0), (True, 37)], ids=["full", "causal", "causal-shifted"]
)
def test_chunked_equals_unchunked(backend, causal, q_offset):
    """Splitting Q and K/V at arbitrary points and accumulating blocks gives the whole result."""
    sq, sk, d, h, hkv = 150, 187, 40, 4, 2
    q, k, v, do = _make((sq, sk, d, h, hkv), torch.float32, batch=1)
    q_cuts, k_cuts = _split_points(sq, [33, 64, 65, 149]), _split_points(sk, [1, 50, 128])
    with fpdt_kernels.use_backend(backend):
        whole_out, whole_lse = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=q_offset, k_start=0, causal=causal)
        whole = fpdt_kernels.attention_chunk_backward(
            do, q, k, v, whole_out, whole_lse, q_start=q_offset, k_start=0, causal=causal
        )
        out = torch.zeros(whole_out.shape, device=q.device)
        lse = torch.full(whole_lse.shape, float("-inf"), device=q.device)
        for a, b in q_cuts:
            for c, e in k_cuts:
                fpdt_kernels.attention_chunk_forward(
                    q[:, a:b], k[:, c:e], v[:, c:e], q_start=q_offset + a, k_start=c, causal=causal,
                    out=out[:, a:b], lse=lse[:, :, a:b],
                )  # fmt: skip
        dq, dk, dv = (torch.zeros(t.shape, device=q.device) for t in (q, k, v))
        for c, e in k_cuts:
            for a, b in q_cuts:
                fpdt_kernels.attention_chunk_backward(
                    do[:, a:b], q[:, a:b], k[:, c:e], v[:, c:e], out[:, a:b], lse[:, :, a:b],
                    q_start=q_offset + a, k_start=c, causal=causal,
                    dq=dq[:, a:b], dk=dk[:, c:e], dv=dv[:, c:e],
                )  # fmt: skip
    torch.testing.assert_close(out, whole_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-5, atol=1e-5)
    # On a GPU both sides run tf32x3 dots, in other tiles and orders: each may be off by the
    # products' rounding times the size of the terms an element sums (gradient_magnitudes).
    tf32x3 = q.is_cuda and backend == "triton"
    magnitudes = gradient_magnitudes(q, k, v, do, causal, q_offset)[1:] if tf32x3 else (0.0,) * 3
    for name, got, want, mag in zip(("dq", "dk", "dv"), (dq, dk, dv), whole, magnitudes, strict=True):
        excess = (got.double() - want).abs() - (1e-5 + 1e-4 * want.double().abs() + 2 * TF32X3_EPS * mag)
        worst = excess.argmax()
        assert excess.max() <= 0, (
            f"{name}: chunked {got.flatten()[worst]:.6e} vs whole {want.flatten()[worst]:.6e} at flat index "
            f"{worst.item()} of shape {tuple(got.shape)}: {excess.max():.3e} over the allowance"
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunk_api_matches_reference_at_offsets(backend):
    """A causal block whose diagonal cuts through it, at global offsets, in float64 terms."""
    q, k, v, do = _make((70, 90, 64, 4, 1), torch.float32, batch=1)
    kw = dict(q_start=1000, k_start=980, causal=True)
    ref_out, ref_lse = naive.attention_chunk_forward(q.double(), k.double(), v.double(), **kw)
    ref_grads = naive.attention_chunk_backward(do.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, **kw)
    with fpdt_kernels.use_backend(backend):
        out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, **kw)
        grads = fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **kw)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def test_triton_forward_overwrites_nan_poisoned_buffers(nan_buffer):
    from fpdt_kernels.attention import triton_fwd

    q, k, v, _ = _make((113, 63, 111, 4, 2), torch.float32)
    out = nan_buffer(q.shape, torch.float32, q.device)
    lse = nan_buffer((q.shape[0], q.shape[2], q.shape[1]), torch.float32, q.device)
    triton_fwd.chunk_forward(q, k, v, 10, 0, True, 111**-0.5, out, lse, accumulate=False)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref_out, ref_lse = naive.attention_chunk_forward(q, k, v, q_start=10, k_start=0, causal=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_views_never_read_outside(backend):
    """Inputs are views into NaN-filled storage (padded heads and rows): nothing leaks."""
    B, S, H, Hkv, d = 2, 45, 4, 2, 40
    base_q = torch.full((B, S + 3, H + 2, d), float("nan"), device=DEVICE)
    base_kv = torch.full((B, S + 5, 2, Hkv + 1, d), float("nan"), device=DEVICE)
    q = base_q[:, 1 : S + 1, 1 : H + 1]
    k, v = base_kv[:, 2 : S + 2, 0, :Hkv], base_kv[:, 2 : S + 2, 1, :Hkv]
    q.copy_(torch.randn(q.shape))
    k.copy_(torch.randn(k.shape))
    v.copy_(torch.randn(v.shape))
    assert not q.is_contiguous() and not k.is_contiguous()
    do = torch.randn(q.shape, device=DEVICE)
    with fpdt_kernels.use_backend(backend):
        got = _fwd_bwd(fpdt_kernels.flash_attention, q, k, v, do, True)
    want = _fwd_bwd(naive.flash_attention, q.contiguous(), k.contiguous(), v.contiguous(), do, True)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_that_see_no_key_are_zero(backend):
    # Causal, Sq > Sk, bottom-right aligned: the first Sq - Sk query rows see no key.
    q, k, v, do = _make((90, 30, 64, 4, 2), torch.float32)
    with fpdt_kernels.use_backend(backend):
        out, dq, dk, dv = _fwd_bwd(fpdt_kernels.flash_attention, q, k, v, do, True)
        blk_out, blk_lse = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=0, k_start=60, causal=True)
        grads = fpdt_kernels.attention_chunk_backward(do, q, k, v, blk_out, blk_lse, q_start=0, k_start=60, causal=True)
    for t in (out, dq, dk, dv, blk_out, *grads):
        assert not torch.isnan(t).any()
    assert (out[:, :60] == 0).all() and (dq[:, :60] == 0).all()
    assert (blk_out[:, :60] == 0).all() and (grads[0][:, :60] == 0).all()
    assert torch.isneginf(blk_lse[:, :, :60]).all() and torch.isfinite(blk_lse[:, :, 60:]).all()
    # A block entirely above the diagonal contributes nothing and leaves accumulators untouched.
    with fpdt_kernels.use_backend(backend):
        o2, l2 = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=0, k_start=500, causal=True)
    assert (o2 == 0).all() and torch.isneginf(l2).all()


def test_merge_attention_is_safe_with_minus_inf():
    q, k, v, _ = _make((40, 60, 16, 4, 4), torch.float32)
    whole = naive.attention_chunk_forward(q, k, v, q_start=0, k_start=0, causal=False)
    a = naive.attention_chunk_forward(q, k[:, :25], v[:, :25], q_start=0, k_start=0, causal=False)
    b = naive.attention_chunk_forward(q, k[:, 25:], v[:, 25:], q_start=0, k_start=25, causal=False)
    out, lse = fpdt_kernels.merge_attention(*a, *b)
    torch.testing.assert_close(out, whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, whole[1], rtol=1e-5, atol=1e-6)
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    out2, lse2 = fpdt_kernels.merge_attention(empty_out, empty_lse, out, lse)
    torch.testing.assert_close(out2, out)
    out3, lse3 = fpdt_kernels.merge_attention(empty_out, empty_lse, empty_out, empty_lse)
    assert (out3 == 0).all() and torch.isneginf(lse3).all()


def test_torch_backend_pieces_cover_each_visible_key_once():
    for sq, sk, q_start, k_start in [(5, 7, 0, 0), (5, 7, 3, 0), (5, 7, 0, 3), (5, 7, 20, 0), (1, 4, 2, 0)]:
        mask = naive.visibility_mask(sq, sk, q_start, k_start, True)
        covered = torch.zeros(sq, sk, dtype=torch.int64)
        for rows, keys, top_left in torch_cpu._pieces(sq, sk, q_start, k_start, True):
            piece = torch.ones(rows.stop - rows.start, keys.stop - keys.start, dtype=torch.int64)
            if top_left:
                piece = piece.tril()
            covered[rows, keys] += piece
        assert torch.equal(covered, mask.long()), (sq, sk, q_start, k_start)


# ---------------------------------------------------------------------------- bad input


def _good():
    return _make((8, 8, 16, 4, 2), torch.float32, batch=1)[:3]


@pytest.mark.parametrize(
    "make_bad, error, match",
    [
        (lambda q, k, v: (q[:1].expand(2, -1, -1, -1), k, v), ValueError, "batch sizes differ"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "head dims differ"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of key/value heads"),
        (lambda q, k, v: (q, k, v.double()), TypeError, "share one dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "not supported"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, "same shape"),
        (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
        (
            lambda q, k, v: tuple(torch.zeros(1, 4, 2, 300) for _ in range(3)),
            ValueError,
            "head dim d=300",
        ),
        (lambda q, k, v: (q.to("meta"), k, v), ValueError, "one device"),
    ],
    ids=["batch", "head-dim", "gqa", "dtype-mix", "int-dtype", "kv-shape", "rank", "d>256", "device"],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_raises(make_bad, error, match, backend):
    q, k, v = make_bad(*_good())
    with fpdt_kernels.use_backend(backend), pytest.raises(error, match=match):
        fpdt_kernels.flash_attention(q, k, v)


def test_bad_accumulators_raise():
    q, k, v = _good()
    out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=0, k_start=0, causal=True)
    with pytest.raises(ValueError, match="both out and lse"):
        fpdt_kernels.attention_chunk_forward(q, k, v, q_start=0, k_start=0, causal=True, out=out)
    with pytest.raises(TypeError, match="float32 accumulator"):
        fpdt_kernels.attention_chunk_forward(q, k, v, q_start=0, k_start=0, causal=True, out=out.half(), lse=lse)
    with pytest.raises(ValueError, match="must have shape"):
        fpdt_kernels.attention_chunk_forward(q, k, v, q_start=0, k_start=0, causal=True, out=out, lse=lse[:, :, :3])
    with pytest.raises(ValueError, match="must have shape"):
        fpdt_kernels.attention_chunk_backward(
            q, q, k, v, out, lse, q_start=0, k_start=0, causal=True, dk=torch.zeros(1, 8, 4, 16)
        )


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        fpdt_kernels.set_backend("cuda-magic")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fpdt_kernels.resolve_backend(cpu) == "torch"
    with fpdt_kernels.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fpdt_kernels.resolve_backend(cpu)
    monkeypatch.setenv("FPDT_ATTENTION_BACKEND", "naive")
    assert fpdt_kernels.resolve_backend(cpu) == "naive"
    with fpdt_kernels.use_backend("torch"):
        assert fpdt_kernels.resolve_backend(cpu) == "torch"
        assert fpdt_kernels.resolve_backend(torch.device("cuda")) == "naive"  # CPU kernel only
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FPDT_ATTENTION_BACKEND")
    assert fpdt_kernels.resolve_backend(cpu) == "triton"
    assert fpdt_kernels.resolve_backend(torch.device("cuda")) == "triton"


def test_resolve_backend_takes_a_tensor_or_a_device():
    t = torch.zeros(1)
    for where in (t, t.device, "cpu"):
        with fpdt_kernels.use_backend("torch"):
            assert fpdt_kernels.resolve_backend(where) == "torch"
    with pytest.raises(TypeError, match="tensor or a torch.device"):
        fpdt_kernels.resolve_backend(3)


@pytest.mark.parametrize(
    "triton_version, numpy_version, runs",
    [("3.6.0", "2.4.1", False), ("3.5.1+git12ab", "2.4.0", False), ("3.6.0", "2.3.5", True), ("3.7.0", "2.4.1", True)],
)
def test_an_interpreter_that_cannot_run_beside_this_numpy_is_named(monkeypatch, triton_version, numpy_version, runs):
    """Triton <= 3.6's interpreter calls ``int()`` on one-element arrays, which NumPy 2.4 refuses:
    the check names the pair and the fix instead of a kernel failing inside its loop bound."""
    import numpy
    import triton

    from fpdt_kernels import backend

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if runs:
        backend.check_interpreter_runs()
    else:
        with pytest.raises(RuntimeError, match=rf"Triton {re.escape(triton_version)}'s .* Install 'numpy<2.4'"):
            backend.check_interpreter_runs()


def test_a_cpu_triton_call_on_an_interpreter_that_cannot_run_says_why():
    """The check runs where every interpreted launch starts (the kernels' module import), so an
    eager call and a compiled one both raise it."""
    import subprocess
    import sys

    code = (
        "import numpy, torch, triton\n"
        "numpy.__version__, triton.__version__ = '2.4.0', '3.6.0'\n"
        "import fpdt_kernels\n"
        "q = torch.randn(1, 4, 2, 16)\n"
        "for f in (fpdt_kernels.flash_attention, torch.compile(fpdt_kernels.flash_attention, backend='eager')):\n"
        "    try:\n"
        "        f(q, q, q)\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "FPDT_ATTENTION_BACKEND": "triton"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in run.stdout.splitlines() if "Install 'numpy<2.4'" in line]
    assert len(lines) == 2 and lines[0].startswith("RuntimeError"), run.stdout + run.stderr[-2000:]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_scale_zero_is_not_the_default(backend):
    # Scale 0: every visible key gets the same weight, so the output is the mean of v.
    q, k, v, _ = _make((5, 7, 16, 4, 4), torch.float32, batch=1)
    with fpdt_kernels.use_backend(backend):
        out = fpdt_kernels.flash_attention(q, k, v, softmax_scale=0.0)
    torch.testing.assert_close(out, v.mean(1, keepdim=True).expand_as(out), rtol=1e-5, atol=1e-5)


def test_kernels_package_is_standalone():
    """``fpdt_kernels`` imports nothing from the rest of the codebase (users copy it alone)."""
    import subprocess
    import sys

    code = (
        "import sys, fpdt_kernels; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('parallel', 'models', 'experiments')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- GPU


GPU_SHAPES = SHAPES + [(1024, 1024, 128, 8, 2), (4096, 4096, 64, 4, 4), (333, 4096, 128, 4, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_ids)
def test_gpu_flash_attention_matches_reference(shape, causal, dtype):
    q, k, v, do = _make(shape, dtype, device="cuda")
    assert_close_to_reference(q, k, v, do, causal, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("causal,q_offset", [(False, 0), (True, 0), (True, 37)], ids=["full", "causal", "shifted"])
def test_gpu_chunked_equals_unchunked(causal, q_offset):
    test_chunked_equals_unchunked("triton", causal, q_offset)
