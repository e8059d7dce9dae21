"""Multi-process checks of the Ulysses and FPDT blocks against the single-process oracle.

One launch per world size (gloo on CPU, file rendezvous unique per test) runs many
configurations: every rank computes the `local` block on the full sequence with the same
weights, runs the strategy on its shard, and compares output, input gradient and the
all-reduced gradient of every projection weight (fp32, ~1e-5 relative).
"""

from __future__ import annotations

import dataclasses
import os
import traceback
import warnings
import zlib

import pytest
import torch
import torch.distributed as dist

from experiments.core.ranks import run_ranks

CONFIG_KEYS = ("kind", "H", "Hkv", "chunks", "offload", "causal", "bias", "rope", "order")


def _cfg(kind, H, Hkv, chunks=1, offload=False, causal=True, bias=False, rope=True, order="auto") -> dict:
    return dict(kind=kind, H=H, Hkv=Hkv, chunks=chunks, offload=offload, causal=causal, bias=bias, rope=rope,
                order=order)  # fmt: skip


def _configs(world: int) -> list[dict]:
    H = 2 * world
    mha, gqa, rep = H, H // 2, max(1, world // 2)  # rep: Hkv < P, KV heads replicated
    out = [_cfg("ulysses", H, Hkv, bias=Hkv == gqa) for Hkv in (mha, gqa, rep)]
    out.append(_cfg("ulysses", H, gqa, causal=False))
    for Hkv in (mha, gqa):
        for chunks in (1, 2, 4):
            for offload in (True, False):
                out.append(_cfg("fpdt", H, Hkv, chunks, offload, bias=chunks == 2))
    out.append(_cfg("fpdt", H, rep, 2, offload=True, bias=True))
    out.append(_cfg("fpdt", H, rep, 4, offload=False))
    out.append(_cfg("fpdt", H, gqa, 2, offload=True, causal=False))
    out.append(_cfg("fpdt", H, mha, 4, offload=True, rope=False))
    # Both backward orders whatever auto would pick: GQA, MHA, replicated K/V, non-causal.
    for Hkv, causal in ((gqa, True), (mha, True), (rep, True), (gqa, False)):
        for order in ("kv", "query"):
            out.append(_cfg("fpdt", H, Hkv, 4, offload=True, causal=causal, order=order))
    return out


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:g} * max|want| = {tol * scale:.3e}"


def _check_all_to_all(group) -> list[str]:
    from parallel import all_to_all as a2a

    P, r = group.size, group.rank
    failures = []
    torch.manual_seed(1)
    x_full = torch.randn(2, 4 * P, 2 * P, 3)  # [B, S, H, d], same on every rank
    x = x_full[:, r * 4 : (r + 1) * 4].clone().requires_grad_(True)
    y = a2a.seq_to_head(x, group)  # [B, S, H/P, d]
    if not torch.equal(y, x_full[:, :, r * 2 : (r + 1) * 2]):
        failures.append("seq_to_head does not give the rank's head slice of the full sequence")
    if not torch.equal(a2a.head_to_seq(y, group), x):
        failures.append("head_to_seq(seq_to_head(x)) != x")
    g = torch.randn_like(y)
    y.backward(g)
    if not torch.equal(x.grad, a2a.head_to_seq(g, group)):
        failures.append("the backward of seq_to_head is not head_to_seq")
    # KV replication (P % Hkv == 0): rank r gets KV head r // (P/Hkv); the backward sums replicas.
    if P > 1:
        k_full = torch.randn(2, 4 * P, 1, 3)
        k = k_full[:, r * 4 : (r + 1) * 4].clone().requires_grad_(True)
        kh = a2a.kv_seq_to_head(k, group)
        if not torch.equal(kh, k_full):
            failures.append("kv_seq_to_head with Hkv=1 does not replicate the KV head")
        kh.backward(torch.ones_like(kh))
        if not torch.equal(k.grad, torch.full_like(k, float(P))):
            failures.append("kv_seq_to_head backward does not sum the P replicas")
    failures += _check_into(group)
    return failures


