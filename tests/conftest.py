"""Test configuration.

Without CUDA the Triton kernels run in the interpreter, which must be switched on before triton
is imported anywhere; this file is imported by pytest before any test module.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Most of the suite is the Triton interpreter (one core per process) or small torch ops; the rest
# spawns ranks that set their own thread counts. With one pytest worker per core (`-n auto`, see
# pyproject.toml), each worker's torch gets its share of the cores: more threads than cores makes
# OpenMP's waiting threads spin on cores another worker needs.
_MAX_WORKERS = 8  # each worker is a torch process (~0.5 GB) whose tests may spawn up to 8 ranks


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pytest_xdist_auto_num_workers(config):
    return max(1, min(_cores(), _MAX_WORKERS))


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, _cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    """Without CUDA most kernel tests run in the interpreter: one that cannot run here stops the
    suite with its fix, instead of failing every kernel test inside Triton."""
    if _HAS_CUDA:
        return
    from fpdt_kernels.backend import check_interpreter_runs

    try:
        check_interpreter_runs()
    except RuntimeError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def nan_buffer():
    """Factory fixture: ``nan_buffer(shape, dtype, device)`` returns a NaN-filled tensor."""

    def make(shape, dtype=torch.float32, device="cpu"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    return make


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-rank gloo process group (FSDP needs one), torn down afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
