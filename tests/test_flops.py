from types import SimpleNamespace

import pytest

from experiments.core.flops import megatron_formula, step_flops


def _gpt(L, h, H, V):
    return SimpleNamespace(
        hidden=h, ffn_hidden=4 * h, head_dim=h // H, n_heads=H, n_kv_heads=H, n_layers=L,
        vocab_size=V, activation="gelu",
    )  # fmt: skip


@pytest.mark.parametrize("L,h,H,V,S,B", [(32, 4096, 32, 50304, 2048, 1), (40, 5120, 40, 50304, 262144, 2)])
def test_gpt_matches_megatron_formula(L, h, H, V, S, B):
    flops = step_flops(_gpt(L, h, H, V), S, B)
    assert flops.full == pytest.approx(megatron_formula(B, S, L, h, V), rel=1e-12)
    # Causal counts half of the attention square and nothing else changes.
    assert flops.full - flops.causal == pytest.approx(flops.attention_full / 2)


def test_known_value_gpt3_175b():
    # GPT-3 175B, one 2048-token sequence, summed by hand: 6 * N * S with N = 12 L h^2 =
    # 173.95e9 non-embedding weights -> 2.1375e15; attention 12 S^2 h L -> 5.94e13; LM head
    # 6 S h V -> 7.59e12; total 2.2044e15.
    cfg = _gpt(96, 12288, 96, 50257)
    assert step_flops(cfg, 2048).full == pytest.approx(2.2044e15, rel=1e-4)


def test_gqa_and_swiglu_are_counted():
    llama8b = SimpleNamespace(
        hidden=4096, ffn_hidden=14336, head_dim=128, n_heads=32, n_kv_heads=8, n_layers=32,
        vocab_size=128256, activation="swiglu",
    )  # fmt: skip
    S = 8192
    got = step_flops(llama8b, S)
    # 6 * N_matmul * tokens for the dense part: N = L*(h*(H+2Hkv)d + H*d*h + 3*h*ffn) + h*V.
    n_matmul = 32 * (4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 14336) + 4096 * 128256
    assert got.dense == pytest.approx(6 * n_matmul * S, rel=1e-12)
    assert got.attention_full == pytest.approx(3 * 32 * 4 * S * S * 32 * 128, rel=1e-12)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="seq_len=0"):
        step_flops(_gpt(2, 64, 4, 100), 0)
