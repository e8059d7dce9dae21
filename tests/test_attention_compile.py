"""The public attention ops under ``torch.compile``: ``flash_attention`` and
``flash_attention_varlen`` are each one opaque op in the graph, the chunk ops two ops that write
into their buffers; ``fullgraph=True`` works, and compiled calls compute what eager ones do, to
the bit, on every backend and path.

Without CUDA the ``triton`` backend runs in the Triton interpreter; the ops run the same Python
either way, so what is checked here is the graph capture, the ops' registrations (schema, fake
shapes, autograd) and that the compiled call computes what the eager one does. On CUDA the GPU
test also compiles with Inductor.
"""

import pytest
import torch

import fpdt_kernels
from fpdt_kernels.attention import varlen
from fpdt_kernels.attention.api import _backward_op, _chunk_backward_op, _chunk_forward_op, _forward_op

# (B, Sq, Sk, H, Hkv, d, causal): each reaches a different path of the forward and backward.
CASES = {
    "mha-causal": (2, 17, 17, 2, 2, 16, True),  # torch: one call of the CPU kernel covers it
    "gqa-causal-sq<sk": (1, 9, 23, 4, 2, 16, True),  # torch: the chunk path, bottom-right causal
    "mqa-full-odd-d": (1, 13, 7, 2, 1, 24, False),  # triton: d padded to whole 16-byte rows
    "empty-keys": (1, 5, 0, 2, 2, 16, False),  # no (query, key) pair: out 0, zero gradients
}
BACKENDS = ["triton", "torch", "naive"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(case, dtype=torch.float32, device=DEVICE):
    B, Sq, Sk, H, Hkv, d, causal = CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Sq, H, d, generator=g, dtype=dtype).to(device)
    k = torch.randn(B, Sk, Hkv, d, generator=g, dtype=dtype).to(device)
    v = torch.randn(B, Sk, Hkv, d, generator=g, dtype=dtype).to(device)
    do = torch.randn(B, Sq, H, d, generator=g, dtype=dtype).to(device)
    return q, k, v, do, causal


def _fwd_bwd(fn, q, k, v, do, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal=causal)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _compiled(backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fpdt_kernels.flash_attention, backend=backend, fullgraph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_eager(backend, case):
    q, k, v, do, causal = _inputs(case)
    with fpdt_kernels.use_backend(backend):
        eager = _fwd_bwd(fpdt_kernels.flash_attention, q, k, v, do, causal)
        compiled = _fwd_bwd(_compiled(), q, k, v, do, causal)
    H, Hkv = CASES[case][3:5]
    # GPU kernels sum GQA dK/dV over a group's query heads with atomics, in any order.
    atomics = DEVICE == "cuda" and backend == "triton" and H > Hkv
    for name, e, c in zip(("out", "dq", "dk", "dv"), eager, compiled, strict=True):
        assert c.shape == e.shape and c.dtype == e.dtype, name
        # The same kernels on the same inputs: equal to the bit (but for the order of atomic adds).
        tol = 1e-5 if atomics and name in ("dk", "dv") else 0
        torch.testing.assert_close(c, e, rtol=tol, atol=tol, msg=f"{name} differs from the eager call")


def test_compiled_graph_is_one_node_of_ours():
    """The whole call is captured as one graph whose only attention node is our op (no graph
    break, no traced kernel internals)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, _, causal = _inputs("gqa-causal-sq<sk")
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return counter(gm, example_inputs)

    with fpdt_kernels.use_backend("torch"):
        torch.compile(lambda q, k, v: fpdt_kernels.flash_attention(q, k, v, causal=causal), backend=capture)(q, k, v)
    assert counter.frame_count == 1
    plumbing = ("<built-in function getattr>", "<built-in function getitem>")  # tensor attributes, the tuple
    ops = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function" and str(n.target) not in plumbing]
    assert ops == ["fpdt_kernels.flash_attention_forward.default"], ops


def test_dynamic_lengths_compile_once():
    """``dynamic=True``: three sequence lengths, one captured graph, each call equal to eager."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q, k, v: fpdt_kernels.flash_attention(q, k, v, causal=True),
        backend=counter,
        dynamic=True,
        fullgraph=True,
    )
    g = torch.Generator().manual_seed(0)
    for S in (17, 33, 50):
        q, k, v = (torch.randn(1, S, 2, 16, generator=g).to(DEVICE) for _ in range(3))
        torch.testing.assert_close(
            compiled(q, k, v), fpdt_kernels.flash_attention(q, k, v, causal=True), rtol=0, atol=0
        )
    assert counter.frame_count == 1


