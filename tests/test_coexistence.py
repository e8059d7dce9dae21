"""Our kernel package lives beside Hugging Face's ``kernels`` (which transformers imports).

Each check runs in a fresh interpreter, as a user would: from the repository root (where
``python -m`` puts the checkout first on ``sys.path``), from a wheel installed without ``-e``
into a virtualenv that has transformers, and from a directory outside the checkout.
"""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _hf_kernels_installed():
    # The scenario under test needs Hugging Face's distribution (the `test` extra installs it).
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` is not installed; `pip install -e '.[test]'` installs it")


def _python(code: str, cwd: Path, env: dict | None = None, python: str = sys.executable) -> str:
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONPATH", None)  # what a user's shell has: nothing pointing into the checkout
    run = subprocess.run([python, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    return run.stdout


def test_transformers_and_ours_in_one_process_from_the_repository_root():
    out = _python(
        """
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM  # imports Hugging Face's `kernels`
        import kernels
        import fpdt_kernels
        import models

        assert hasattr(kernels, "CUDAProperties"), kernels.__file__  # theirs, not a folder of ours
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          tie_word_embeddings=False, attn_implementation="eager")
        torch.manual_seed(0)
        hf = LlamaForCausalLM(cfg).float().eval()
        ours = models.from_hf_llama(hf)
        tokens = torch.randint(0, 64, (1, 16))
        with torch.no_grad(), fpdt_kernels.use_backend("torch"):
            want = hf(tokens).logits
            got = ours(tokens)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-4, err
        print("ok", fpdt_kernels.__file__)
        """,
        cwd=REPO,
    )
    assert out.startswith("ok")


def test_wheel_installed_beside_hugging_face_kernels(tmp_path):
    """A non-editable install into a virtualenv that sees transformers and Hugging Face's
    ``kernels``: theirs still imports (with ``CUDAProperties``), ours imports from the venv, and
    the wheel holds no top-level ``kernels``; ``experiments``, which needs the clone's conf/,
    says so at import."""
    src = tmp_path / "src"  # a copy, so the build's egg-info and build/ stay out of the checkout
    shutil.copytree(
        REPO, src, ignore=shutil.ignore_patterns(".git", "results", "notebooks", "tests", "__pycache__", "*.egg-info")
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, str(src)], check=True, capture_output=True)
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    out = _python(
        """
        import sys, importlib.metadata
        import kernels
        assert hasattr(kernels, "CUDAProperties"), kernels.__file__
        import fpdt_kernels
        from fpdt_kernels import flash_attention
        files = [str(f) for f in importlib.metadata.distribution("fpdt").files]
        assert not [f for f in files if f.startswith("kernels/")], "the wheel ships a top-level kernels/"
        import models, parallel  # the library works from any install; the jobs need the clone's conf/
        try:
            import experiments.core.paths
        except ImportError as exc:
            assert "runs from a clone of the repository" in str(exc) and "pip install -e ." in str(exc), exc
        else:
            raise AssertionError("experiments imported without its conf/")
        print(fpdt_kernels.__file__)
        print(kernels.__file__)
        """,
        cwd=neutral,
        python=python,
    )
    ours, theirs = out.split()
    assert Path(ours).is_relative_to(venv), f"fpdt_kernels came from {ours}, not the venv's install"
    assert not Path(theirs).is_relative_to(REPO), theirs


def test_readme_standalone_example_runs_outside_the_checkout(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("Standalone use in your own code") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from fpdt_kernels import" in code
    out = _python(code, cwd=tmp_path, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert "torch.Size([1, 256, 8, 64])" in out
