"""Bad input to the attention API gets an error that names the argument and says what it needs;
empty sequences get the plain math (no rows, or rows that see no key) on every backend."""

import numpy as np
import pytest
import torch

import fpdt_kernels
from fpdt_kernels import naive

# The triton backend runs on CUDA, or on CPU tensors in the interpreter (tests/conftest.py turns
# it on when no GPU is visible); torch and naive run on CPU tensors.
GPU = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND_DEVICES = [("torch", "cpu"), ("naive", "cpu"), ("triton", GPU)]
CHUNK = dict(q_start=0, k_start=0, causal=True)


@pytest.fixture(autouse=True)
def _torch_backend():
    """CPU tensors run the torch backend unless a test picks another (auto would pick triton,
    which takes CPU tensors only in the interpreter)."""
    with fpdt_kernels.use_backend("torch"):
        yield


def _qkv(sq=6, sk=6, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda s, h: torch.randn(1, s, h, 8, generator=g, dtype=dtype).to(device)  # noqa: E731
    return make(sq, 4), make(sk, 2), make(sk, 2)


def _chunk_state(q, k, v):
    """``(do, out, lse)`` as a caller of ``attention_chunk_backward`` holds them."""
    out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, **CHUNK)
    return torch.randn_like(q), out, lse


# ---------------------------------------------------------------------------- 1: empty sequences


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq, sk", [(0, 5), (5, 0), (0, 0)], ids=["Sq=0", "Sk=0", "both=0"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_empty_sequences_match_the_naive_reference(backend, device, sq, sk, causal):
    """Sq=0 gives an empty output, Sk=0 zeros and an LSE of -inf, and the backward zero gradients,
    on every backend, as the naive reference computes them (the torch backend used to die of SIGFPE)."""
    q, k, v = _qkv(sq, sk, device)
    do = torch.randn_like(q)
    kw = dict(q_start=3, k_start=0, causal=causal)
    # flash_attention, forward and backward, against the reference's autograd.
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = naive.flash_attention(*ref_in, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_in, do, allow_unused=True)
    ref_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(ref_grads, ref_in, strict=True)]
    got_in = [t.clone().requires_grad_() for t in (q, k, v)]
    with fpdt_kernels.use_backend(backend):
        got = fpdt_kernels.flash_attention(*got_in, causal=causal)
        got_grads = torch.autograd.grad(got, got_in, do, allow_unused=True)
    assert got.shape == ref.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert g is not None and g.dtype == r.dtype
        torch.testing.assert_close(g, r)
    # The chunk ops, fresh and accumulating, against the reference's chunk ops.
    ref_out, ref_lse = naive.attention_chunk_forward(q, k, v, **kw)
    ref_chunk_grads = naive.attention_chunk_backward(do, q, k, v, ref_out, ref_lse, **kw)
    with fpdt_kernels.use_backend(backend):
        out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, **kw)
        grads = fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **kw)
        running = torch.randn(out.shape, device=device), torch.randn(lse.shape, device=device)
        kept = [t.clone() for t in running]
        fpdt_kernels.attention_chunk_forward(q, k, v, **kw, out=running[0], lse=running[1])
    assert out.shape == (1, sq, 4, 8) and lse.shape == (1, 4, sq)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.isneginf(lse).all() and (out == 0).all()  # no key seen (or no row)
    for g, r in zip(grads, ref_chunk_grads, strict=True):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r)
        assert (g == 0).all()
    for r, before in zip(running, kept, strict=True):  # a block without a pair leaves the state as it was
        assert torch.equal(r, before)


# ---------------------------------------------------------------------------- 2: do, out, lse


def _bad_state(name, make):
    def edit(do, out, lse):
        state = dict(do=do, out=out, lse=lse)
        state[name] = make(state[name])
        return state["do"], state["out"], state["lse"]

    return edit


