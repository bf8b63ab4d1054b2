"""Fused GRPO kernels: pure tensor code (torch + Triton), no transformers/peft, nothing from grpo_fast.

Installed as ``grpo_fast.kernels``. The public, checked API lives in ``grpo_fast.loss``; the entry
points here assume validated, flattened inputs (active tokens only).
"""

from .chunked import LossSpec, TokenInputs, fused_grpo_loss, forward_logprobs
from .config import KernelConfig, default_kernel_config, triton_available, triton_usable_on

__all__ = [
    "LossSpec",
    "TokenInputs",
    "fused_grpo_loss",
    "forward_logprobs",
    "KernelConfig",
    "default_kernel_config",
    "triton_available",
    "triton_usable_on",
]
