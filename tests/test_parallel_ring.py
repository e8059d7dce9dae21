"""Ring attention and USP (Ulysses x ring) blocks against the single-process oracle.

The zigzag layout and the argument checks run in one process. The distributed checks launch one
gloo world per size (file rendezvous unique per test) and run many configurations in it: every
rank computes the `local` block on the full sequence with the same weights, runs the ring or USP
block on its zigzag shard, and compares output, input gradient and the all-reduced gradient of
every projection weight (fp32, 1e-5 relative).
"""

from __future__ import annotations

import dataclasses
import os
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist

from experiments.core.ranks import run_ranks

B, S, D = 2, 32, 8
# Packed documents over the flattened [B * S] tokens: some cross piece boundaries (pieces are 8
# tokens at R=2, 4 at R=4), one is a single token, and every row boundary is a document boundary.
DOCS = (0, 5, 18, 32, 33, 47, 64)


@pytest.fixture(autouse=True)
def _torch_backend():
    import fpdt_kernels

    with fpdt_kernels.use_backend("torch"):
        yield


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:g} * max|want| = {tol * scale:.3e}"


def _tensors(w) -> dict:
    return {k: getattr(w, k) for k in ("wqkv", "bqkv", "wo", "bo") if getattr(w, k) is not None}


def _fresh(w):
    """The same weights as new leaves (gradients of their own)."""
    return dataclasses.replace(w, **{k: t.detach().clone().requires_grad_(True) for k, t in _tensors(w).items()})


# ---------------------------------------------------------------------------------------------
# One process


def test_ring_permutation_is_zigzag():
    from parallel.layout import permutation
    from parallel.ring import ring_permutation, ring_positions

    # 4 pieces of 4: ring rank 0 holds pieces 0 and 3, ring rank 1 pieces 1 and 2.
    assert ring_permutation(16, 2).tolist() == [*range(0, 4), *range(12, 16), *range(4, 8), *range(8, 12)]
    for S_, R, U in ((48, 3, 2), (32, 4, 1), (64, 2, 4), (16, 1, 1)):
        perm = ring_permutation(S_, R, U)
        assert sorted(perm.tolist()) == list(range(S_)), (S_, R, U)
        c, n = S_ // (2 * R), S_ // (R * U)
        for j in range(R):  # rank j*U + i holds contiguous slice i of ring position j's pieces
            local = torch.cat([torch.arange(j * c, (j + 1) * c), torch.arange((2 * R - 1 - j) * c, (2 * R - j) * c)])
            for i in range(U):
                assert torch.equal(ring_positions(S_, R, U, j * U + i), local[i * n : (i + 1) * n]), (S_, R, U, j, i)
    for U in (1, 2, 4):  # one ring position: the Ulysses layout
        assert torch.equal(ring_permutation(32, 1, U), permutation(32, U, 1))


