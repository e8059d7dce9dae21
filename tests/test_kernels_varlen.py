"""Packed documents: ``flash_attention_varlen`` and the chunk ops' ``cu_seqlens`` against float64.

The oracle is the ``naive`` backend in float64 (per document for varlen, a dense same-document
mask for the chunk ops); tolerances follow ``test_attention``'s rule (2x the output error, 3x the
gradient error of PyTorch in the input dtype, plus the dtype's rounding floor). Without CUDA the
``triton`` backend runs in the interpreter, where tiles are 32x32: the shapes below are small and
their documents cross tile boundaries at odd places.
"""

import functools

import pytest
import torch
import triton
import triton.language as tl
from test_attention import _ABS_FLOOR, _rounding

import fpdt_kernels
from fpdt_kernels import naive
from fpdt_kernels.attention import documents
from fpdt_kernels.attention.triton_common import span_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_BACKENDS = ["triton", "torch"]

# (query lengths, key lengths, d, H, Hkv): odd lengths, 1-token documents, Sq != Sk both ways
# (causal rows that see no key), empty documents on either side, MHA/GQA/MQA, odd head dims.
VARLEN_CASES = {
    "odd-gqa": ([1, 17, 63, 113], [1, 17, 63, 113], 40, 4, 2),
    "sq!=sk-mqa": ([17, 1, 63, 30], [63, 17, 1, 45], 64, 4, 1),
    "empty-mha": ([5, 0, 40, 9], [0, 7, 33, 9], 111, 2, 2),
}


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _randn(*shape, dtype, device=DEVICE, g):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _varlen_inputs(case, dtype, device=DEVICE, seed=0):
    lq, lk, d, h, hkv = case
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lq), sum(lk)
    q, do = _randn(tq, h, d, dtype=dtype, device=device, g=g), _randn(tq, h, d, dtype=dtype, device=device, g=g)
    k, v = (_randn(tk, hkv, d, dtype=dtype, device=device, g=g) for _ in range(2))
    return q, k, v, do, _cu(lq), _cu(lk), max(lq), max(lk)


def _floor(r, dtype, cuda, grad):
    floor = 2 * _rounding(dtype) * max(1.0, r.abs().max().item()) + _ABS_FLOOR[dtype]
    if cuda and dtype == torch.float32 and grad:  # approximate exp2 in the recomputed P (test_attention)
        floor += 64 * _rounding(dtype) * r.abs().max().item()
    return floor


def _assert_rule(ours, same_dtype, ref, dtype, cuda):
    """Output within 2x, gradients within 3x the error of the same math in the input dtype."""
    for name, o, p, r, factor in zip(("out", "dq", "dk", "dv"), ours, same_dtype, ref, (2, 3, 3, 3), strict=True):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name} has NaN/inf"
        err = (o.double() - r).abs().max().item() if r.numel() else 0.0
        err_pt = (p.double() - r).abs().max().item() if r.numel() else 0.0
        floor = _floor(r, dtype, cuda, name != "out")
        assert err <= factor * err_pt + floor, f"{name}: error {err:.3e} > {factor} x {err_pt:.3e} + {floor:.1e}"