@pytest.mark.parametrize(
    "name, make, error, match",
    [
        ("do", lambda t: t.to("meta"), ValueError, r"do is on meta but q is on cpu"),
        ("out", lambda t: t.to("meta"), ValueError, r"out is on meta but q is on cpu"),
        ("lse", lambda t: t.to("meta"), ValueError, r"lse is on meta but q is on cpu"),
        ("lse", lambda t: t.long(), TypeError, r"lse must be the float32 LSE .* got torch.int64"),
        ("lse", lambda t: t.half(), TypeError, r"lse must be the float32 LSE .* got torch.float16"),
        ("do", lambda t: t.double(), TypeError, r"do must be in q's dtype torch.float32, got torch.float64"),
        ("do", lambda t: t.half(), TypeError, r"do must be in q's dtype torch.float32, got torch.float16"),
        ("out", lambda t: t.int(), TypeError, r"out must be in q's dtype torch.float32 or a float32 accumulator"),
        ("do", lambda t: t[:, :3], ValueError, r"do must have shape \[B, Sq, H, d\] = \(1, 6, 4, 8\), got"),
        ("out", lambda t: t[..., :4], ValueError, r"out must have shape \[B, Sq, H, d\] = \(1, 6, 4, 8\), got"),
        ("lse", lambda t: t[:, :2], ValueError, r"lse must have shape \[B, H, Sq\] = \(1, 4, 6\), got"),
    ],
    ids=[
        "do-meta",
        "out-meta",
        "lse-meta",
        "lse-int",
        "lse-half",
        "do-double",
        "do-half",
        "out-int",
        "do-shape",
        "out-shape",
        "lse-shape",
    ],  # fmt: skip
)
def test_chunk_backward_checks_do_out_lse(name, make, error, match):
    q, k, v = _qkv()
    do, out, lse = _bad_state(name, make)(*_chunk_state(q, k, v))
    with pytest.raises(error, match=match):
        fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **CHUNK)


def test_chunk_backward_takes_out_in_q_dtype_or_as_the_forward_left_it():
    """Valid ``out``: q's dtype or the fp32 accumulator; both give the same gradients."""
    q, k, v = _qkv(dtype=torch.float64)
    do, out, lse = _chunk_state(q, k, v)
    want = fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **CHUNK)
    got = fpdt_kernels.attention_chunk_backward(do, q, k, v, out.to(q.dtype), lse, **CHUNK)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    qh, kh, vh = (t.half() for t in (q, k, v))
    out32, lse32 = fpdt_kernels.attention_chunk_forward(qh, kh, vh, **CHUNK)  # fp32 accumulators of fp16 q
    fpdt_kernels.attention_chunk_backward(do.half(), qh, kh, vh, out32, lse32, **CHUNK)
    fpdt_kernels.attention_chunk_backward(do.half(), qh, kh, vh, out32.half(), lse32, **CHUNK)


# ---------------------------------------------------------------------------- 3: offsets


def _call(entry, q, k, v, **kw):
    """Run one entry point with keyword overrides (``q_start``/``k_start`` only for the chunk ops)."""
    if entry in ("flash_attention", "varlen"):
        kw = {n: kw[n] for n in kw if n in ("causal", "softmax_scale")}
        if entry == "flash_attention":
            return fpdt_kernels.flash_attention(q, k, v, **kw)
        cu = torch.tensor([0, q.shape[1]], dtype=torch.int32)  # one document per sequence
        return fpdt_kernels.flash_attention_varlen(q[0], k[0], v[0], cu, cu, q.shape[1], k.shape[1], **kw)
    args = {**CHUNK, **kw}
    if entry == "chunk_forward":
        return fpdt_kernels.attention_chunk_forward(q, k, v, **args)
    do, out, lse = _chunk_state(q, k, v)
    return fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **args)


