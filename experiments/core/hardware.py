"""Hardware presets (``conf/hardware/*.yaml``): detection by GPU name, and the CPU's measured peak."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .paths import CONF_DIR
from .tables import write_json

PRESETS_DIR = CONF_DIR / "hardware"
CACHE_ENV_VAR = "FPDT_CACHE_DIR"

# Substrings of torch.cuda.get_device_name() -> preset name, first match wins.
_GPU_NAMES = [
    (("H200",), "h200"),
    (("H100",), "h100-sxm"),
    (("A100", "80GB"), "a100-80g"),
    (("A100",), "a100-40g"),
]


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
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


# A preset's fields: the ones that are numbers must be positive (the planner's efficiencies at most 1).
HARDWARE_NUMBERS = ("peak_tflops", "device_memory_gib", "host_memory_gib", "pcie_gbps", "nvlink_gbps",
                    "dense_efficiency", "attention_efficiency")  # fmt: skip
HARDWARE_FIELDS = ("name", "source", "detected", *HARDWARE_NUMBERS)


def positive(name: str, value, at_most: float | None = None) -> None:
    """Raise unless ``value`` is a finite number > 0 (and <= ``at_most``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (at_most is not None and value > at_most):
        limit = f" and at most {at_most}" if at_most is not None else ""
        raise ValueError(f"{name}={value!r} must be a number > 0{limit}")


def check_hardware_numbers(hw: dict) -> None:
    """Every numeric field a preset (or its command-line override) gives is a number > 0."""
    for key in HARDWARE_NUMBERS:
        if hw.get(key) is not None:
            positive(f"hardware.{key}", hw[key], 1.0 if key.endswith("efficiency") else None)


def over_preset(name: str, fields: dict) -> tuple[dict, dict]:
    """``(preset name's fields with the given ones over them, the preset as its file has it)``;
    a field given empty (None or "") keeps the preset's."""
    preset = load_preset(name)
    given = {k: v for k, v in fields.items() if k != "name" and v is not None and v != ""}
    return {**preset, **given}, preset


def resolve_hardware(hw: dict) -> dict:
    """Fill an ``auto`` selection from the detected preset, keeping the fields given with it
    (``hardware.peak_tflops=...`` on the command line) over the preset's; check every number.
    Numbers that differ from the preset's file are named in ``source``, beside the preset's own."""
    auto = hw.get("name") == "auto"
    hw, preset = over_preset(detect_preset_name() if auto else hw["name"], hw)
    if auto:
        hw["detected"] = True
    check_hardware_numbers(hw)
    changed = [f"hardware.{k}={hw[k]}" for k in HARDWARE_NUMBERS if hw.get(k) is not None and hw[k] != preset.get(k)]
    if changed:
        own = f": {preset['source']}" if preset.get("source") else ""
        hw["source"] = f"{', '.join(changed)} given, over preset {hw['name']}'s values ({hw['name']}{own})"
    return hw


def _cache_path() -> Path:
    root = os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "fpdt")
    return Path(root) / "cpu_peak.json"


def _machine_id() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()}|{cpu}|{os.cpu_count()} cores|torch {torch.__version__}"


def cpu_peak_tflops() -> tuple[float, str]:
    """This machine's fp32 matmul TFLOP/s with every core, measured once and cached per machine.

    The CPU has no datasheet peak to divide by, so MFU on CPU uses this measurement. Measuring it
    at every sweep point (under whatever load that point's ranks put on the cores) made the MFU
    of neighbouring points jump 2x; one measurement per machine, taken by the controller before
    any rank starts, keeps points comparable. Returns ``(tflops, how)``.
    """
    path, machine = _cache_path(), _machine_id()
    try:
        cached = json.loads(path.read_text())
        if cached.get("machine") == machine:
            return float(cached["tflops"]), f"{cached['how']}; cached in {path}"
    except (OSError, ValueError, KeyError):
        pass
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        tflops = measure_matmul_tflops(torch.float32, seconds=1.0)
    finally:
        torch.set_num_threads(threads)
    how = f"measured once on this machine: fp32 2048^3 matmul with {os.cpu_count()} threads"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"machine": machine, "tflops": tflops, "how": how})
    except OSError:
        how += " (cache not writable)"
    return tflops, how


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