def _varlen_fwd_bwd(fn, q, k, v, do, cu_q, cu_k, max_q, max_k, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _check_varlen(case, causal, dtype, backend, device=DEVICE, deterministic=None):
    q, k, v, do, *docs = _varlen_inputs(case, dtype, device)
    ref = _varlen_fwd_bwd(naive.flash_attention_varlen, *(t.double() for t in (q, k, v, do)), *docs, causal)
    same_dtype = _varlen_fwd_bwd(naive.flash_attention_varlen, q, k, v, do, *docs, causal)
    ours_fn = functools.partial(fpdt_kernels.flash_attention_varlen, deterministic=deterministic)
    with fpdt_kernels.use_backend(backend):
        ours = _varlen_fwd_bwd(ours_fn, q, k, v, do, *docs, causal)
    _assert_rule(ours, same_dtype, ref, dtype, q.is_cuda)
    return ours


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", VARLEN_CASES.values(), ids=VARLEN_CASES.keys())
def test_varlen_fused_backward_matches_reference(case, causal):
    """Packed documents through the fused backward (the document spans bound its query loop)."""
    _check_varlen(case, causal, torch.float32, "triton", deterministic=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", VARLEN_CASES.values(), ids=VARLEN_CASES.keys())
def test_varlen_matches_reference(case, causal, dtype, backend):
    if DEVICE == "cuda" and backend == "torch":
        pytest.skip("the torch backend's fast path is the CPU flash kernel; on CUDA it is the naive math")
    out, dq, dk, dv = _check_varlen(case, causal, dtype, backend)
    lq, lk = case[:2]
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    for i in range(len(lq)):
        if lk[i] == 0:  # a document without keys: its rows output 0 and get no gradient
            assert (out[cq[i] : cq[i + 1]] == 0).all() and (dq[cq[i] : cq[i + 1]] == 0).all()
        if lq[i] == 0:  # a document without queries: its keys get no gradient
            assert (dk[ck[i] : ck[i + 1]] == 0).all() and (dv[ck[i] : ck[i + 1]] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_bf16_through_interpreter_upcast(causal):
    _check_varlen(VARLEN_CASES["sq!=sk-mqa"], causal, torch.bfloat16, "triton")


def test_naive_backend_is_the_reference():
    q, k, v, do, *docs = _varlen_inputs(VARLEN_CASES["odd-gqa"], torch.float64)
    with fpdt_kernels.use_backend("naive"):
        got = _varlen_fwd_bwd(fpdt_kernels.flash_attention_varlen, q, k, v, do, *docs, True)
    want = _varlen_fwd_bwd(naive.flash_attention_varlen, q, k, v, do, *docs, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------------------- chunk API

# B=2 rows of S=96 over the flattened tokens: row 0 holds documents of 5, 12, 1 and 78 tokens,
# row 1 documents of 12, 63 and 21.
S = 96
CU = torch.tensor([0, 5, 17, 18, 96, 108, 171, 192], dtype=torch.int32)


def _chunk_inputs(sq, sk, d=40, h=4, hkv=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, do = (_randn(2, sq, h, d, dtype=dtype, g=g) for _ in range(2))
    k, v = (_randn(2, sk, hkv, d, dtype=dtype, g=g) for _ in range(2))
    return q, k, v, do


def test_spans_match_the_dense_mask():
    """Row spans and key spans describe the same mask as the reference's document mask."""
    cu = CU.to(DEVICE)
    for q_start, sq, k_start, sk, causal in [(0, 96, 0, 96, True), (10, 50, 3, 70, False), (40, 56, 0, 40, True),
                                             (17, 1, 17, 1, True), (60, 30, 80, 16, True)]:  # fmt: skip
        want = naive.document_mask(cu, 2, sq, sk, q_start, k_start)
        if causal:
            want = want & naive.visibility_mask(sq, sk, q_start, k_start, True, DEVICE)
        rows = documents.chunk_spans(cu, 2, q_start, sq, k_start, sk, causal, DEVICE)
        keys = documents.key_spans(rows, sk)
        m, n = torch.arange(sq, device=DEVICE)[:, None], torch.arange(sk, device=DEVICE)[None, :]
        by_rows = (n >= rows[:, 0, :, None]) & (n < rows[:, 1, :, None])
        by_keys = (m >= keys[:, 0, None, :]) & (m < keys[:, 1, None, :])
        assert torch.equal(by_rows, want) and torch.equal(by_keys, want), (q_start, sq, k_start, sk, causal)
        for spans in (rows, keys):  # non-decreasing: what lets the kernels bound their loops
            assert (spans.diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_chunk_api_matches_reference(backend, causal, deterministic=None):
    """A block cutting through documents of both rows, at global offsets, in float64 terms."""
    q, k, v, do = _chunk_inputs(45, 70)
    kw = dict(q_start=30, k_start=3, causal=causal, cu_seqlens=CU)
    ref_out, ref_lse = naive.attention_chunk_forward(q.double(), k.double(), v.double(), **kw)
    ref = naive.attention_chunk_backward(do.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, **kw)
    with fpdt_kernels.use_backend(backend):
        out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, **kw)
        grads = fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **kw, deterministic=deterministic)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_chunk_backward_with_documents(causal):
    """The fused backward adding into running fp32 buffers over document spans, at offsets."""
    test_chunk_api_matches_reference("triton", causal, deterministic=False)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_split_dkdv_with_documents(causal, monkeypatch):
    """The dK/dV kernel's split variant (dV and dK by separate programs; sm_90 at d=256 only) over
    document spans: a packed varlen batch and an accumulating block at offsets."""
    from fpdt_kernels.attention import triton_bwd
    from fpdt_kernels.attention.triton_common import tile

    monkeypatch.setattr(triton_bwd._dkdv_kernel, "configs", [tile(16, 32, 4, 2, SPLIT=True, TMA=False, WS=False)])
    _check_varlen(VARLEN_CASES["odd-gqa"], causal, torch.float32, "triton")
    test_chunk_api_matches_reference("triton", causal)


def test_naive_chunk_documents_equal_separate_documents():
    """The reference's document mask against running each document on its own (flattened rows)."""
    q, k, v, do = _chunk_inputs(S, S, dtype=torch.float64)
    out, lse = naive.attention_chunk_forward(q, k, v, q_start=0, k_start=0, causal=True, cu_seqlens=CU)
    want = naive.flash_attention_varlen(*(t.flatten(0, 1) for t in (q, k, v)), CU, CU, 78, 78, causal=True)
    torch.testing.assert_close(out.flatten(0, 1), want, rtol=1e-12, atol=1e-12)


def _visible(q_start, sq, k_start, sk, causal):
    """``[B, Sq, Sk]``: the reference's visibility of a block of the packed batch ``CU``."""
    mask = naive.document_mask(CU, 2, sq, sk, q_start, k_start)
    return mask & naive.visibility_mask(sq, sk, q_start, k_start, True) if causal else mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_chunked_documents_equal_the_whole(backend, causal):
    """Blocks at arbitrary offsets, accumulated (the FPDT loops), equal one call over the whole
    packed batch; blocks that share no document are skipped or leave the accumulators as they are."""
    q, k, v, do = _chunk_inputs(S, S, h=2, hkv=1, seed=1)
    cuts = [(0, 17), (17, 50), (50, 96)]  # 17: a document boundary in row 0; 50 cuts documents
    kw = dict(causal=causal, cu_seqlens=CU)
    with fpdt_kernels.use_backend(backend):
        whole_out, whole_lse = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=0, k_start=0, **kw)
        whole = fpdt_kernels.attention_chunk_backward(do, q, k, v, whole_out, whole_lse, q_start=0, k_start=0, **kw)
        out = torch.zeros(whole_out.shape)
        lse = torch.full(whole_lse.shape, float("-inf"))
        for a, b in cuts:
            for c, e in cuts:
                before = out[:, a:b].clone(), lse[:, :, a:b].clone()
                fpdt_kernels.attention_chunk_forward(q[:, a:b], k[:, c:e], v[:, c:e], q_start=a, k_start=c,
                                                out=out[:, a:b], lse=lse[:, :, a:b], **kw)  # fmt: skip
                # Rows that see no key of this block keep their running state bit for bit.
                unseen = ~_visible(a, b - a, c, e - c, causal).any(-1)  # [B, rows]
                assert torch.equal(out[:, a:b][unseen], before[0][unseen])
                assert torch.equal(lse[:, :, a:b].transpose(1, 2)[unseen], before[1].transpose(1, 2)[unseen])
        dq, dk, dv = (torch.zeros(t.shape) for t in (q, k, v))
        for c, e in cuts:
            for a, b in cuts:
                fpdt_kernels.attention_chunk_backward(do[:, a:b], q[:, a:b], k[:, c:e], v[:, c:e], out[:, a:b],
                                                 lse[:, :, a:b], q_start=a, k_start=c, dq=dq[:, a:b],
                                                 dk=dk[:, c:e], dv=dv[:, c:e], **kw)  # fmt: skip
    torch.testing.assert_close(out, whole_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-5, atol=1e-5)
    for got, want in zip((dq, dk, dv), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    flat = fpdt_kernels.flash_attention_varlen(*(t.flatten(0, 1) for t in (q, k, v)), CU, CU, 78, 78, causal=causal)
    torch.testing.assert_close(whole_out.flatten(0, 1), flat, rtol=1e-5, atol=1e-5)


def test_triton_writes_nan_poisoned_buffers(nan_buffer):
    """Every element of the forward's output/LSE and of the backward's written gradients is
    written, rows that see no key included (out 0, lse -inf, dq 0) and keys no row sees (dk 0)."""
    from fpdt_kernels.attention import triton_bwd, triton_fwd

    q, k, v, do = _chunk_inputs(45, 70)
    kw = dict(q_start=10, k_start=20, causal=True)  # rows 10-19 of row 0 see no key at or after 20
    rows = documents.chunk_spans(CU, 2, 10, 45, 20, 70, True, q.device)
    out = nan_buffer(q.shape, torch.float32, q.device)
    lse = nan_buffer((2, 4, 45), torch.float32, q.device)
    triton_fwd.chunk_forward(q, k, v, 10, 20, True, 40**-0.5, out, lse, False, rows)
    ref_out, ref_lse = naive.attention_chunk_forward(q, k, v, **kw, cu_seqlens=CU)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[0, :, :8]).all() and (out[0, :8] == 0).all()
    # MHA, no accumulation: the backward stores every gradient element.
    q, k, v, do = _chunk_inputs(45, 70, h=2, hkv=2)
    out, lse = naive.attention_chunk_forward(q, k, v, **kw, cu_seqlens=CU)
    grads = [nan_buffer(t.shape, torch.float32, q.device) for t in (q, k, v)]
    spans = (rows, documents.key_spans(rows, 70))
    launches = triton_bwd.backward_launches(do, q, k, v, out, lse, None, 10, 20, True, 40**-0.5, *grads, False, spans)
    triton_bwd._run(launches, q)
    ref = naive.attention_chunk_backward(do, q, k, v, out, lse, **kw, cu_seqlens=CU)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert (grads[0][0, :8] == 0).all()  # rows that see no key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiles_outside_the_documents_are_never_read(backend):
    """K/V (forward, dQ) and Q/dO (dK/dV) in tiles whose documents the block does not share are
    NaN: a tile that were loaded and masked would still put 0 * NaN into the result."""
    cu = torch.tensor([0, 64, 160], dtype=torch.int32)  # documents of 64 and 96: whole 32-tiles
    q, k, v, do = _chunk_inputs(160, 160, h=2, hkv=1, seed=2)
    q, k, v, do = q[:1], k[:1], v[:1], do[:1]
    kw = dict(q_start=0, k_start=0, causal=False, cu_seqlens=cu)
    want_out, want_lse = naive.attention_chunk_forward(q, k, v, **kw)
    want = naive.attention_chunk_backward(do, q, k, v, want_out, want_lse, **kw)
    # Rows of document 1 against every key, keys of document 0 poisoned.
    kp, vp = k.clone(), v.clone()
    kp[:, :64], vp[:, :64] = float("nan"), float("nan")
    with fpdt_kernels.use_backend(backend):
        out, lse = fpdt_kernels.attention_chunk_forward(q[:, 64:], kp, vp, **dict(kw, q_start=64))
        dq, _, _ = fpdt_kernels.attention_chunk_backward(
            do[:, 64:], q[:, 64:], kp, vp, out, lse, **dict(kw, q_start=64)
        )
    torch.testing.assert_close(out, want_out[:, 64:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, want[0][:, 64:], rtol=1e-4, atol=1e-5)
    # Keys of document 1 against every row, rows of document 0 poisoned.
    qp, dop = q.clone(), do.clone()
    qp[:, :64], dop[:, :64] = float("nan"), float("nan")
    with fpdt_kernels.use_backend(backend):
        _, dk, dv = fpdt_kernels.attention_chunk_backward(dop, qp, k[:, 64:], v[:, 64:], want_out, want_lse,
                                                     **dict(kw, k_start=64))  # fmt: skip
    torch.testing.assert_close(dk, want[1][:, 64:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dv, want[2][:, 64:], rtol=1e-4, atol=1e-5)


@triton.jit
def _span_blocks_kernel(Ranges, Out, BLOCK: tl.constexpr):
    got = span_blocks(tl.load(Ranges), tl.load(Ranges + 1), tl.load(Ranges + 2), tl.load(Ranges + 3), BLOCK)
    for i in tl.static_range(5):
        tl.store(Out + i, got[i])


def test_span_blocks_visits_only_visible_tiles():
    """The loop ranges the kernels run: ``(start, f0, f1, n_head, n_masked)`` for 32-tiles."""
    for v_lo, v_hi, f_lo, f_hi, want in [
        (0, 96, 0, 96, (0, 0, 96, 0, 0)),  # every tile unmasked
        (5, 90, 40, 70, (0, 0, 0, 0, 3)),  # no whole tile inside [40, 70): tiles 0, 32, 64 masked
        (33, 130, 33, 130, (32, 64, 128, 1, 2)),  # masked 32 and 128 around unmasked 64, 96
        (40, 40, 40, 40, (32, 32, 32, 0, 0)),  # nothing visible: nothing visited
    ]:
        got = torch.zeros(5, dtype=torch.int32, device=DEVICE)
        ranges = torch.tensor([v_lo, v_hi, f_lo, f_hi], dtype=torch.int32, device=DEVICE)
        _span_blocks_kernel[(1,)](ranges, got, BLOCK=32)
        assert tuple(got.tolist()) == want, (v_lo, v_hi, f_lo, f_hi)


# ---------------------------------------------------------------------------- bad input


def _bad_varlen(**change):
    q, k, v, _, cu_q, cu_k, mq, mk = _varlen_inputs(VARLEN_CASES["odd-gqa"], torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)
    args.update({name: f(args[name]) for name, f in change.items()})
    return args


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(cu_seqlens_q=lambda c: c.long()), TypeError, "int32"),
        (dict(cu_seqlens_k=lambda c: c.tolist()), TypeError, "torch.Tensor"),
        (dict(cu_seqlens_q=lambda c: c.flip(0)), ValueError, "start at 0"),
        (dict(cu_seqlens_q=lambda c: torch.tensor([0, 20, 18, 81, 194], dtype=torch.int32)), ValueError, "decrease"),
        (dict(cu_seqlens_k=lambda c: c[:-1]), ValueError, "same documents"),
        (dict(cu_seqlens_q=lambda c: c - torch.tensor([0, 0, 0, 0, 1], dtype=torch.int32)), ValueError, "end at"),
        (dict(cu_seqlens_q=lambda c: c[:1], cu_seqlens_k=lambda c: c[:1]), ValueError, "n_docs >= 1"),
        (dict(max_seqlen_k=lambda m: m - 1), ValueError, "longest document"),
        (dict(max_seqlen_q=lambda m: float(m)), TypeError, "must be an int"),
        (dict(q=lambda q: q[None]), ValueError, "3-D"),
        (dict(q=lambda q: q[:, :3]), ValueError, "multiple of key/value heads"),
        (dict(v=lambda v: v.double()), TypeError, "share one dtype"),
    ],
    ids=["dtype", "list", "start", "decreasing", "counts", "total", "no-docs", "max-seqlen", "max-type", "rank",
         "gqa", "dtype-mix"],
)  # fmt: skip
def test_bad_varlen_input_raises(change, error, match):
    with pytest.raises(error, match=match):
        fpdt_kernels.flash_attention_varlen(**_bad_varlen(**change))


@pytest.mark.parametrize(
    "cu, kw, error, match",
    [
        (CU.long(), {}, TypeError, "int32"),
        (torch.tensor([0, 5, 17, 100, 192], dtype=torch.int32), {}, ValueError, "row boundary"),
        (torch.tensor([0, 5, 3, 96, 192], dtype=torch.int32), {}, ValueError, "decrease"),
        (torch.tensor([0, 5, 96, 191], dtype=torch.int32), {}, ValueError, "rows of equal length"),
        (CU, dict(q_start=60), ValueError, "inside a row"),
        (CU, dict(k_start=-1), ValueError, "inside a row"),
    ],
    ids=["dtype", "row-boundary", "decreasing", "rows", "q-past-row", "negative-start"],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_chunk_cu_seqlens_raises(cu, kw, error, match, backend):
    q, k, v, do = _chunk_inputs(40, 40)
    kw = dict(dict(q_start=0, k_start=0, causal=True), **kw)
    with fpdt_kernels.use_backend(backend):
        with pytest.raises(error, match=match):
            fpdt_kernels.attention_chunk_forward(q, k, v, cu_seqlens=cu, **kw)
        out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=0, k_start=0, causal=True)
        with pytest.raises(error, match=match):
            fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, cu_seqlens=cu, **kw)


# ---------------------------------------------------------------------------- GPU

GPU_CASES = {
    "long-gqa": ([1, 1000, 3000, 95, 4096], [1, 1000, 3000, 95, 4096], 128, 8, 2),
    "sq!=sk": ([513, 2048, 7], [1024, 1000, 300], 64, 4, 4),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_varlen_matches_reference(case, causal, dtype):
    _check_varlen(case, causal, dtype, "triton", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_chunked_documents_equal_the_whole(causal):
    test_chunked_documents_equal_the_whole("triton", causal)


@pytest.mark.gpu
def test_gpu_chunk_api_with_cu_seqlens_on_the_device():
    """Offsets on the GPU are taken as they are (no host read) and give the CPU offsets' result."""
    q, k, v, do = (t.cuda() for t in _chunk_inputs(45, 70))
    kw = dict(q_start=30, k_start=3, causal=True)
    a = fpdt_kernels.attention_chunk_forward(q, k, v, cu_seqlens=CU, **kw)
    b = fpdt_kernels.attention_chunk_forward(q, k, v, cu_seqlens=CU.cuda(), **kw)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
