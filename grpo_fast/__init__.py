"""grpo-fast: memory-lean fused GRPO loss and a single-GPU GRPO trainer."""

from .loss import GRPOLoss, GRPOLossConfig, GRPOLossOutput, compute_advantages, grpo_loss, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "GRPOLoss",
    "GRPOLossConfig",
    "GRPOLossOutput",
    "compute_advantages",
    "grpo_loss",
    "token_logprobs",
]
