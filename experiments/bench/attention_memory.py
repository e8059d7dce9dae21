"""Peak memory of one attention forward+backward: ``fpdt_kernels.flash_attention`` next to PyTorch SDPA.

Both run the same work (``[B, S, H, d]`` inputs, causal by default, ``out.backward(do)``) in
one process. On CPU the figure is the peak of live tensor bytes created during the step
(``MemoryTracker``; the inputs and ``do`` exist before it and are not counted), and ours runs
the ``torch`` backend (PyTorch's CPU flash kernel, as SDPA). On CUDA it is the allocator's peak
above the memory held before the step, and ours runs Triton. ``q`` is one ``[B, S, H, d]`` input
tensor: the step must hold at least the output and three gradients (4 q).

Usage::

    python -m experiments.bench.attention_memory                      # S=16384, H=4, d=64, fp32 and bf16
    python -m experiments.bench.attention_memory --seq-len 4096 --dtypes bf16 --causal false
"""

from __future__ import annotations

import argparse

import torch

import fpdt_kernels
from fpdt_kernels.attention.api import MAX_HEAD_DIM

from ..core.memory import MemoryTracker
from .cli import positive_int

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ours(q, k, v, causal):  # [B, S, H, d]; on CPU the torch backend, as SDPA runs the CPU kernel
    with fpdt_kernels.use_backend("torch" if q.device.type == "cpu" else None):
        return fpdt_kernels.flash_attention(q, k, v, causal=causal)


def _sdpa(q, k, v, causal):  # [B, H, S, d], SDPA's own layout
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def peak_bytes(impl: str, B: int, S: int, H: int, d: int, dtype: torch.dtype, causal: bool, device: str) -> int:
    """Peak memory of one forward+backward of ``impl`` ('ours' or 'sdpa') beyond its inputs."""
    g = torch.Generator().manual_seed(0)
    shape = (B, S, H, d) if impl == "ours" else (B, H, S, d)
    q, k, v, do = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    fn = _ours if impl == "ours" else _sdpa
    if device == "cuda":
        # One unmeasured step first: autotuning (timing every config, with its cache-flush buffer
        # and copies of the outputs) and compilation are not the kernel's memory.
        fn(q, k, v, causal).backward(do)
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(q, k, v, causal).backward(do)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with MemoryTracker(simulate_device=True, ignore=(q, k, v, do)) as tracker:
        fn(q, k, v, causal).backward(do)
    return tracker.peak["device"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=16384)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["fp32", "bf16"])
    p.add_argument("--causal", choices=("true", "false"), default="true")
    a = p.parse_args(argv)
    if a.head_dim > MAX_HEAD_DIM:
        p.error(f"--head-dim {a.head_dim}: the kernels take head dims up to {MAX_HEAD_DIM}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    causal = a.causal == "true"
    B, S, H, d = a.batch, a.seq_len, a.heads, a.head_dim
    print(f"[B, S, H, d] = [{B}, {S}, {H}, {d}], causal={causal}, device={device}")
    print(f"{'dtype':6} {'ours MiB':>9} {'sdpa MiB':>9} {'ours/sdpa':>9} {'ours (q)':>9} {'sdpa (q)':>9}")
    for name in a.dtypes:
        dtype = _DTYPES[name]
        q_bytes = B * S * H * d * dtype.itemsize
        ours = peak_bytes("ours", B, S, H, d, dtype, causal, device)
        sdpa = peak_bytes("sdpa", B, S, H, d, dtype, causal, device)
        print(
            f"{name:6} {ours / 2**20:9.2f} {sdpa / 2**20:9.2f} {ours / sdpa:9.2f} "
            f"{ours / q_bytes:9.2f} {sdpa / q_bytes:9.2f}"
        )


if __name__ == "__main__":
    main()
