"""The tensor-descriptor (TMA) tiles, with and without warp specialisation, against a float64
reference and against the pointer path: in the Triton interpreter (which runs descriptors) or on
an sm_90 GPU, one forced config each (``FPDT_TMA=1`` lets autotune pick them).

Forward: out and LSE, written and merged into running fp32 accumulators (the chunk API), causal
at offsets, MHA and GQA. Backward: the split backward's dK/dV kernel and the fused kernel (dQ
added by descriptor reductions), written (``flash_attention``'s) and added into running fp32
sums (the chunk API's), MHA and GQA; the warp-specialised dK/dV tiles where they apply (MHA,
written).
"""

import copy

import pytest
import torch

from fpdt_kernels import naive
from fpdt_kernels.attention import triton_bwd, triton_common, triton_fwd
from fpdt_kernels.attention.triton_common import tile, tile_name

DEVICE = "cpu" if triton_common.INTERPRET else "cuda"
_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
runs_tma = pytest.mark.skipif(not (triton_common.INTERPRET or _SM90), reason="TMA needs sm_90 or the interpreter")

# (Sq, Sk, d, H, Hkv, q_start, k_start): rows past the last tile, a diagonal through a tile, GQA
# 4/2 and 4/1, d=40 (a descriptor box of 64 columns over 40), and rows that see no key at all.
SHAPES = [
    (17, 63, 40, 4, 2, 46, 0),
    (113, 70, 64, 4, 4, 20, 30),
    (63, 17, 16, 4, 1, 0, 5),
]
CONFIGS = {"tma": dict(tma=True, ws=False), "tma-ws": dict(tma=True, ws=True)}


def _config(tma, ws):
    if triton_common.INTERPRET:
        return tile(32, 32, 4, 2, TMA=tma, WS=ws)  # few numpy steps
    # Clean tiles on sm_90 at d <= 64; warp specialisation takes effect only at num_warps=4.
    return tile(128, 64, 4 if ws else 8, 2, TMA=tma, WS=ws)


def _ids(shape):
    return "sq{}-sk{}-d{}-h{}kv{}-at{}-{}".format(*shape)


