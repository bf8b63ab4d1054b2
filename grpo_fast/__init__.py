"""grpo-fast: memory-lean fused GRPO loss and a single-GPU GRPO trainer.

``import grpo_fast`` loads only the loss (torch and the kernels); the trainer's names
(``GRPOConfig``, ``load_config``, ``train``) import transformers and peft on first use.
"""

from .loss import GRPOLoss, GRPOLossConfig, GRPOLossOutput, compute_advantages, grpo_loss, token_logprobs

__version__ = "0.1.0"

_TRAINER_NAMES = {"GRPOConfig": "config", "load_config": "config", "train": "trainer"}


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_TRAINER_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GRPOConfig",
    "GRPOLoss",
    "GRPOLossConfig",
    "GRPOLossOutput",
    "compute_advantages",
    "grpo_loss",
    "load_config",
    "token_logprobs",
    "train",
]
