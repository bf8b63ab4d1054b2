"""What the loss returns, in a module of its own: ``grpo_fast.loss`` (the checked API) and
``grpo_fast.reference`` (the eager oracle, which ``loss`` dispatches to) both build it, and neither
imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass
class GRPOLossOutput:
    loss: Tensor  # scalar, differentiable w.r.t. hidden (and weight / bias when they require grad)
    logps: Tensor  # [B, T] fp32 detached log-probs of the current policy (0 where the mask is 0)
    advantages: Tensor  # [B] fp32 advantages used
    metrics: dict = field(default_factory=dict)  # 0-dim detached tensors (see METRIC_NAMES)
    entropy: Optional[Tensor] = None  # [B, T] fp32 detached per-token entropies (0 where the mask is 0)


__all__ = ["GRPOLossOutput"]
