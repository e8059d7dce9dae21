"""FPDT token layout, rotary embedding and head-count checks (single process)."""

import pytest
import torch

from parallel import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_backward,
    check_heads,
    check_layout,
    inverse_permutation,
    local_positions,
    permutation,
    shard,
    unshard,
)


def test_worked_example_from_the_paper():
    # S=16, P=2, u=2: rank 0 holds 0-3 and 8-11, rank 1 holds 4-7 and 12-15.
    assert local_positions(16, 2, 2, 0).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert local_positions(16, 2, 2, 1).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


@pytest.mark.parametrize("P,u", [(1, 1), (1, 4), (2, 1), (2, 4), (4, 2), (4, 16), (3, 5)])
def test_permutation_round_trip_and_chunk_contiguity(P, u):
    S = P * u * 3
    perm, inv = permutation(S, P, u), inverse_permutation(S, P, u)
    assert sorted(perm.tolist()) == list(range(S))
    assert torch.equal(perm[inv], torch.arange(S))
    x = torch.randn(2, S, 5)
    shards = [shard(x, P, u, r) for r in range(P)]
    assert torch.equal(unshard(shards, u), x)
    # Positions are global, and local chunk j of every rank, concatenated in rank order, is the
    # contiguous global span [j*C, (j+1)*C) (what the per-chunk all-to-all rebuilds).
    c = S // (P * u)
    for j in range(u):
        gathered = torch.cat([local_positions(S, P, u, r)[j * c : (j + 1) * c] for r in range(P)])
        assert gathered.tolist() == list(range(j * P * c, (j + 1) * P * c))
    # Labels follow the same permutation as tokens.
    labels = torch.arange(S)[None].expand(2, S)
    assert torch.equal(shard(labels, P, u, P - 1)[0], local_positions(S, P, u, P - 1))


def test_u1_is_the_ulysses_layout():
    assert local_positions(12, 3, 1, 1).tolist() == [4, 5, 6, 7]


def test_layout_errors():
    with pytest.raises(ValueError, match=r"seq_len=1000 is not divisible by gpus\*chunks=16; use a multiple of 16"):
        check_layout(1000, 4, 4)
    with pytest.raises(ValueError, match=r"seq_len=16, gpus=2 and chunks=0 must all be >= 1"):
        check_layout(16, 2, 0)
    with pytest.raises(ValueError, match=r"seq_len=0, gpus=2 and chunks=1 must all be >= 1"):
        check_layout(0, 2, 1)
    with pytest.raises(ValueError, match="rank=2 is outside 0..1"):
        local_positions(16, 2, 2, 2)


def test_head_errors():
    check_heads(8, 8, 4)
    check_heads(8, 4, 4)
    check_heads(8, 2, 4)  # replication
    with pytest.raises(ValueError, match=r"H=6 query heads are not divisible by P=4 .* use P in \[1, 2, 3, 6\]"):
        check_heads(6, 6, 4)
    with pytest.raises(ValueError, match=r"Hkv=3 KV heads cannot be split over P=2 .* use P in \[1, 3, 6\]"):
        check_heads(6, 3, 2)
    with pytest.raises(ValueError, match="positive multiple"):
        check_heads(6, 4, 1)


def test_rotary_matches_complex_rotation_and_backward_is_the_transpose():
    d, S = 8, 11
    rope = RotaryEmbedding(d, base=100.0)
    pos = torch.arange(5, 5 + S)
    cos, sin = rope.tables(pos)
    c2, s2 = rope.span(5, S)
    assert torch.equal(cos, c2) and torch.equal(sin, s2)
    x = torch.randn(2, S, 3, d, dtype=torch.float64)
    y = apply_rotary(x, cos.double(), sin.double())
    # rotate-half: pair (x[i], x[i + d/2]) is the complex number x[i] + i*x[i+d/2] times e^{i*theta}
    theta = pos.double()[:, None] * 100.0 ** (-torch.arange(d // 2, dtype=torch.float64) / (d // 2))
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(theta), theta)[None, :, None]
    torch.testing.assert_close(y, torch.cat([z.real, z.imag], dim=-1), rtol=1e-6, atol=1e-6)
    xr = x.clone().requires_grad_(True)
    dy = torch.randn_like(y)
    apply_rotary(xr, cos.double(), sin.double()).backward(dy)
    torch.testing.assert_close(apply_rotary_backward(dy, cos.double(), sin.double()), xr.grad, rtol=1e-6, atol=1e-6)


def test_rotary_positions_are_exact_at_long_context():
    rope = RotaryEmbedding(4)
    cos, _ = rope.tables(torch.tensor([2_000_003]))
    assert abs(cos[0, 0].item() - torch.tensor(2_000_003.0, dtype=torch.float64).cos().item()) < 1e-6
    with pytest.raises(ValueError, match="even head dim"):
        RotaryEmbedding(7)
