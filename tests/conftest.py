"""Test setup: without CUDA, Triton kernels run in the interpreter (set before they are defined)."""

import os
import sys
from pathlib import Path

import torch

# `benchmarks/` is a directory of the repository, not an installed package: tests import it
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # a kernel that cannot compile fails its tests instead of passing on its torch fallback
    os.environ.setdefault("GRPO_FAST_STRICT", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
