"""Hardware presets (``conf/hardware/*.yaml``): detection by GPU name, and the CPU's measured peak."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "hardware"

# Substrings of torch.cuda.get_device_name() -> preset name, first match wins.
_GPU_NAMES = [
    (("H200",), "h200"),
    (("H100",), "h100-sxm"),
    (("A100", "80GB"), "a100-80g"),
    (("A100",), "a100-40g"),
]


def load_preset(name: str) -> dict:
    path = CONF_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise ValueError(f"unknown hardware preset {name!r}; use one of {known}")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    data.pop("defaults", None)
    return data


def detect_preset_name() -> str:
    """The preset for this machine's first GPU, or ``cpu``. Unknown GPUs raise with advice."""
    if not torch.cuda.is_available():
        return "cpu"
    gpu = torch.cuda.get_device_name(0)
    for parts, preset in _GPU_NAMES:
        if all(p in gpu for p in parts):
            return preset
    raise ValueError(
        f"no hardware preset matches GPU {gpu!r}; pass hardware=<preset> (see conf/hardware/) or add "
        "a preset with its peak TFLOP/s and memory"
    )


def resolve_hardware(hw: dict) -> dict:
    """Fill an ``auto`` selection from the detected preset; other presets pass through."""
    hw = dict(hw)
    if hw.get("name") == "auto":
        hw = {**load_preset(detect_preset_name()), "detected": True}
    return hw


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of an ``n x n`` matmul on the CPU: the CPU's stand-in for a datasheet peak."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * reps / elapsed / 1e12
