"""Test tiers: unmarked (torch on CPU), `triton_interpret` (Triton on CPU), `gpu` (needs CUDA)."""

import os

import pytest
import torch

# Triton decides interpreter vs compiler when a kernel is decorated: set the switch before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        import triton  # noqa: F401

        has_triton = True
    except ImportError:
        has_triton = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "triton_interpret" in item.keywords and not (has_triton and (interpret or has_cuda)):
            item.add_marker(pytest.mark.skip(reason="needs triton and TRITON_INTERPRET=1 (or a GPU)"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
