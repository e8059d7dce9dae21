"""Training precision, by Lightning's names (the config key ``precision``).

| name | parameters (master) | compute | gradients, reduction | AdamW moments | bytes/param |
|---|---|---|---|---|---|
| ``bf16-mixed`` | fp32 | bf16 | fp32 | fp32 | 16 (4 + 4 + 8) |
| ``32-true`` | fp32 | fp32 | fp32 | fp32 | 16 |
| ``bf16-true`` | bf16 | bf16 | bf16 | bf16 | 8 (2 + 2 + 4) |

``bf16-mixed`` with FSDP is FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
over fp32 sharded parameters (bf16 copies of a layer exist only while it runs). Without FSDP it
is ``torch.autocast(bf16)`` over fp32 parameters: the parameters are the master weights, the
matmuls run in bf16, gradients arrive and are all-reduced in fp32. Autocast rather than separate
bf16 parameter copies because it keeps one set of parameters (16 bytes per parameter, where
bf16 copies plus fp32 masters take 18) and the optimizer steps ``model.parameters()`` as with
any other precision. Pure bf16 AdamW (``bf16-true``) loses updates smaller than bf16's
resolution of the weight; it is kept for comparison with earlier runs. ``fp16-mixed`` is not
offered: it needs a gradient scaler on both the FSDP and the autocast path and bf16 does not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")
# The old `dtype` key, still accepted: what each of its values meant.
DTYPE_TO_PRECISION = {"bf16": "bf16-true", "fp32": "32-true"}


@dataclass(frozen=True)
class Precision:
    name: str
    param_dtype: torch.dtype  # what the parameters (and AdamW's moments) are stored in
    compute_dtype: torch.dtype  # what the matmuls run in

    @property
    def mixed(self) -> bool:
        return self.param_dtype != self.compute_dtype

    @property
    def bytes_per_param(self) -> int:
        """Parameters + gradients + the two AdamW moments, all in ``param_dtype``."""
        return 4 * self.param_dtype.itemsize

    def fsdp_mixed_precision(self) -> torch.dtype | None:
        """The compute dtype FSDP2 casts parameters to (``None``: no cast)."""
        return self.compute_dtype if self.mixed else None

    def autocast(self, device: torch.device, fsdp: bool):
        """The context the forward runs in: autocast for mixed precision without FSDP."""
        if self.mixed and not fsdp:
            return torch.autocast(device_type=device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()


_TABLE = {
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "bf16-true": (torch.bfloat16, torch.bfloat16),
    "32-true": (torch.float32, torch.float32),
}


def check_residual_fp32(residual_fp32: bool, fsdp: bool, fsdp_key: str = "parallel.fsdp") -> None:
    """An fp32 residual stream needs ``fsdp=false``: FSDP2's mixed precision casts every block's
    input to bf16, so the residual stream is bf16 there whatever the setting says."""
    if residual_fp32 and fsdp:
        raise ValueError(f"residual_fp32=true needs {fsdp_key}=false: FSDP2's mixed precision casts every "
                         "block's input to bf16, so the residual stream is bf16 there whatever this says")  # fmt: skip


def resolve_precision(name: str, cuda: bool, dtype: str = "auto") -> Precision:
    """``auto`` is ``bf16-mixed`` on CUDA and ``32-true`` on CPU (the CPU kernels and the simulated
    device run fp32). ``dtype`` is the old key: ``bf16`` means ``bf16-true``, ``fp32`` ``32-true``."""
    if dtype != "auto":
        if dtype not in DTYPE_TO_PRECISION:
            raise ValueError(f"dtype={dtype!r} is no longer a training setting; use precision= one of {PRECISIONS}")
        from_dtype = DTYPE_TO_PRECISION[dtype]
        if name not in ("auto", from_dtype):
            raise ValueError(f"dtype={dtype} (precision={from_dtype}) contradicts precision={name}; set only precision")
        name = from_dtype
    if name == "auto":
        name = "bf16-mixed" if cuda else "32-true"
    if name == "fp16-mixed":
        raise ValueError("precision='fp16-mixed' is not offered (fp16 needs a gradient scaler, bf16 does not); "
                         "use bf16-mixed, which keeps the same fp32 master weights")  # fmt: skip
    if name not in _TABLE:
        raise ValueError(f"precision={name!r}; use one of {PRECISIONS} or auto")
    return Precision(name, *_TABLE[name])
