"""Eager reference: the GRPO loss as TRL's GRPOTrainer computes it, logits materialised.

This is today's baseline and the test oracle for the fused backends: plain PyTorch, autograd for
the gradients, every intermediate of size [B, T, V] kept (logits in the input dtype, then fp32).
Like the fused backends, which compute only the active tokens, it never reads a masked position:
those are set to neutral values first, so a NaN there, or TRL's padding id -100, changes nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .logits import LogitTransform
from .outputs import GRPOLossOutput


def reference_logprobs(hidden: Tensor, weight: Tensor, completion_ids: Tensor, bias: Optional[Tensor],
                       temperature: float, logit_scale: float = 1.0, logit_softcap: Optional[float] = None,
                       logit_threshold: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(log-probs of completion_ids, entropies); with `logit_threshold` [B, T] the log-probs of the
    distribution a truncating sampler drew from: the logits below the threshold masked out except
    the target's, then log_softmax. The entropies are always the full distribution's."""
    # logits in the input dtype, as a Hugging Face model returns them to TRL
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    # the model's transform, in fp32 at least (fp64 stays fp64: the tests' oracle runs this function
    # in double precision)
    logits = LogitTransform(logit_scale, logit_softcap).apply(logits) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = completion_ids.long().unsqueeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    if logit_threshold is not None:
        dropped = (logits < logit_threshold.unsqueeze(-1)).scatter(-1, targets, False)
        log_probs = torch.log_softmax(logits.masked_fill(dropped, -math.inf), dim=-1)
    logps = log_probs.gather(-1, targets).squeeze(-1)
    return logps, entropy


def neutral_at_masked(mask: Tensor, *tensors: Optional[Tensor], fill: float = 0.0) -> list[Optional[Tensor]]:
    """Each [B, T, ...] tensor with ``fill`` where ``mask`` [B, T] (bool) is False (None stays None);
    differentiable (no gradient reaches the masked positions)."""
    neutral = []
    for tensor in tensors:
        if tensor is None:
            neutral.append(None)
            continue
        keep = mask.reshape(mask.shape + (1,) * (tensor.dim() - mask.dim()))
        neutral.append(torch.where(keep, tensor, torch.full((), fill, dtype=tensor.dtype, device=tensor.device)))
    return neutral


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    x = x.to(mask.dtype)
    if x.shape[1] == 1:  # sequence level: one value per sequence
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _masked_sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """[B] per-sequence masked means (NaN for a sequence with no token, as TRL's)."""
    x = x.to(mask.dtype)
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)


def nan_extreme(values: Tensor, which: str) -> Tensor:
    """min or max over the non-NaN values (NaN when there are none), as TRL's nanmin / nanmax."""
    kept = values[~torch.isnan(values)]
    if kept.numel() == 0:
        return values.new_tensor(float("nan"))
    return kept.min() if which == "min" else kept.max()


def gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, importance_sampling_ratio: Optional[Tensor],
                  k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """VESPO's detached [B, 1] sequence weights phi(w) = e^lambda w^k e^(-lambda w), phi(1) = 1, with w the
    sequence's importance ratio prod_t pi / pi_old (times the sampler correction when given)."""
    with torch.no_grad():
        lower = math.log(1e-8)
        seq_log_ratio = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        if importance_sampling_ratio is not None:
            seq_log_ratio = seq_log_ratio + torch.log(importance_sampling_ratio).clamp(lower, 20.0).sum(-1, keepdim=True)
        log_w = seq_log_ratio.clamp(lower, 20.0)
        positive = advantages >= 0
        k = torch.where(positive, k_pos, k_neg)
        lam = torch.where(positive, lambda_pos, lambda_neg).clamp(min=1e-4)
        log_phi = lam + k * log_w - lam * torch.exp(log_w)
        return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def reference_grpo_loss(hidden, weight, completion_ids, mask, advantages, old_logps, ref_logps, bias, config, *,
                        sampling_logps: Optional[Tensor] = None, importance_sampling_ratio: Optional[Tensor] = None,
                        entropy_threshold_fn=None, logit_threshold: Optional[Tensor] = None):
    """TRL 1.16 GRPOTrainer._compute_loss on materialised logits (its statement order and names), for one
    call without gradient accumulation. `importance_sampling_ratio`: [B, T] or [B, 1] (or [B]);
    `logit_threshold`: [B, T], the log-probs over a truncating sampler's kept sets (reference_logprobs)."""
    B, T = mask.shape
    hidden, completion_ids, old_logps, ref_logps, sampling_logps = neutral_at_masked(
        mask, hidden, completion_ids, old_logps, ref_logps, sampling_logps)
    if importance_sampling_ratio is not None and importance_sampling_ratio.shape == mask.shape:
        # 1, not 0: vespo sums the ratio's log over every position of a sequence, as TRL does
        (importance_sampling_ratio,) = neutral_at_masked(mask, importance_sampling_ratio, fill=1.0)
    (logit_threshold,) = neutral_at_masked(mask, logit_threshold, fill=-math.inf)
    logps, entropy = reference_logprobs(hidden, weight, completion_ids, bias, config.temperature,
                                        config.logit_scale, config.logit_softcap, logit_threshold)
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    is_ratio = None
    if importance_sampling_ratio is not None:
        is_ratio = importance_sampling_ratio.to(logps.dtype)
        is_ratio = is_ratio.unsqueeze(1) if is_ratio.dim() == 1 else is_ratio
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        local = entropy.detach()[mask.bool()].float()
        if local.numel() == 0:
            entropy_mask = torch.zeros_like(mask, dtype=torch.bool)
        else:
            quantile = entropy_threshold_fn or torch.quantile
            threshold = quantile(local, 1.0 - config.top_entropy_quantile)
            entropy_mask = ((entropy.detach() * mask) >= threshold) & mask.bool()
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    off_policy_mask = None
    if config.off_policy_mask_threshold is not None:
        sampled = old if sampling_logps is None else sampling_logps.to(logps.dtype)
        kl_div = torch.nan_to_num(sampled - logps.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((adv >= 0) | (avg_seq_kl <= config.off_policy_mask_threshold)).to(mask.dtype)
    log_ratio = logps - old
    if config.importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_weights = log_ratio
    eps_high = config.resolved_epsilon_high
    coef_1 = torch.exp(log_weights)
    metrics = {}
    if ref_logps is not None:
        diff = ref_logps.to(logps.dtype) - logps
        per_token_kl = torch.exp(diff) - diff - 1
        if config.kl_bias_correction:
            per_token_kl = per_token_kl * coef_1  # before the delta cap, as TRL multiplies it
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)

    loss_type = config.loss_type
    phi_seq = None
    if loss_type == "cispo":
        clamped = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped * adv * logps
    elif loss_type == "sapo":
        temperatures = torch.where(adv > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * adv
    elif loss_type == "vespo":
        phi_seq = gamma_weights(adv, log_ratio, mask, is_ratio, config.vespo_k_pos, config.vespo_lambda_pos,
                                config.vespo_k_neg, config.vespo_lambda_neg)
        per_token_loss = -phi_seq * adv * logps
    else:  # grpo, bnpo, dr_grpo, dapo, luspo: the clipped surrogate
        coef_2 = torch.clamp(coef_1, 1 - config.epsilon_low, 1 + eps_high)
        if config.delta is not None:
            coef_1 = torch.clamp(coef_1, max=config.delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if off_policy_mask is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    if ref_logps is not None and config.beta != 0.0:
        per_token_loss = per_token_loss + config.beta * per_token_kl
    per_token_loss = per_token_loss.expand(B, T) if per_token_loss.shape[1] == 1 else per_token_loss

    # TRL's means over sequences, as sums over max(B, 1): an empty batch (B = 0 or T = 0) adds 0, as an
    # all-masked one does, where a mean over no sequence would be NaN
    sequences = max(B, 1)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = config.max_completion_length if config.max_completion_length is not None else T
        loss = (per_token_loss * mask).sum() / max(B * length, 1)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).sum() / sequences
    else:  # dapo, cispo, vespo
        normaliser = config.num_items_in_batch if config.num_items_in_batch is not None else mask.sum().clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / normaliser
    if config.entropy_coef != 0.0:
        metrics["policy_loss"] = loss.detach()
        effective = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - config.entropy_coef * (entropy * effective).sum() / effective.sum().clamp(min=1.0)

    metrics["entropy"] = _masked_mean(entropy.detach(), mask)
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = _masked_mean(((coef_1 > eps_high) & (adv > 0)).detach(), mask)
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = _masked_mean(phi_seq, mask)
    elif loss_type != "sapo":
        low = ((coef_1 < 1 - config.epsilon_low) & (adv < 0)).detach()
        high = ((coef_1 > 1 + eps_high) & (adv > 0)).detach()
        metrics["clip_ratio/low_mean"] = _masked_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _masked_mean(low | high, mask)
        metrics["clip_ratio/low_min"] = nan_extreme(_masked_sequence_mean(low, mask), "min")
        metrics["clip_ratio/high_max"] = nan_extreme(_masked_sequence_mean(high, mask), "max")
    return GRPOLossOutput(loss=loss, logps=(logps.detach() * mask), advantages=advantages.detach(),
                          metrics=metrics, entropy=entropy.detach() * mask)
