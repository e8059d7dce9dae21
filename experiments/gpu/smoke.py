"""GPU smoke test: seconds to find out whether a GPU box can run this package at all.

Imports the package, then runs one small ``fpdt_kernels.flash_attention`` forward and backward through
the Triton backend on CUDA (bf16, causal, GQA, an odd length and head dim) and compares output
and gradients with the float64 reference of ``fpdt_kernels.naive``. Run it first in every prepared GPU
script so a broken install fails fast instead of at a step's timeout::

    FPDT_AUTOTUNE=0 python3 -m experiments.gpu.smoke

(``FPDT_AUTOTUNE=0`` compiles one config per kernel instead of every autotune config.)
Exit status 0 if every relative error is under the bf16 bound, 1 otherwise, 2 without CUDA.
"""

from __future__ import annotations

import sys
import time

import torch

# ‖ours - ref‖ / ‖ref‖ for bf16 operands lands between 1e-3 and 1e-2; above 2e-2 is a bug.
BF16_REL_BOUND = 2e-2


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main() -> int:
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible (torch.cuda.is_available() is False)")
        return 2
    import triton

    import fpdt_kernels
    from fpdt_kernels import naive

    print(f"torch {torch.__version__} | triton {triton.__version__} | {torch.cuda.get_device_name()}")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, H, Hkv, d = 2, 333, 8, 2, 111
    q = torch.randn(B, S, H, d, device="cuda", generator=g)
    k = torch.randn(B, S, Hkv, d, device="cuda", generator=g)
    v = torch.randn(B, S, Hkv, d, device="cuda", generator=g)
    do = torch.randn(B, S, H, d, device="cuda", generator=g)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, causal=True)
        grads = torch.autograd.grad(out, leaves, do.to(dtype))
        return (out, *grads)

    ref = run(naive.flash_attention, torch.float64)
    with fpdt_kernels.use_backend("triton"):
        ours = run(fpdt_kernels.flash_attention, torch.bfloat16)
    torch.cuda.synchronize()
    ok = True
    for name, o, r in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        err = relative_error(o, r)
        good = bool(torch.isfinite(o).all()) and err < BF16_REL_BOUND
        ok &= good
        print(f"  {name}: relative error {err:.2e} {'ok' if good else 'FAIL'} (bound {BF16_REL_BOUND:.0e})")
    print(f"gpu_smoke: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