def _inputs(shape, dtype, seed=0):
    sq, sk, d, h, hkv = shape[:5]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, sq, h, d, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(2, sk, hkv, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, v


def _forward(config, q, k, v, q_start, k_start, causal, out, lse, accumulate, monkeypatch):
    monkeypatch.setattr(triton_fwd._fwd_kernel, "configs", [config])
    launch = triton_fwd.forward_launch(
        *triton_fwd.pad_inputs(q, k, v), q_start, k_start, causal, q.shape[-1] ** -0.5, out, lse, accumulate
    )
    assert launch.args["TMA_OK"]
    if q.is_cuda:  # a forced TMA tile needs the descriptors' scratch (as the kernel_configs bench gives it)
        triton_common.set_tma_allocator()
    triton_common.run(launch)


def _reference(q, k, v, q_start, k_start, causal):
    return naive.attention_chunk_forward(
        q.double(), k.double(), v.double(), q_start=q_start, k_start=k_start, causal=causal
    )


@runs_tma
@pytest.mark.parametrize("config", ["tma", "tma-ws"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "merge"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_tma_forward_matches_reference_and_pointer_path(shape, causal, accumulate, config, monkeypatch):
    q, k, v = _inputs(shape, torch.float16)
    q_start, k_start = shape[5:]
    B, Sq, H, d = q.shape
    if accumulate:
        # Running state from the keys before this block (at k_start - 9 .. k_start - 1); the merge
        # must give the attention over both blocks.
        k0, v0 = _inputs((Sq, 9, d, H, k.shape[2]), torch.float16, seed=1)[1:]
        prev_out, prev_lse = _reference(q, k0, v0, q_start, k_start - 9, causal)
        ref_out, ref_lse = _reference(q, torch.cat([k0, k], 1), torch.cat([v0, v], 1), q_start, k_start - 9, causal)
    else:
        ref_out, ref_lse = _reference(q, k, v, q_start, k_start, causal)
    # The config under test, then the pointer path in the same tile on the same warps.
    tiles = {"tma": _config(**CONFIGS[config]), "pointers": _config(False, False)}
    tiles["pointers"].num_warps = tiles["tma"].num_warps
    results = {}
    for name, forced in tiles.items():
        if accumulate:  # the chunk API's fp32 accumulators
            out, lse = prev_out.float(), prev_lse.float()
        else:  # flash_attention's output in the input dtype, poisoned: every row must be written
            out = torch.full((B, Sq, H, d), float("nan"), dtype=q.dtype, device=DEVICE)
            lse = torch.full((B, H, Sq), float("nan"), device=DEVICE)
        _forward(forced, q, k, v, q_start, k_start, causal, out, lse, accumulate, monkeypatch)
        results[name] = out, lse
    out, lse = results["tma"]
    # The interpreter computes in fp32 (UPCAST); a GPU multiplies P in fp16.
    tol = (2e-3 if out.dtype == torch.float16 else 2e-5) if triton_common.INTERPRET else 1e-2
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    # The same tile through pointers: the same arithmetic up to summation order (numpy's products
    # of K^T loaded transposed and of K transposed after the load differ in the last bit).
    ulp = (1e-3 if out.dtype == torch.float16 else 1e-6) if triton_common.INTERPRET else tol
    torch.testing.assert_close(out, results["pointers"][0], rtol=ulp, atol=ulp)
    torch.testing.assert_close(lse, results["pointers"][1], rtol=1e-5, atol=1e-5)


@runs_tma
def test_tma_forward_bf16(monkeypatch):
    """bf16 (through the interpreter's upcast), causal, GQA."""
    q, k, v = _inputs((40, 90, 64, 4, 2), torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(2, 4, 40, device=DEVICE)
    _forward(_config(True, False), q, k, v, 50, 0, True, out, lse, False, monkeypatch)
    ref_out, ref_lse = _reference(q, k, v, 50, 0, True)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def _meta(d, dtype, out_dtype=None):
    q = torch.empty(1, 64, 2, d, dtype=dtype, device="meta")
    out = torch.empty(1, 64, 2, d, dtype=out_dtype or dtype, device="meta")
    lse = torch.empty(1, 2, 64, device="meta")
    return (*triton_fwd.pad_inputs(q, q, q), out, lse)


@pytest.mark.parametrize(
    "d,dtype,out_dtype,docs,ok",
    [
        (64, torch.bfloat16, None, False, True),
        (40, torch.float16, torch.float32, False, True),  # 80-byte rows; fp32 merge buffers
        (64, torch.float32, None, False, False),  # 32-bit inputs
        (59, torch.bfloat16, None, False, False),  # output rows of 118 bytes
        (111, torch.float16, torch.float32, False, False),  # 444-byte fp32 output rows
        (64, torch.bfloat16, None, True, False),  # document spans
    ],
)
def test_tma_only_where_the_launch_supports_it(d, dtype, out_dtype, docs, ok):
    """``TMA_OK`` as the launcher sets it, and the tiles pruning keeps: TMA ones only with it."""
    q, k, v, out, lse = _meta(d, dtype, out_dtype)
    spans = torch.empty(1, 2, 64, dtype=torch.int32, device="meta") if docs else None
    args = triton_fwd.forward_launch(q, k, v, 0, 0, True, 0.1, out, lse, False, spans).args
    assert args["TMA_OK"] is ok
    tiles = triton_fwd.TILES
    for arch in (90, 80):
        usable = tiles.usable(tiles.configs, args["BD"], dtype.itemsize, arch, False, docs, args["TMA_OK"])
        with_tma = [tile_name(c) for c in usable if triton_common.uses_tma(c)]
        assert bool(with_tma) == (ok and arch == 90 and d <= 128), with_tma


def test_tma_tiles_are_opt_in(monkeypatch):
    """Autotune sees the TMA tiles only with FPDT_TMA=1; their names say tma (and ws)."""
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    monkeypatch.delenv(triton_common.AUTOTUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(triton_common.TMA_ENV_VAR, raising=False)
    configs = triton_fwd.TILES.configs
    assert not any(triton_common.uses_tma(c) for c in triton_common.autotune_configs(configs))
    monkeypatch.setenv(triton_common.TMA_ENV_VAR, "1")
    assert triton_common.autotune_configs(configs) == configs
    names = {tile_name(c) for c in configs}
    assert {"128x128 w8 s3 tma", "128x64 w4 s3 tma ws", "128x64 w8 s3"} <= names


# The backward's TMA tiles.


def _bwd_configs(tma, ws):
    """The dK/dV (and fused) kernel's config and the dQ kernel's."""
    if triton_common.INTERPRET:
        return tile(32, 32, 4, 2, SPLIT=False, TMA=tma, WS=ws), tile(32, 32, 4, 2, TMA=tma, WS=ws)
    # Clean on sm_90 at d <= 64 (compile_check); warp specialisation runs num_warps=4 per consumer group.
    return tile(32, 128, 4 if ws else 8, 2, SPLIT=False, TMA=tma, WS=ws), tile(64, 64, 4, 2, TMA=tma, WS=ws)


def _backward(configs, fused, q, k, v, do, q_start, k_start, causal, accumulate, monkeypatch):
    """``(dq, dk, dv)`` of one block with the dK/dV and dQ kernels (or, ``fused``, the fused
    kernel) forced to ``configs``: added into running fp32 sums of 0.5 (``accumulate``, the chunk
    API) or written in the input dtype (``flash_attention``'s backward, keys from 0)."""
    if fused:
        monkeypatch.setattr(triton_bwd._fused_kernel, "configs", configs[:1])
    else:
        monkeypatch.setattr(triton_bwd._dkdv_kernel, "configs", configs[:1])
        monkeypatch.setattr(triton_bwd._dq_kernel, "configs", configs[1:])
    if q.is_cuda:  # a forced TMA tile needs the descriptors' scratch
        triton_common.set_tma_allocator()
    out, lse = (t.float() for t in _reference(q, k, v, q_start, k_start, causal))
    scale = q.shape[-1] ** -0.5
    if accumulate:
        grads = [torch.full(t.shape, 0.5, device=t.device) for t in (q, k, v)]
        triton_bwd.chunk_backward(
            do, q, k, v, out, lse, None, q_start, k_start, causal, scale, *grads, deterministic=not fused
        )
        return grads
    assert k_start == 0
    padded = triton_fwd.pad_inputs(q, k, v)
    return triton_bwd.flash_backward(do, *padded, out, lse, q_start, causal, scale, deterministic=not fused)


def _backward_reference(q, k, v, do, q_start, k_start, causal, accumulate):
    q, k, v, do = (t.double() for t in (q, k, v, do))
    out, lse = _reference(q, k, v, q_start, k_start, causal)
    grads = naive.attention_chunk_backward(do, q, k, v, out, lse, q_start=q_start, k_start=k_start, causal=causal)
    return [g + 0.5 for g in grads] if accumulate else grads


def _assert_backward(configs, fused, shape, causal, accumulate, monkeypatch):
    q, k, v = _inputs(shape, torch.float16)
    do = _inputs(shape, torch.float16, seed=2)[0]
    q_start, k_start = shape[5:]
    if not accumulate:  # flash_attention's backward places the keys at 0
        q_start, k_start = q_start - k_start, 0
    ref = _backward_reference(q, k, v, do, q_start, k_start, causal, accumulate)
    # The config under test, then the pointer path in the same tile on the same warps.
    pointers = [copy.deepcopy(c) for c in configs]
    for c in pointers:
        c.kwargs.update(TMA=False, WS=False)
    results = {
        name: _backward(forced, fused, q, k, v, do, q_start, k_start, causal, accumulate, monkeypatch)
        for name, forced in (("tma", configs), ("pointers", pointers))
    }
    # The interpreter computes in fp32 (UPCAST) and rounds written gradients to fp16; a GPU
    # multiplies P and dS in fp16.
    tol = (2e-3 if not accumulate else 1e-4) if triton_common.INTERPRET else 3e-2
    for name, g, r, p in zip(("dq", "dk", "dv"), results["tma"], ref, results["pointers"], strict=True):
        assert g.dtype == (torch.float32 if accumulate else q.dtype), name
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
        # dQ of the fused kernel and GQA's dK/dV add in whatever order the programs run.
        ulp = 1e-5 if accumulate or not triton_common.INTERPRET else 1e-3
        torch.testing.assert_close(
            g, p, rtol=ulp if triton_common.INTERPRET else tol, atol=ulp, msg=lambda m, n=name: f"{n} vs pointers: {m}"
        )


@runs_tma
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "add"])
@pytest.mark.parametrize(
    "shape,causal",
    [(SHAPES[0], True), (SHAPES[1], False), (SHAPES[2], True)],
    ids=lambda x: _ids(x) if isinstance(x, tuple) else ("causal" if x else "full"),
)
def test_tma_backward_matches_reference_and_pointer_path(shape, causal, accumulate, fused, monkeypatch):
    _assert_backward(_bwd_configs(True, False), fused, shape, causal, accumulate, monkeypatch)


@runs_tma
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_ws_backward_matches_reference_and_pointer_path(causal, monkeypatch):
    """The warp-specialised dK/dV and dQ tiles: one loop over every visible tile, all masked
    (MHA, written: where ``ws_applies``)."""
    _assert_backward(_bwd_configs(True, True), False, SHAPES[1], causal, False, monkeypatch)


@pytest.mark.parametrize("variant", ["mha", "gqa", "accumulate", "docs"])
@pytest.mark.parametrize("kernel", ["dkdv", "dq", "fused"])
def test_backward_tma_and_ws_tiles_only_where_they_apply(kernel, variant):
    """The backward's launches (as compile_check builds them, bf16, d=64) offer TMA tiles on sm_90
    only without document spans, and warp-specialised ones only where no atomic add follows the
    loop: dK/dV for MHA written once, dQ written once, the fused kernel never."""
    from fpdt_kernels import compile_check

    (launch,) = compile_check._launches(kernel, variant, "bf16", 64, True)
    tiles = compile_check._tiles(kernel)
    assert launch.args["TMA_OK"] is (variant != "docs")
    ws_expected = variant != "docs" and kernel != "fused" and (variant == "mha" or (kernel, variant) == ("dq", "gqa"))
    for arch in (90, 80):
        usable = tiles.launch_usable(tiles.configs, launch.args, arch)
        assert any(triton_common.uses_tma(c) for c in usable) == (arch == 90 and variant != "docs"), arch
        assert any(triton_common.uses_ws(c) for c in usable) == (arch == 90 and ws_expected), arch
