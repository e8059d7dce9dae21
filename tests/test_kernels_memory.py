"""``flash_attention``'s forward+backward holds no more memory than PyTorch SDPA on the same work."""

import pytest
import torch

from experiments.bench.attention_memory import peak_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flash_attention_peak_memory_within_sdpa(dtype):
    # [1, S, 4, 64], causal: the shape the memory budget is stated for.
    ours = peak_bytes("ours", 1, 1024, 4, 64, dtype, True, "cpu")
    sdpa = peak_bytes("sdpa", 1, 1024, 4, 64, dtype, True, "cpu")
    assert ours <= 1.1 * sdpa, f"ours {ours / 2**20:.2f} MiB > 1.1 x SDPA {sdpa / 2**20:.2f} MiB"
    # The output and three gradients are the least any implementation must hold.
    assert ours >= 4 * 1024 * 4 * 64 * dtype.itemsize