@pytest.mark.parametrize("entry", ["chunk_forward", "chunk_backward"])
@pytest.mark.parametrize("name", ["q_start", "k_start"])
@pytest.mark.parametrize(
    "value",
    [1.7, 2.0, "a", None, True, torch.tensor(1.0), torch.tensor([1]), torch.tensor(True), np.float64(1.0)],
    ids=["1.7", "2.0", "str", "None", "bool", "float-tensor", "1-d-tensor", "bool-tensor", "np-float"],
)
def test_offsets_must_be_ints(entry, name, value):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=rf"{name} must be an int \(a global token position, negative allowed\), got"):
        _call(entry, q, k, v, **{name: value})


@pytest.mark.parametrize("value", [-3, np.int64(-3), torch.tensor(-3)], ids=["int", "np-int", "0-d-int-tensor"])
def test_integer_offsets_are_accepted_negative_too(value):
    q, k, v = _qkv()
    want = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=-3, k_start=-5, causal=True)
    got = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=value, k_start=-5, causal=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------- 4: softmax_scale, causal


@pytest.mark.parametrize("entry", ["flash_attention", "varlen", "chunk_forward", "chunk_backward"])
@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(softmax_scale="0.1"), TypeError, r"softmax_scale must be None .* or a finite real number .* got '0.1'"),
        (dict(softmax_scale="abc"), TypeError, r"softmax_scale must be .* got 'abc' \(str\)"),
        (dict(softmax_scale=[0.1]), TypeError, r"softmax_scale must be .* got \[0.1\] \(list\)"),
        (dict(softmax_scale=True), TypeError, r"softmax_scale must be .* got True \(bool\)"),
        (dict(softmax_scale=float("nan")), ValueError, r"softmax_scale must be .* finite .* got nan"),
        (dict(softmax_scale=float("inf")), ValueError, r"softmax_scale must be .* finite .* got inf"),
        (dict(causal="no"), TypeError, r"causal must be a bool \(True or False\), got 'no' \(str\)"),
        (dict(causal=1), TypeError, r"causal must be a bool .* got 1 \(int\)"),
        (dict(causal=None), TypeError, r"causal must be a bool .* got None"),
    ],
    ids=[
        "scale-str-number",
        "scale-str",
        "scale-list",
        "scale-bool",
        "scale-nan",
        "scale-inf",
        "causal-str",
        "causal-int",
        "causal-None",
    ],  # fmt: skip
)
def test_scale_and_causal_are_checked(entry, kw, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        _call(entry, q, k, v, **kw)


def test_varlen_in_flash_attns_positional_order_is_refused():
    """flash-attn's ``flash_attn_varlen_func`` takes ``dropout_p, softmax_scale, causal`` after the
    maxima; ours ``causal, softmax_scale``. Their order must fail, not run a non-causal attention."""
    q, k, v = (t[0] for t in _qkv())
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"causal must be a bool .* got 0.0 \(float\)"):
        fpdt_kernels.flash_attention_varlen(q, k, v, cu, cu, 6, 6, 0.0, None, True)


@pytest.mark.parametrize("scale", [1, 0.25, np.float32(0.25), torch.tensor(0.25), 0.0], ids=str)
def test_real_scales_are_accepted(scale):
    q, k, v = _qkv()
    want = fpdt_kernels.flash_attention(q, k, v, causal=True, softmax_scale=float(scale))
    torch.testing.assert_close(fpdt_kernels.flash_attention(q, k, v, causal=True, softmax_scale=scale), want)


