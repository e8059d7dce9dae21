"""The ``cudnn`` backend (PyTorch's cuDNN attention ops behind the chunk API).

On CPU: which blocks cuDNN can run, and the errors for what it cannot (each names the backend
that can). On a GPU: outputs and every gradient against the float64 reference, for
``flash_attention`` and for a chunked causal pipeline's blocks merged and back-propagated with
the merged ``out``/``lse``, as FPDT runs them.
"""

import pytest
import torch

import fpdt_kernels
from fpdt_kernels import naive
from fpdt_kernels.attention import cudnn


@pytest.mark.parametrize(
    "sq,sk,q_start,k_start,causal,mode",
    [
        (64, 64, 0, 0, False, cudnn.NONE),  # not causal
        (64, 64, 128, 128, True, cudnn.CAUSAL),  # a diagonal block
        (64, 64, 128, 64, True, cudnn.NONE),  # below the diagonal: every query sees every key
        (64, 64, 0, 64, True, cudnn.SKIP),  # above it: nothing visible
        (64, 32, 100, 69, True, cudnn.NONE),  # q_start - k_start = Sk - 1: the first query sees all
        (32, 64, 0, 32, True, cudnn.SKIP),  # the last query (31) sees keys up to 31 < 32
    ],
)
def test_mask_mode(sq, sk, q_start, k_start, causal, mode):
    assert cudnn.mask_mode(sq, sk, q_start, k_start, causal) == mode


@pytest.mark.parametrize("sq,sk,q_start,k_start", [(64, 64, 10, 0), (32, 64, 32, 0), (64, 32, 0, 0)])
def test_mask_mode_refuses_other_causal_masks(sq, sk, q_start, k_start):
    with pytest.raises(ValueError, match="top-left causal mask with Sq == Sk.*use the triton backend"):
        cudnn.mask_mode(sq, sk, q_start, k_start, True)


def test_cudnn_backend_needs_cuda():
    with fpdt_kernels.use_backend("cudnn"), pytest.raises(ValueError, match="needs CUDA tensors.*torch backend"):
        fpdt_kernels.resolve_backend(torch.device("cpu"))


@pytest.mark.parametrize(
    "dtype,d,docs,error,match",
    [
        (torch.float32, 64, False, TypeError, "fp16 or bf16.*triton backend for fp32"),
        (torch.bfloat16, 36, False, ValueError, "multiple of 8.*d=36"),
        (torch.bfloat16, 264, False, ValueError, "at most 256"),
        (torch.bfloat16, 64, True, ValueError, "packed documents"),
    ],
)
def test_cudnn_input_checks(dtype, d, docs, error, match):
    q = torch.empty(1, 8, 2, d, dtype=dtype, device="meta")
    with pytest.raises(error, match=match):
        cudnn.check_inputs(q, torch.tensor([0, 8], dtype=torch.int32) if docs else None)


# ---------------------------------------------------------------------------- GPU


def _qkv(B, S, H, Hkv, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(B, S, h, d, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    return make(H), make(Hkv), make(Hkv), make(H)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("H,Hkv,d", [(8, 8, 64), (8, 2, 128)], ids=["mha-d64", "gqa-d128"])
def test_gpu_cudnn_flash_attention_matches_reference(H, Hkv, d, causal):
    q, k, v, do = _qkv(2, 1024, H, Hkv, d)
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    with fpdt_kernels.use_backend("cudnn"):
        out = fpdt_kernels.flash_attention(*qkv, causal=causal)
    grads = torch.autograd.grad(out, qkv, do)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = naive.flash_attention(*ref_in, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, name
        assert _rel(got, want) < 1e-2, f"{name}: relative error {_rel(got, want):.2e}"


@pytest.mark.gpu
def test_gpu_cudnn_chunk_pipeline_matches_reference():
    """Causal attention over 4 chunks as FPDT runs it: every visible block merged into running
    fp32 (out, lse), then each block's backward with the merged ones, accumulated in fp32."""
    q, k, v, do = _qkv(1, 1024, 8, 2, 128)
    C, u = 256, 4
    kw = dict(causal=True)
    with fpdt_kernels.use_backend("cudnn"):
        out = torch.zeros(q.shape, device="cuda")
        lse = torch.full((1, 8, 1024), float("-inf"), device="cuda")
        for i in range(u):
            for j in range(i + 1):
                rows, cols = slice(i * C, (i + 1) * C), slice(j * C, (j + 1) * C)
                fpdt_kernels.attention_chunk_forward(
                    q[:, rows], k[:, cols], v[:, cols], q_start=i * C, k_start=j * C,
                    out=out[:, rows], lse=lse[:, :, rows], **kw,
                )  # fmt: skip
        dq, dk, dv = (torch.zeros(t.shape, device="cuda") for t in (q, k, v))
        for i in range(u):
            for j in range(i + 1):
                rows, cols = slice(i * C, (i + 1) * C), slice(j * C, (j + 1) * C)
                fpdt_kernels.attention_chunk_backward(
                    do[:, rows], q[:, rows], k[:, cols], v[:, cols], out[:, rows], lse[:, :, rows],
                    q_start=i * C, k_start=j * C, dq=dq[:, rows], dk=dk[:, cols], dv=dv[:, cols], **kw,
                )  # fmt: skip
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = naive.flash_attention(*ref_in, causal=True)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, *ref_grads), strict=True):
        assert _rel(got, want) < 1e-2, f"{name}: relative error {_rel(got, want):.2e}"


@pytest.mark.gpu
def test_gpu_cudnn_refuses_a_bottom_right_causal_mask():
    q, k, v, _ = _qkv(1, 256, 4, 4, 64)
    with fpdt_kernels.use_backend("cudnn"), pytest.raises(ValueError, match="use the triton backend"):
        fpdt_kernels.flash_attention(q[:, :100], k, v, causal=True)
