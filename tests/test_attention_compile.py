"""``flash_attention`` under ``torch.compile``: one opaque op in the graph (``fullgraph=True``
works), with the same output and gradients as the eager call, on every backend and path.

Without CUDA the ``triton`` backend runs in the Triton interpreter; the ops run the same Python
either way, so what is checked here is the graph capture, the ops' registrations (schema, fake
shapes, autograd) and that the compiled call computes what the eager one does. On CUDA the GPU
test also compiles with Inductor.
"""

import pytest
import torch

import fpdt_kernels
from fpdt_kernels.attention.api import _backward_op, _forward_op

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


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_inductor_on_cuda_equals_eager(deterministic):
    """Inductor around our op on a GPU (bf16, GQA, causal, odd head dim): the same output and
    gradients as the eager call, bit for bit (the op runs the same kernels)."""
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
    for name, e, c in zip(("out", "dq", "dk", "dv"), eager, compiled, strict=True):
        if deterministic or name != "dq":  # the fused backward's dQ atomics add in any order
            torch.testing.assert_close(c, e, rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(c, e, rtol=2e-2, atol=2e-2, msg=name)