@pytest.mark.parametrize("scale", [0.0, -0.3], ids=["zero", "negative"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_zero_and_negative_scales_match_the_reference(backend, device, scale):
    """Finite scales <= 0 are valid: PyTorch's CPU kernel masks before it scales (a masked -inf
    times 0 was NaN), so the torch backend runs them as ``q * scale`` at scale 1."""
    q, k, v = _qkv(6, 9, device, dtype=torch.float32)
    do = torch.randn_like(q)
    kw = dict(q_start=2, k_start=0, causal=True, softmax_scale=scale)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = naive.flash_attention(*ref_in, causal=True, softmax_scale=scale)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    ref_out, ref_lse = naive.attention_chunk_forward(*(t.double() for t in (q, k, v)), **kw)
    ref_chunk = naive.attention_chunk_backward(do.double(), *(t.double() for t in (q, k, v)), ref_out, ref_lse, **kw)
    got_in = [t.clone().requires_grad_() for t in (q, k, v)]
    with fpdt_kernels.use_backend(backend):
        got = fpdt_kernels.flash_attention(*got_in, causal=True, softmax_scale=scale)
        got_grads = torch.autograd.grad(got, got_in, do)
        out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, **kw)
        chunk = fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **kw)
    got_all = (got, *got_grads, out, lse, *chunk)
    for g, r in zip(got_all, (ref, *ref_grads, ref_out, ref_lse, *ref_chunk), strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- 5: q, k, v types first


@pytest.mark.parametrize("entry", ["flash_attention", "chunk_forward", "chunk_backward"])
@pytest.mark.parametrize("backend", [None, "torch", "cudnn"], ids=["auto", "torch", "cudnn"])
@pytest.mark.parametrize(
    "make_bad, error, match",
    [
        (lambda q, k, v: ([1, 2], k, v), TypeError, r"q must be a torch.Tensor, got list"),
        (lambda q, k, v: (q, None, v), TypeError, r"k must be a torch.Tensor, got NoneType"),
        (lambda q, k, v: (q, k, q.numpy()), TypeError, r"v must be a torch.Tensor, got ndarray"),
        (lambda q, k, v: tuple(t.to("meta") for t in (q, k, v)), ValueError, r"q, k, v are on the meta device"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, r"q, k, v must be on one device"),
    ],
    ids=["q-list", "k-None", "v-ndarray", "all-meta", "k-meta"],
)
def test_qkv_are_checked_before_the_backend(entry, backend, make_bad, error, match):
    q, k, v = _qkv()
    if entry == "chunk_backward":  # the other arguments valid: only q, k, v are wrong
        do, out, lse = _chunk_state(q, k, v)
    q, k, v = make_bad(q, k, v)
    with fpdt_kernels.use_backend(backend), pytest.raises(error, match=match):
        if entry == "chunk_backward":
            fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **CHUNK)
        else:
            _call(entry, q, k, v)


# ---------------------------------------------------------------------------- 6: merge_attention


def _partials():
    q, k, v = _qkv(sk=10)
    a = naive.attention_chunk_forward(q, k[:, :4], v[:, :4], q_start=0, k_start=0, causal=False)
    b = naive.attention_chunk_forward(q, k[:, 4:], v[:, 4:], q_start=0, k_start=4, causal=False)
    return [*a, *b]


@pytest.mark.parametrize(
    "index, make, error, match",
    [
        (0, lambda t: t[0], ValueError, r"out_a must be 4-D \[B, S, H, d\], got shape \(6, 4, 8\)"),
        (2, lambda t: t.flatten(-2), ValueError, r"out_b must be 4-D \[B, S, H, d\], got shape \(1, 6, 32\)"),
        (1, lambda t: t[0], ValueError, r"lse_a must be 3-D \[B, H, S\], got shape \(4, 6\)"),
        (0, lambda t: None, TypeError, r"out_a must be a torch.Tensor, got NoneType"),
        (3, lambda t: t.tolist(), TypeError, r"lse_b must be a torch.Tensor, got list"),
        (
            3,
            lambda t: t.to("meta"),
            ValueError,
            r"out_a, lse_a, out_b, lse_b must be on one device, got cpu, cpu, cpu, meta",
        ),
        (
            1,
            lambda t: t.long(),
            TypeError,
            r"lse_a must be a float32 LSE \(natural log\) of dtype in .* got torch.int64",
        ),
        (3, lambda t: t.half(), TypeError, r"lse_b must be a float32 LSE .* got torch.float16"),
        (2, lambda t: t.int(), TypeError, r"out_b must be a floating-point output .* got torch.int32"),
        (2, lambda t: t[:, :3], ValueError, r"shapes differ: out \(1, 6, 4, 8\) vs \(1, 3, 4, 8\)"),
    ],
    ids=[
        "out_a-3d",
        "out_b-3d",
        "lse_a-2d",
        "out_a-None",
        "lse_b-list",
        "two-devices",
        "lse_a-int",
        "lse_b-half",
        "out_b-int",
        "out-shapes",
    ],  # fmt: skip
)
def test_merge_attention_checks_its_contract(index, make, error, match):
    args = _partials()
    args[index] = make(args[index])
    with pytest.raises(error, match=match):
        fpdt_kernels.merge_attention(*args)


