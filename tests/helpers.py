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


@pytest.fixture
def wide_interpreter_tiles(monkeypatch):
    """Realistic vocabularies (thousands of columns) under the interpreter: tiles of hundreds of
    columns instead of the 32 that make small odd shapes span several tiles. On CUDA: no change."""
    import dataclasses

    import grpo_fast.loss as loss_module
    from grpo_fast.kernels.config import default_kernel_config

    def wide(device, dtype=torch.bfloat16):
        cfg = default_kernel_config(device, dtype)
        if device.type == "cuda":
            return cfg
        return dataclasses.replace(cfg, row_block_v=1024, fwd_block_v=256, fwd_block_h=32, fwd_block_n=16)

    monkeypatch.setattr(loss_module, "default_kernel_config", wide)
