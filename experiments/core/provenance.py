"""Where a number came from: the commit, the library versions and the device, for every row."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch

from .paths import REPO

COMMIT_ENV_VAR = "FPDT_COMMIT"


def git_commit() -> str:
    """``FPDT_COMMIT`` if set (GPU boxes get a copy of the tree without ``.git``), else ``HEAD``'s
    short hash with ``-dirty`` when tracked files differ from it, else ``unknown``."""
    if os.environ.get(COMMIT_ENV_VAR):
        return os.environ[COMMIT_ENV_VAR]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)  # fmt: skip
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True,
                               timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """``torch_version`` and ``triton_version`` (``None`` where Triton is not installed)."""
    return {"torch_version": torch.__version__, "triton_version": package_version("triton")}


def device_name(cuda: bool | None = None) -> str:
    """The GPU's name, or ``cpu (<processor>, <n> cores)``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
