"""Every documented entry point works from the checkout root, where the top-level `kernels/` folder (ours, installed
as `sppo_fast.kernels`) shadows PyPI's `kernels` package that transformers (>= 5.25) imports while building a model.

Each case is a fresh subprocess with the checkout root as its working directory, so the root is on sys.path the way
`python -m ...`, `python -m pytest` and `torchrun -m ...` put it there. kernels/__init__.py hands the name over to
the real package in that case (it says why); these tests fail with "cannot import name ... from 'kernels'" without it.
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_RUN

REPO = Path(__file__).resolve().parent.parent


def _pypi_kernels_version():
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_from_root(argv, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, argv))} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return out


def test_pypi_kernels_is_installed():
    """The clash only shows with PyPI's package present: the [test] extra installs it, so the cases below are real."""
    assert _pypi_kernels_version() is not None, "install the [test] extra: it brings PyPI's `kernels`"


def test_transformers_builds_models_from_the_root():
    code = ("import kernels, sppo_fast.kernels as ours; from transformers import LlamaForCausalLM, LlamaConfig, "
            "Qwen2ForCausalLM, Qwen2Config\n"
            "cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, "
            "num_key_value_heads=1, vocab_size=64)\n"
            "LlamaForCausalLM(LlamaConfig(**cfg)); Qwen2ForCausalLM(Qwen2Config(**cfg))\n"
            "assert hasattr(kernels, 'get_kernel') and hasattr(kernels, 'CUDAProperties'), kernels.__file__\n"
            "assert ours.token_logprobs and ours.__name__ == 'sppo_fast.kernels'\n"
            "print(kernels.__file__)")
    out = run_from_root([sys.executable, "-c", code])
    assert Path(out.stdout.strip().splitlines()[-1]).resolve().parent != REPO / "kernels"


def test_top_level_kernels_without_the_pypi_package_stays_empty():
    """With no PyPI `kernels` on the path (`-S`: no site-packages), the name resolves to our folder, which stays empty
    (no __version__: transformers' probe reads it as not installed) and registers none of our torch.library ops."""
    code = ("import sys, kernels; assert kernels.__all__ == [] and not hasattr(kernels, '__version__'), dir(kernels)\n"
            "assert 'torch' not in sys.modules; print(kernels.__file__)")
    out = run_from_root([sys.executable, "-S", "-c", code])
    assert Path(out.stdout.strip()).resolve() == REPO / "kernels" / "__init__.py"


def test_python_m_train_from_the_root(tmp_path):
    run_from_root([sys.executable, "-m", "sppo_fast.train", *TINY_RUN, "--steps", "1", "--out-dir", str(tmp_path),
                   "--run-name", "m"])
    assert (tmp_path / "m").is_dir()


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed beside this Python")
def test_torchrun_train_from_the_root(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    run_from_root([torchrun, "--nproc-per-node", "1", "-m", "sppo_fast.train", *TINY_RUN, "--steps", "1",
                   "--out-dir", str(tmp_path), "--run-name", "t"])
    assert (tmp_path / "t").is_dir()


def test_python_m_pytest_from_the_root():
    """`python -m pytest` puts the root first on sys.path: a test that builds a Llama model must still pass."""
    run_from_root([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "tests/test_hf.py::test_tied_head_is_the_embedding"])
