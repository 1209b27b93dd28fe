"""Test-session setup shared by all test files."""

from __future__ import annotations

import importlib.util
import os
import sys

# `python -m pytest` puts the repository root on sys.path, where the folder kernels/ (imported
# as fastdp.kernels) would hide the Hugging Face package `kernels` that transformers imports
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]


def pytest_configure(config):
    """On a machine without CUDA, import Triton in interpreter mode, then restore the env.

    ``triton.language`` decides at import time whether its own helpers (tl.zeros, tl.sum,
    tl.randn, ...) are interpreted, so the kernel tests can only switch TRITON_INTERPRET on
    per test (kernel_testing.enable_interpreter) if Triton was first imported with it on.
    Restoring the variable keeps every other test on the default (torch) CPU path.
    """
    if importlib.util.find_spec("triton") is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where no CUDA device is present."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