def _check_into(group) -> list[str]:
    """The allocation-free all-to-alls give the allocating ones' bits, through one send/recv pair."""
    from parallel import all_to_all as a2a

    P, failures = group.size, []
    torch.manual_seed(2)
    send, recv = (
        torch.empty(2 * 4 * 2 * P * 3, dtype=torch.bfloat16),
        torch.empty(2 * 4 * 2 * P * 3, dtype=torch.bfloat16),
    )
    x = torch.randn(2, 4, 2 * P, 3).to(torch.bfloat16)[:, :, :]  # [B, s, H, d]
    out = torch.full((2, 4 * P, 2, 3), float("nan"), dtype=torch.bfloat16)
    a2a.seq_to_head_into(x, out, group, send, recv)
    if not torch.equal(out, a2a._seq_to_head(x, group)):
        failures.append("seq_to_head_into != seq_to_head")
    back = torch.full_like(x, float("nan"))
    g32 = torch.randn(2, 4 * P, 2, 3)  # an fp32 gradient, cast on its way
    a2a.head_to_seq_into(g32, back, group, send, recv)
    if not torch.equal(back, a2a._head_to_seq(g32.to(torch.bfloat16), group)):
        failures.append("head_to_seq_into != head_to_seq of the cast gradient")
    for n_kv in {1, max(1, P // 2), P}:
        k = torch.randn(2, 4, n_kv, 3).to(torch.bfloat16)
        kh = torch.full((2, 4 * P, a2a.kv_heads_per_rank(n_kv, P), 3), float("nan"), dtype=torch.bfloat16)
        a2a.kv_seq_to_head_into(k, kh, group, send, recv)
        if not torch.equal(kh, a2a.kv_seq_to_head(k, group)):
            failures.append(f"kv_seq_to_head_into != kv_seq_to_head (Hkv={n_kv})")
        dk = torch.randn(kh.shape)
        dkl = torch.full_like(k, float("nan"))
        gathered = torch.empty(dk.numel(), dtype=torch.bfloat16)
        a2a.kv_head_to_seq_grad_into(dk, dkl, group, n_kv, send, recv, gathered)
        if not torch.equal(dkl, a2a.kv_head_to_seq_grad(dk.to(torch.bfloat16), group, n_kv)):
            failures.append(f"kv_head_to_seq_grad_into != kv_head_to_seq_grad (Hkv={n_kv})")
    return failures


def _tensors(w) -> dict:
    return {k: getattr(w, k) for k in ("wqkv", "bqkv", "wo", "bo") if getattr(w, k) is not None}


def _check_block(cfg: dict, group) -> None:
    from parallel import AttentionStrategy, AttentionWeights, HostStore, RotaryEmbedding
    from parallel.attention import local_attention

    torch.manual_seed(zlib.crc32(repr([cfg[k] for k in CONFIG_KEYS]).encode()))  # same on all ranks
    B, S, d = 2, 32, 8
    h = cfg["H"] * d
    w_ref = AttentionWeights.random(h, cfg["H"], cfg["Hkv"], d, bias=cfg["bias"])
    rope = RotaryEmbedding(d) if cfg["rope"] else None
    x = torch.randn(B, S, h, requires_grad=True)
    dy = torch.randn(B, S, h)
    y = local_attention(x, w_ref, rope, causal=cfg["causal"])
    y.backward(dy)

    store = HostStore() if cfg["offload"] else None
    strategy = AttentionStrategy(cfg["kind"], group, chunks=cfg["chunks"], offload=cfg["offload"], causal=cfg["causal"],
                                 store=store, backward_order=cfg["order"])  # fmt: skip
    w = dataclasses.replace(w_ref, **{k: t.detach().clone().requires_grad_(True) for k, t in _tensors(w_ref).items()})
    x_loc = strategy.shard(x.detach()).requires_grad_(True)
    y_loc = strategy(x_loc, w, rope)
    y_loc.backward(strategy.shard(dy))
    grads = [p.grad.clone() for p in w.parameters()]
    for g in grads:
        dist.all_reduce(g, group=group.group)
    _close(y_loc, strategy.shard(y.detach()), "output")
    _close(x_loc.grad, strategy.shard(x.grad), "input gradient")
    for name, g, p in zip(("wqkv", "bqkv", "wo", "bo"), grads, w_ref.parameters(), strict=False):
        _close(g, p.grad, f"gradient of {name}")
    if store is not None:
        assert store.bytes_in_use == 0, f"host store still holds {store.bytes_in_use} bytes after the backward"


def _worker(rank: int, world: int, rdzv: str, result_dir: str) -> None:
    os.environ["FPDT_ATTENTION_BACKEND"] = "torch"
    torch.set_num_threads(1)
    # The FPDT device ring is sized from the schedule: running dry would be a sizing bug.
    warnings.filterwarnings("error", message="no free device slot", category=RuntimeWarning)
    import fpdt_kernels
    from parallel import init_distributed

    fpdt_kernels.set_backend("torch")
    group = init_distributed(rank, world, backend="gloo", init_method=f"file://{rdzv}", timeout_s=120)
    failures = _check_all_to_all(group)
    for cfg in _configs(world):
        try:
            _check_block(cfg, group)
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
def test_blocks_match_local(world, tmp_path):
    run_ranks(_worker, (world, str(tmp_path / "rdzv"), str(tmp_path)), world)
    failures = []
    for rank in range(world):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        if text:
            failures.append(f"rank {rank}:\n{text}")
    assert not failures, "\n".join(failures)
    assert len(_configs(world)) >= 17
