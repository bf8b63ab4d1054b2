"""Eager reference: the GRPO loss as TRL's GRPOTrainer computes it, logits materialised.

This is today's baseline and the test oracle for the fused backends: plain PyTorch, autograd for
the gradients, every intermediate of size [B, T, V] kept (logits in the input dtype, then fp32).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .logits import LogitTransform


def reference_logprobs(hidden: Tensor, weight: Tensor, completion_ids: Tensor, bias: Optional[Tensor],
                       temperature: float, logit_scale: float = 1.0,
                       logit_softcap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    # logits in the input dtype, as a Hugging Face model returns them to TRL
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    # the model's transform, in fp32 at least (fp64 stays fp64: the tests' oracle runs this function
    # in double precision)
    logits = LogitTransform(logit_scale, logit_softcap).apply(logits) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logps = log_probs.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropy


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    x = x.to(mask.dtype)
    if x.shape[1] == 1:  # sequence level: one value per sequence
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def reference_grpo_loss(hidden, weight, completion_ids, mask, advantages, old_logps, ref_logps, bias, config):
    from .loss import GRPOLossOutput

    B, T = mask.shape
    logps, entropy = reference_logprobs(hidden, weight, completion_ids, bias, config.temperature,
                                        config.logit_scale, config.logit_softcap)
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    log_ratio = logps - old
    if config.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    eps_high = config.epsilon_low if config.epsilon_high is None else config.epsilon_high
    coef_1 = torch.exp(log_ratio)
    kl_ratio = coef_1  # before the delta cap, as TRL multiplies it
    coef_2 = torch.clamp(coef_1, 1 - config.epsilon_low, 1 + eps_high)
    if config.delta is not None:
        coef_1 = torch.clamp(coef_1, max=config.delta)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    metrics = {}
    if ref_logps is not None:
        diff = ref_logps.to(logps.dtype) - logps
        per_token_kl = torch.exp(diff) - diff - 1
        if config.kl_bias_correction:
            per_token_kl = per_token_kl * kl_ratio
        if config.beta != 0.0:
            per_token_loss = per_token_loss + config.beta * per_token_kl
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)
    per_token_loss = per_token_loss.expand(B, T) if per_token_loss.shape[1] == 1 else per_token_loss

    if config.loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif config.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif config.loss_type == "dr_grpo":
        length = config.max_completion_length if config.max_completion_length is not None else T
        loss = (per_token_loss * mask).sum() / (B * length)
    else:  # dapo
        normaliser = config.num_items_in_batch if config.num_items_in_batch is not None else mask.sum().clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / normaliser

    low = (coef_1 < 1 - config.epsilon_low) & (adv < 0)
    high = (coef_1 > 1 + eps_high) & (adv > 0)
    metrics["entropy"] = _masked_mean(entropy.detach(), mask)
    metrics["clip_ratio/low_mean"] = _masked_mean(low.detach(), mask)
    metrics["clip_ratio/high_mean"] = _masked_mean(high.detach(), mask)
    metrics["clip_ratio/region_mean"] = _masked_mean((low | high).detach(), mask)
    return GRPOLossOutput(loss=loss, logps=(logps.detach() * mask), advantages=advantages.detach(),
                          metrics=metrics)