def test_merge_attention_takes_low_precision_outputs():
    out_a, lse_a, out_b, lse_b = _partials()
    want = fpdt_kernels.merge_attention(out_a.bfloat16().float(), lse_a, out_b, lse_b)
    got = fpdt_kernels.merge_attention(out_a.bfloat16(), lse_a, out_b, lse_b)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------- 7: buffers that are not tensors


@pytest.mark.parametrize(
    "entry, kw, error, match",
    [
        ("chunk_forward", dict(out=[0], lse=[0]), TypeError, r"out must be a torch.Tensor, got list"),
        ("chunk_forward", dict(out="out", lse="lse"), TypeError, r"out must be a torch.Tensor, got str"),
        ("chunk_backward", dict(do=[1]), TypeError, r"do must be a torch.Tensor, got list"),
        ("chunk_backward", dict(out=[1]), TypeError, r"out must be a torch.Tensor, got list"),
        ("chunk_backward", dict(lse=(1,)), TypeError, r"lse must be a torch.Tensor, got tuple"),
        ("chunk_backward", dict(dq=[0]), TypeError, r"dq must be a torch.Tensor, got list"),
        ("chunk_backward", dict(dv=0.0), TypeError, r"dv must be a torch.Tensor, got float"),
        ("chunk_backward", dict(delta=[0]), TypeError, r"delta must be a torch.Tensor, got list"),
    ],
    ids=["fwd-out-list", "fwd-out-str", "bwd-do", "bwd-out", "bwd-lse", "bwd-dq", "bwd-dv", "bwd-delta"],
)
def test_buffers_must_be_tensors(entry, kw, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        if entry == "chunk_forward":
            fpdt_kernels.attention_chunk_forward(q, k, v, **CHUNK, **kw)
        else:
            do, out, lse = _chunk_state(q, k, v)
            state = dict(do=do, out=out, lse=lse)
            extra = {n: t for n, t in kw.items() if n not in state}
            state.update({n: t for n, t in kw.items() if n in state})
            fpdt_kernels.attention_chunk_backward(state["do"], q, k, v, state["out"], state["lse"], **CHUNK, **extra)


# ---------------------------------------------------------------------------- packed documents


@pytest.mark.parametrize("backend", [None, "torch"], ids=["auto", "torch"])
def test_varlen_checks_tensors_before_the_backend(backend):
    cu = torch.tensor([0, 6], dtype=torch.int32)
    q, k, v = (t[0] for t in _qkv())
    with fpdt_kernels.use_backend(backend), pytest.raises(TypeError, match=r"q must be a torch.Tensor, got list"):
        fpdt_kernels.flash_attention_varlen([1], k, v, cu, cu, 6, 6)


def test_an_empty_batch_of_packed_documents():
    q = torch.randn(0, 4, 2, 8)
    empty = torch.tensor([0, 0], dtype=torch.int32)
    out, lse = fpdt_kernels.attention_chunk_forward(q, q, q, cu_seqlens=empty, **CHUNK)
    assert out.shape == (0, 4, 2, 8) and lse.shape == (0, 2, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens ends at 4, but q has B=0 rows; an empty batch takes"):
        fpdt_kernels.attention_chunk_forward(q, q, q, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), **CHUNK)


# ---------------------------------------------------------------------------- what the ops promise


@pytest.mark.parametrize("entry", ["flash_attention", "varlen"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_a_double_backward_raises_on_every_backend(backend, device, entry):
    """The backward is first-order. Differentiating it (a gradient penalty) must raise, not give a
    second-order term of 0 (the Triton backward returned gradients with no graph)."""
    if entry == "varlen" and backend == "naive":
        pytest.skip("naive's packed documents are plain autograd math: they have a second order")
    q, k, v = (t.requires_grad_() for t in _qkv(device=device))
    with fpdt_kernels.use_backend(backend):
        out = _call(entry, q, k, v, causal=True)
        (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            dq.square().sum().backward()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_one_row_buffers_take_any_stride_along_their_one_row(backend, device):
    """A block of one query row: ``delta`` and a running ``lse`` made by the docstring's recipe
    (``.transpose(1, 2).contiguous()``) have a stride of 2 along their one-element last dim,
    which no kernel reads; they are accepted and give what unit-stride buffers give."""
    q, k, v = _qkv(sq=1, sk=6, device=device)
    do = torch.randn_like(q)
    with fpdt_kernels.use_backend(backend):
        out, lse = fpdt_kernels.attention_chunk_forward(q, k, v, q_start=5, k_start=0, causal=True)
        delta = (do.float() * out).sum(-1).transpose(1, 2).contiguous()
        assert delta.stride(-1) != 1
        want = fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, q_start=5, k_start=0, causal=True)
        got = fpdt_kernels.attention_chunk_backward(
            do, q, k, v, out, lse, q_start=5, k_start=0, causal=True, delta=delta
        )
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
        run_out = torch.zeros_like(out)
        run_lse = torch.full((1, 1, 4), float("-inf"), device=device).transpose(1, 2).contiguous()
        assert run_lse.shape == lse.shape and run_lse.stride(-1) != 1
        fpdt_kernels.attention_chunk_forward(q, k, v, q_start=5, k_start=0, causal=True, out=run_out, lse=run_lse)
        torch.testing.assert_close(run_out, out)
        torch.testing.assert_close(run_lse, lse)


@pytest.mark.parametrize("deterministic", [True, False], ids=["split", "fused"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_float64_gradient_buffers_on_the_cpu(backend, device, deterministic):
    """float64 accumulators are accepted on the CPU by every backend and backward, the fused
    Triton one too (its dQ atomics add into an fp32 buffer, then into the caller's)."""
    if device != "cpu":
        pytest.skip("float64 accumulators are a CPU (oracle) feature; GPU kernels accumulate in fp32")
    q, k, v = _qkv()
    do, out, lse = _chunk_state(q, k, v)
    with fpdt_kernels.use_backend(backend):
        want = fpdt_kernels.attention_chunk_backward(do, q, k, v, out, lse, **CHUNK, deterministic=deterministic)
        buffers = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v)]
        fpdt_kernels.attention_chunk_backward(
            do, q, k, v, out, lse, **CHUNK, dq=buffers[0], dk=buffers[1], dv=buffers[2], deterministic=deterministic
        )
    for g, w in zip(buffers, want, strict=True):
        torch.testing.assert_close(g, w.double(), atol=1e-5, rtol=1e-5)


def test_naive_takes_the_public_ops_arguments():
    """``fpdt_kernels.naive`` stands in for the public ops: the same argument names, in order."""
    import inspect

    for name in ("flash_attention", "flash_attention_varlen", "attention_chunk_forward",
                 "attention_chunk_backward", "merge_attention"):  # fmt: skip
        public = list(inspect.signature(getattr(fpdt_kernels, name)).parameters)
        assert list(inspect.signature(getattr(naive, name)).parameters) == public, name
