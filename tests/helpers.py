"""Shared test helpers: tests run on CUDA when it is there (compiled Triton), else on CPU (interpreter)."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _bnb_repacks_on_cpu() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


# bitsandbytes repacks NF4 weights for its CPU inference kernel only on CPUs with AVX512-BF16:
# tests of what grpo-fast does about it can only fail there.
needs_bnb_cpu_repack = pytest.mark.skipif(
    torch.cuda.is_available() or not _bnb_repacks_on_cpu(),
    reason="bitsandbytes' CPU repacking of NF4 weights needs a CPU with AVX512-BF16 (and no CUDA)")