def test_dynamic_chunk_offsets_stay_symbolic():
    """A chunk op placed by a length (``q_start = Sq``): one graph for three lengths."""
    from torch._dynamo.testing import CompileCounter

    def block(q, k, v):
        return fpdt_kernels.attention_chunk_forward(q, k, v, q_start=q.shape[1], k_start=0, causal=True)

    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for S in (8, 13, 21):
        q, k, v = (torch.randn(1, S, 2, 16, generator=g).to(DEVICE) for _ in range(3))
        for got, want in zip(compiled(q, k, v), block(q, k, v), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert counter.frame_count == 1


def test_compiled_in_a_model_trains_like_eager():
    """A projection + attention + projection module: compiled (fullgraph) and eager give the same
    loss and parameter gradients."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 3 * 32)
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x):
            B, S, _ = x.shape
            q, k, v = self.qkv(x).view(B, S, 3, 2, 16).unbind(2)  # views with strides off contiguous
            return self.proj(fpdt_kernels.flash_attention(q, k, v, causal=True).reshape(B, S, 32))

    torch.manual_seed(0)
    block, x = Block().to(DEVICE), torch.randn(2, 11, 32, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        block.zero_grad(set_to_none=True)
        loss = fn(x).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in block.parameters()]))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    for ge, gc in zip(grads_e, grads_c, strict=True):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)


@pytest.mark.parametrize(
    "backend, case, dtype",
    [
        ("torch", "mha-causal", torch.float32),
        ("torch", "gqa-causal-sq<sk", torch.float64),
        ("naive", "gqa-causal-sq<sk", torch.float32),
        ("triton", "mqa-full-odd-d", torch.float32),
        ("torch", "empty-keys", torch.bfloat16),
    ],
)
def test_ops_pass_opcheck(backend, case, dtype):
    """PyTorch's own check of a custom op: its schema (no hidden mutation or aliasing), its fake
    version against the real outputs (shapes, dtypes, strides) and its autograd registration."""
    q, k, v, do, causal = _inputs(case, dtype)
    scale = q.shape[-1] ** -0.5
    q.requires_grad_()
    torch.library.opcheck(_forward_op, (q, k, v, causal, scale, backend, True))
    out, lse = _forward_op(q.detach(), k, v, causal, scale, backend, True)
    torch.library.opcheck(_backward_op, (do, q.detach(), k, v, out, lse, causal, scale, backend, True))


# (query lengths, key lengths, H, Hkv, d, causal): odd lengths, empty documents on either side
# (rows that see no key), Sq != Sk per document, GQA, an odd head dim.
VARLEN_CASES = {
    "gqa-causal": ([7, 1, 19], [7, 1, 19], 4, 2, 16, True),
    "mqa-empty-docs-odd-d": ([5, 0, 9, 3], [0, 6, 4, 11], 2, 1, 24, False),
}


def _varlen_inputs(case, dtype=torch.float32):
    lq, lk, H, Hkv, d, causal = VARLEN_CASES[case]
    g = torch.Generator().manual_seed(0)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lq, lk))
    q, do = (torch.randn(sum(lq), H, d, generator=g, dtype=dtype).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(sum(lk), Hkv, d, generator=g, dtype=dtype).to(DEVICE) for _ in range(2))
    return q, k, v, do, (cu_q, cu_k, max(lq), max(lk)), causal


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_compiled_equals_eager(backend, case):
    q, k, v, do, docs, causal = _varlen_inputs(case)

    def fn(q, k, v):
        return fpdt_kernels.flash_attention_varlen(q, k, v, *docs, causal=causal)

    with fpdt_kernels.use_backend(backend):
        results = []
        for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
            out = f(q_, k_, v_)
            results.append((out, *torch.autograd.grad(out, (q_, k_, v_), do)))
    torch._dynamo.reset()
    H, Hkv = VARLEN_CASES[case][2:4]
    atomics = DEVICE == "cuda" and backend == "triton" and H > Hkv
    for name, e, c in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        tol = 1e-5 if atomics and name in ("dk", "dv") else 0
        torch.testing.assert_close(c, e, rtol=tol, atol=tol, msg=f"{name} differs from the eager call")


def test_varlen_bad_offsets_raise_when_compiled():
    """The offsets are checked inside the op, so a compiled call still names what is wrong."""
    q, k, v, _, (cu_q, cu_k, max_q, max_k), causal = _varlen_inputs("gqa-causal")
    torch._dynamo.reset()
    compiled = torch.compile(fpdt_kernels.flash_attention_varlen, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="max_seqlen_q=3 is shorter than the longest document"):
        compiled(q, k, v, cu_q, cu_k, 3, max_k, causal=causal)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_ops_pass_opcheck(backend):
    q, k, v, do, (cu_q, cu_k, max_q, max_k), causal = _varlen_inputs("mqa-empty-docs-odd-d")
    scale = q.shape[-1] ** -0.5
    args = (cu_q, cu_k, max_q, max_k, causal, scale, backend, True)
    torch.library.opcheck(varlen._forward_op, (q.requires_grad_(), k, v, *args))
    out, lse = varlen._forward_op(q.detach(), k, v, *args)
    torch.library.opcheck(
        varlen._backward_op, (do, q.detach(), k, v, out, lse, cu_q, cu_k, causal, scale, backend, True)
    )


def _chunked_attention(q, k, v, do, u, cu_seqlens):
    """FPDT's inner loop with the chunk ops: ``u`` causal chunks, each query chunk merged over the
    key chunks it sees, then the backward of every (query, key) chunk pair into fp32 gradients."""
    C = q.shape[1] // u
    chunk = [lambda t, i=i: t[:, i * C : (i + 1) * C] for i in range(u)]
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    outs, lses = [], []
    for i in range(u):
        out = lse = None
        for j in range(i + 1):
            out, lse = fpdt_kernels.attention_chunk_forward(
                chunk[i](q), chunk[j](k), chunk[j](v), q_start=i * C, k_start=j * C, causal=True,
                out=out, lse=lse, cu_seqlens=cu_seqlens,
            )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    for i in range(u):
        for j in range(i + 1):
            fpdt_kernels.attention_chunk_backward(
                chunk[i](do), chunk[i](q), chunk[j](k), chunk[j](v), outs[i], lses[i], q_start=i * C, k_start=j * C,
                causal=True, dq=chunk[i](dq), dk=chunk[j](dk), dv=chunk[j](dv), cu_seqlens=cu_seqlens,
            )  # fmt: skip
    return torch.cat(outs, 1), torch.cat(lses, 2), dq, dk, dv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("documents", [False, True], ids=["whole", "packed"])
def test_chunk_ops_compiled_equal_eager(backend, documents):
    """The chunk ops in FPDT's loop (GQA, odd head dim, 3 chunks, accumulating buffers, gradient
    buffers that are views): compiled with ``fullgraph=True``, the same outputs, LSEs and
    gradients as eager, to the bit."""
    g = torch.Generator().manual_seed(0)
    B, S, H, Hkv, d, u = 2, 21, 4, 2, 24, 3
    q, do = (torch.randn(B, S, H, d, generator=g).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(B, S, Hkv, d, generator=g).to(DEVICE) for _ in range(2))
    # Two documents per row (flattened [B * S] offsets), one boundary inside a chunk.
    cu = torch.tensor([0, 10, S, S + 4, 2 * S], dtype=torch.int32) if documents else None
    with fpdt_kernels.use_backend(backend):
        eager = _chunked_attention(q, k, v, do, u, cu)
        torch._dynamo.reset()
        compiled = torch.compile(_chunked_attention, backend="aot_eager", fullgraph=True)(q, k, v, do, u, cu)
    atomics = DEVICE == "cuda" and backend == "triton"  # GQA dK/dV: atomic adds in any order
    for name, e, c in zip(("out", "lse", "dq", "dk", "dv"), eager, compiled, strict=True):
        tol = 1e-5 if atomics and name in ("dk", "dv") else 0
        torch.testing.assert_close(c, e, rtol=tol, atol=tol, msg=f"{name} differs from the eager call")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_ops_pass_opcheck(backend):
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, 9, 2, 24, generator=g).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(1, 13, 1, 24, generator=g).to(DEVICE) for _ in range(2))
    out, lse = torch.zeros(1, 9, 2, 24, device=DEVICE), torch.full((1, 2, 9), float("-inf"), device=DEVICE)
    cu = torch.tensor([0, 5, 22], dtype=torch.int32)
    common = (4, 0, True, 0.2)
    torch.library.opcheck(_chunk_forward_op, (q, k, v, out, lse, *common, True, cu, backend))
    dq, dk, dv = (torch.zeros(t.shape, device=DEVICE) for t in (q, k, v))
    torch.library.opcheck(_chunk_backward_op, (do, q, k, v, out, lse, None, dq, dk, dv, *common, cu, backend, True))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_inductor_on_cuda_equals_eager(deterministic):
    """Inductor around our op on a GPU (bf16, GQA, causal, odd head dim): the same output and
    gradients as the eager call (the op runs the same kernels), bit for bit where the kernels
    are bit-reproducible."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (
        torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)
        for shape in ((2, 300, 8, 72), (2, 300, 2, 72), (2, 300, 2, 72), (2, 300, 8, 72))
    )

    def fn(q, k, v, causal):
        return fpdt_kernels.flash_attention(q, k, v, causal=causal, deterministic=deterministic)

    eager = _fwd_bwd(fn, q, k, v, do, True)
    torch._dynamo.reset()
    compiled = _fwd_bwd(torch.compile(fn, fullgraph=True), q, k, v, do, True)
    # Added with fp32 atomics in any order, then rounded to bf16 (one bf16 step apart at most):
    # GQA dK/dV always, dQ in the fused backward.
    atomic = {"dk", "dv"} | (set() if deterministic else {"dq"})
    for name, e, c in zip(("out", "dq", "dk", "dv"), eager, compiled, strict=True):
        tol = 2e-2 if name in atomic else 0
        torch.testing.assert_close(c, e, rtol=tol, atol=tol, msg=name)