def test_bad_layouts_and_splits_raise():
    from parallel.distributed import SPGroup
    from parallel.ring import _split_ranks, ring_attention, ring_permutation, split_sp_group
    from parallel.weights import AttentionWeights

    with pytest.raises(ValueError, match="multiple of 8"):
        ring_permutation(30, 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        ring_permutation(40, 4, 2)
    with pytest.raises(ValueError, match=">= 1"):
        ring_permutation(32, 0)
    with pytest.raises(ValueError, match=r"ulysses_degree=3 must divide the sp=4 .* use one of \[1, 2, 4\]"):
        split_sp_group(SPGroup(None, 0, 4), 3)
    with pytest.raises(ValueError, match="must divide"):
        split_sp_group(SPGroup(None, 0, 4), 0)
    w = AttentionWeights.random(16, 2, 2, 8)
    with pytest.raises(ValueError, match="multiple of 2"):  # one ring rank: still two pieces
        ring_attention(torch.randn(1, 3, 16), w, group=SPGroup.single())
    # P=8, U=2: Ulysses groups are consecutive ranks, rings stride by U.
    uly, rings = _split_ranks(list(range(8, 16)), 2)
    assert uly == [[8, 9], [10, 11], [12, 13], [14, 15]]
    assert rings == [[8, 10, 12, 14], [9, 11, 13, 15]]


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_one_rank_matches_local(causal, docs):
    """R = 1 (and U = R = 1): ring and USP are plain attention over the whole sequence."""
    from parallel.attention import local_attention
    from parallel.distributed import SPGroup
    from parallel.ring import ring_attention, usp_attention
    from parallel.rotary import RotaryEmbedding
    from parallel.weights import AttentionWeights

    one = SPGroup.single()
    cu = torch.tensor(DOCS, dtype=torch.int32) if docs else None
    torch.manual_seed(3)
    w = AttentionWeights.random(4 * D, 4, 2, D, bias=True)
    rope = RotaryEmbedding(D)
    x = torch.randn(B, S, 4 * D, requires_grad=True)
    dy = torch.randn(B, S, 4 * D)
    y = local_attention(x, w, rope, causal=causal, cu_seqlens=cu)
    y.backward(dy)
    blocks = {
        "ring": lambda xx, ww: ring_attention(xx, ww, rope, group=one, causal=causal, cu_seqlens=cu),
        "usp": lambda xx, ww: usp_attention(xx, ww, rope, ulysses=one, ring=one, causal=causal, cu_seqlens=cu),
    }
    for name, block in blocks.items():
        w2, x2 = _fresh(w), x.detach().clone().requires_grad_(True)
        y2 = block(x2, w2)
        y2.backward(dy)
        _close(y2, y, f"{name}: output")
        _close(x2.grad, x.grad, f"{name}: input gradient")
        for p, p2 in zip(w.parameters(), w2.parameters(), strict=True):
            _close(p2.grad, p.grad, f"{name}: weight gradient")


def test_one_rank_bf16_autocast():
    """Under autocast the core runs on the bf16 projections with fp32 accumulation; gradients come
    back in the inputs' dtypes, close to the local block's under the same autocast."""
    from parallel.attention import local_attention
    from parallel.distributed import SPGroup
    from parallel.ring import ring_attention
    from parallel.rotary import RotaryEmbedding
    from parallel.weights import AttentionWeights

    torch.manual_seed(4)
    w = AttentionWeights.random(4 * D, 4, 1, D)
    x = torch.randn(B, S, 4 * D, requires_grad=True)
    dy = torch.randn(B, S, 4 * D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = local_attention(x, w, RotaryEmbedding(D))
    y.backward(dy)
    w2, x2 = _fresh(w), x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = ring_attention(x2, w2, RotaryEmbedding(D), group=SPGroup.single())
    y2.backward(dy)
    assert y2.dtype == torch.bfloat16 and x2.grad.dtype == torch.float32 and w2.wqkv.grad.dtype == torch.float32
    _close(y2, y, "output", tol=2e-2)
    _close(x2.grad, x.grad, "input gradient", tol=3e-2)
    _close(w2.wqkv.grad, w.wqkv.grad, "wqkv gradient", tol=3e-2)


# ---------------------------------------------------------------------------------------------
# Several processes

CONFIG_KEYS = ("kind", "U", "H", "Hkv", "causal", "bias", "rope", "docs")


def _cfg(kind, H, Hkv, U=1, causal=True, bias=False, rope=True, docs=False) -> dict:
    return dict(kind=kind, U=U, H=H, Hkv=Hkv, causal=causal, bias=bias, rope=rope, docs=docs)


def _configs(world: int) -> list[dict]:
    out = [
        _cfg("ring", 4, 4),
        _cfg("ring", 4, 2, bias=True),
        _cfg("ring", 4, 1, rope=False),
        _cfg("ring", 4, 4, causal=False, bias=True),
        _cfg("ring", 4, 2, causal=False, rope=False),
        _cfg("ring", 4, 2, docs=True, bias=True),
        _cfg("ring", 4, 4, docs=True, causal=False),
        _cfg("ring", 4, 1, docs=True, rope=False),
    ]
    if world == 4:
        out += [
            _cfg("usp", 8, 8, U=2, bias=True),
            _cfg("usp", 8, 1, U=2),  # Hkv < U: KV heads replicated over the Ulysses group
            _cfg("usp", 8, 4, U=2, causal=False),
            _cfg("usp", 8, 2, U=4, bias=True),  # replicated too
            _cfg("usp", 8, 8, U=4, rope=False),
            _cfg("usp", 8, 4, U=1),
            _cfg("usp", 8, 8, U=1, causal=False, bias=True),
            _cfg("usp", 8, 2, U=2, docs=True, bias=True),
            _cfg("usp", 8, 8, U=2, docs=True, causal=False),
            _cfg("usp", 8, 4, U=4, docs=True),
            _cfg("usp", 8, 4, U=1, docs=True),
        ]
    return out


def _check_block(cfg: dict, group, splits: dict, replica: int = 0) -> None:
    """``cfg``'s block on ``group`` against the one-process block; ``replica``: a data-parallel
    replica's index, which picks its own sequence (replicas that mixed ranks would then fail)."""
    from parallel.attention import local_attention
    from parallel.ring import ring_attention, ring_shard, usp_attention
    from parallel.rotary import RotaryEmbedding
    from parallel.weights import AttentionWeights

    torch.manual_seed(zlib.crc32(repr([cfg[k] for k in CONFIG_KEYS]).encode()) + replica)  # same on the group
    h = cfg["H"] * D
    w_ref = AttentionWeights.random(h, cfg["H"], cfg["Hkv"], D, bias=cfg["bias"])
    rope = RotaryEmbedding(D) if cfg["rope"] else None
    cu = torch.tensor(DOCS, dtype=torch.int32) if cfg["docs"] else None
    x = torch.randn(B, S, h, requires_grad=True)
    dy = torch.randn(B, S, h)
    y = local_attention(x, w_ref, rope, causal=cfg["causal"], cu_seqlens=cu)
    y.backward(dy)

    U = cfg["U"] if cfg["kind"] == "usp" else 1
    R = group.size // U
    w = _fresh(w_ref)
    x_loc = ring_shard(x.detach(), R, U, group.rank).requires_grad_(True)
    if cfg["kind"] == "ring":
        y_loc = ring_attention(x_loc, w, rope, group=group, causal=cfg["causal"], cu_seqlens=cu)
    else:
        uly, ring = splits[U]
        y_loc = usp_attention(x_loc, w, rope, ulysses=uly, ring=ring, causal=cfg["causal"], cu_seqlens=cu)
    y_loc.backward(ring_shard(dy, R, U, group.rank))
    grads = [p.grad.clone() for p in w.parameters()]
    for g in grads:
        dist.all_reduce(g, group=group.group)
    _close(y_loc, ring_shard(y.detach(), R, U, group.rank), "output")
    _close(x_loc.grad, ring_shard(x.grad, R, U, group.rank), "input gradient")
    for name, g, p in zip(("wqkv", "bqkv", "wo", "bo"), grads, w_ref.parameters(), strict=False):
        _close(g, p.grad, f"gradient of {name}")


def _check_saved(group) -> None:
    """The core saves its local q, k, v, the output and the LSE, and never a received K/V block."""
    from parallel.ring import ring_attention_core

    torch.manual_seed(5)
    n, H, Hkv = S // group.size, 4, 2
    q = torch.randn(B, n, H, D, requires_grad=True)
    k, v = (torch.randn(B, n, Hkv, D, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        o = ring_attention_core(q, k, v, group, causal=True, seq_len=S)
    shapes = sorted(tuple(t.shape) for t in saved)
    want = sorted([tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(q.shape), (B, H, n)])
    assert shapes == want, f"saved {shapes}, expected {want}"
    o.sum().backward()  # and the backward runs on them


def _check_autocast(group) -> None:
    """Under bf16 autocast the ring passes bf16 K/V and fp32 dK/dV blocks; close to the local block's."""
    from parallel.attention import local_attention
    from parallel.ring import ring_attention, ring_shard
    from parallel.rotary import RotaryEmbedding
    from parallel.weights import AttentionWeights

    torch.manual_seed(6)
    R, rank = group.size, group.rank
    w_ref = AttentionWeights.random(4 * D, 4, 2, D, bias=True)
    x = torch.randn(B, S, 4 * D, requires_grad=True)
    dy = torch.randn(B, S, 4 * D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = local_attention(x, w_ref, RotaryEmbedding(D))
    y.backward(dy)
    w, x_loc = _fresh(w_ref), ring_shard(x.detach(), R, 1, rank).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_loc = ring_attention(x_loc, w, RotaryEmbedding(D), group=group)
    y_loc.backward(ring_shard(dy, R, 1, rank))
    dw = w.wqkv.grad.clone()
    dist.all_reduce(dw, group=group.group)
    assert y_loc.dtype == torch.bfloat16 and x_loc.grad.dtype == torch.float32
    _close(y_loc, ring_shard(y.detach(), R, 1, rank), "autocast output", tol=2e-2)
    _close(x_loc.grad, ring_shard(x.grad, R, 1, rank), "autocast input gradient", tol=3e-2)
    _close(dw, w_ref.wqkv.grad, "autocast wqkv gradient", tol=3e-2)


def _worker(rank: int, world: int, rdzv: str, result_dir: str) -> None:
    os.environ["FPDT_ATTENTION_BACKEND"] = "torch"
    torch.set_num_threads(1)
    import fpdt_kernels
    from parallel.distributed import init_distributed
    from parallel.ring import _all_sp_groups, split_sp_group

    fpdt_kernels.set_backend("torch")
    group = init_distributed(rank, world, backend="gloo", init_method=f"file://{rdzv}", timeout_s=120)
    failures, splits = [], {}
    try:
        # Every rank makes the same subgroups in the same order (torch.distributed requires it).
        for U in sorted({c["U"] for c in _configs(world) if c["kind"] == "usp"}):
            uly, ring = splits[U] = split_sp_group(group, U)
            if (uly.size, ring.size, uly.rank, ring.rank) != (U, world // U, rank % U, rank // U):
                failures.append(f"split U={U}: ulysses {uly}, ring {ring}")
        if world == 4:  # data x sequence parallelism: each replica's SP group, gathered over the world
            got = _all_sp_groups([0, 1] if rank < 2 else [2, 3])
            if got != [[0, 1], [2, 3]]:
                failures.append(f"_all_sp_groups gathered {got}")
        _check_saved(group)
        if world == 2:
            _check_autocast(group)
    except Exception:
        failures.append(traceback.format_exc())
    for cfg in [] if failures else _configs(world):  # a failed setup leaves the ranks out of step
        try:
            _check_block(cfg, group, splits)
        except AssertionError as e:  # after every collective of the config: keep going
            failures.append(f"{cfg}: {e}")
        except Exception:
            failures.append(f"{cfg}: {traceback.format_exc()}")
            break  # collectives may be out of step now
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(failures))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_usp_match_local(world, tmp_path):
    run_ranks(_worker, (world, str(tmp_path / "rdzv"), str(tmp_path)), world)
    failures = []
    for rank in range(world):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        if text:
            failures.append(f"rank {rank}:\n{text}")
    assert not failures, "\n".join(failures)


def _mesh_worker(rank: int, world: int, rdzv: str, result_dir: str) -> None:
    """8 ranks as 2 data-parallel replicas of sp=4 = 2 (Ulysses) x 2 (ring): the mesh's groups and
    split_sp_group's agree, stay inside a replica, and usp on each replica's own sequence matches
    the one-process block."""
    import fpdt_kernels
    from parallel.distributed import init_distributed, init_mesh
    from parallel.ring import split_sp_group

    fpdt_kernels.set_backend("torch")
    init_distributed(rank, world, backend="gloo", init_method=f"file://{rdzv}", timeout_s=120)
    failures = []
    try:
        mesh = init_mesh(sp=4, ulysses=2)
        replica, seq_rank = divmod(rank, 4)
        got = (mesh.sp.size, mesh.sp.rank, mesh.ulysses.size, mesh.ulysses.rank, mesh.ring.size, mesh.ring.rank)
        if got != (4, seq_rank, 2, seq_rank % 2, 2, seq_rank // 2):
            failures.append(f"mesh groups (size, rank) of sp, ulysses, ring: {got}")
        uly, ring = split_sp_group(mesh.sp, 2)
        if (uly.size, uly.rank, ring.size, ring.rank) != got[2:]:
            failures.append(f"split_sp_group: ulysses {uly}, ring {ring}; the mesh's: {got[2:]}")
        for splits in ({2: (mesh.ulysses, mesh.ring)}, {2: (uly, ring)}):
            for cfg in (_cfg("usp", 8, 2, U=2, bias=True), _cfg("usp", 8, 8, U=2, docs=True, causal=False)):
                _check_block(cfg, mesh.sp, splits, replica=replica)
    except AssertionError as e:
        failures.append(str(e))
    except Exception:
        failures.append(traceback.format_exc())
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(failures))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_usp_with_data_parallel_replicas_on_eight_ranks(tmp_path):
    world = 8
    run_ranks(_mesh_worker, (world, str(tmp_path / "rdzv"), str(tmp_path)), world)
    failures = [f"rank {r}:\n{t}" for r in range(world) if (t := (tmp_path / f"rank{r}.txt").read_text())]
    assert not failures, "\n".join(failures)
