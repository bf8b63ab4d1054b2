"""Shared test helpers: tests run on CUDA when it is there (compiled Triton), else on CPU (interpreter)."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
