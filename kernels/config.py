"""Fixed, reasoned launch configurations (no autotuning by default) and Triton availability.

The GPU defaults target Hopper/Ampere with bf16 inputs:
- forward-only log-prob kernel: 128 x 256 logit tiles, 64-wide K steps, 3 pipeline stages,
  16 warps, 16 vocabulary slices launched in groups of 8 token blocks. Measured on an H100
  (bf16, H=3584, V=152064; see benchmarks/results/): 470-515 TFLOP/s against 750 for cuBLAS
  8192^3, where 128 x 128 tiles without grouping gave 290-355.
- row kernel (one token per program, two streaming passes over the vocabulary): 4096-wide tiles,
  so a 152k-vocab row takes 38 steps; the kernel is bandwidth bound and adds ~5-10% to the two
  chunk matmuls.
- chunk budget 512 MiB of logits: at 16k tokens the training pass's extra memory is ~0.6 GiB
  (1.6% of the eager path's 37 GiB); 1 GiB chunks were ~3% faster.
Under TRITON_INTERPRET=1 (CPU tests) blocks are tiny so that odd V and H span several tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton ships Linux wheels only; everything works without it through the torch backend.
    import triton  # noqa: F401

    _TRITON_IMPORTED = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _TRITON_IMPORTED = False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return _TRITON_IMPORTED


# The architectures the kernels are compiled and checked for (benchmarks/results/static/support-matrix.json,
# held to this by tests/test_support_matrix.py): the oldest is sm_75 (T4); bf16 from sm_80 (sm_75 has no
# bf16 arithmetic, and its bf16 launches are not in the matrix).
MIN_CAPABILITY = (7, 5)
MIN_BF16_CAPABILITY = (8, 0)
# Triton 3.3 compiles every kernel for sm_80 and newer but not the tensor-core ones (NF4 decode, decode
# attention, the on-chip log-probs) for sm_75 ("PassManager::run failed"); 3.6 compiles them all.
MIN_TRITON_FOR_CAPABILITY = {(7, 5): (3, 6)}


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton; (0, 0) without one."""
    if not _TRITON_IMPORTED:
        return (0, 0)
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def capability_supports(capability: tuple[int, int], dtype: torch.dtype | None = None,
                        triton_release: tuple[int, int] | None = None) -> bool:
    """The kernels run on a GPU of this compute capability with ``dtype`` (None: any dtype the
    trainer uses there) inputs under Triton ``triton_release`` (default: the installed one): what the
    support matrix verified."""
    capability = tuple(capability)
    if capability < MIN_CAPABILITY:
        return False
    if dtype == torch.bfloat16 and capability < MIN_BF16_CAPABILITY:
        return False
    needed = MIN_TRITON_FOR_CAPABILITY.get(capability)
    return needed is None or tuple(triton_release or triton_version()) >= needed


def triton_usable_on(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Triton kernels can run on this device (for ``dtype`` inputs, where given): CUDA of a
    capability the support matrix covers (``capability_supports``), or any device under the
    interpreter."""
    if not _TRITON_IMPORTED:
        return False
    if interpreting() and device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    return capability_supports(torch.cuda.get_device_capability(device), dtype)


@dataclass(frozen=True)
class KernelConfig:
    # forward-only log-prob kernel (tl.dot tiles)
    fwd_block_n: int = 128
    fwd_block_v: int = 256
    fwd_block_h: int = 64
    fwd_num_warps: int = 16
    fwd_num_stages: int = 3
    fwd_splits: int = 16  # vocabulary slices (partial log-sum-exps merged afterwards)
    fwd_group_n: int = 8  # token blocks launched together (L2 reuse, see logprob_kernel.py)
    # fused row kernel (streaming over the vocabulary)
    row_block_v: int = 4096
    row_num_warps: int = 8
    # budget for one chunk of logits, in bytes of the logits dtype (kernels/chunked.py rounds the chunk
    # down to whole GEMM tiles of 128 tokens)
    chunk_bytes: int = 512 * 1024 * 1024


_INTERPRETER_CONFIG = KernelConfig(
    fwd_block_n=16,
    fwd_block_v=32,
    fwd_block_h=16,
    fwd_num_warps=1,
    fwd_num_stages=1,
    fwd_splits=2,
    fwd_group_n=2,
    row_block_v=32,
    row_num_warps=1,
    chunk_bytes=512 * 1024 * 1024,
)


def default_kernel_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    if device.type != "cuda" and interpreting():
        return _INTERPRETER_CONFIG
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory: smaller tiles, fewer stages
        return KernelConfig(fwd_block_v=128, fwd_num_warps=8, fwd_num_stages=2)
    return KernelConfig()
