"""Per-token GRPO terms in plain PyTorch, with their analytic gradient w.r.t. the log-prob.

This is the elementwise part of the loss (everything after the log-softmax), written once for
the chunked `torch` backend, for the sequence-level pre-pass of both fused backends, and as the
statement of what the Triton row kernel computes in registers. With `lr` the log importance
ratio and `A` the advantage (semantics of TRL's GRPOTrainer):

    c1 = exp(lr);  c2 = clamp(c1, 1 - eps_low, 1 + eps_high);  c1' = min(c1, delta) if delta
    policy = -min(c1' * A, c2 * A)
    kl     = exp(ref - logp) - (ref - logp) - 1                  (k3 estimator)
    kl    *= c1                        (kl_bias_correction, TRL's use_bias_correction_kl: c1 before
                                        the delta cap, differentiable; the sequence's c1 at sequence level)
    token  = w * (policy + beta * kl)

where w is the token's loss-normalisation weight (loss_type). `torch.min` sends half the
gradient to each side on a tie and `clamp` passes it at its bounds; the formulas below do the same
so that the fused backends agree with autograd on the reference bit for bit in structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossSpec:
    """Non-tensor options of the fused loss (validated by grpo_fast.loss)."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: Optional[float] = None
    temperature: float = 1.0
    sequence_level: bool = False
    kl_bias_correction: bool = False  # multiply the KL by the importance ratio (unbiased reverse-KL gradient)
    logit_scale: float = 1.0  # the model's logit transform: z = softcap * tanh(logit_scale * x / softcap),
    logit_softcap: Optional[float] = None  # or z = logit_scale * x without a cap (kernels/tl_math.py)


def transform_logits_(x: Tensor, logit_scale: float, logit_softcap: Optional[float], want_derivative: bool = False):
    """The model's logit transform applied in place to raw fp32 logits x; returns (z, dz/dx or None).
    dz/dx is a tensor with the cap, the scalar logit_scale without (the PyTorch twin of tl_math)."""
    if logit_scale != 1.0:
        x.mul_(logit_scale)
    if logit_softcap is None:
        return x, (logit_scale if want_derivative else None)
    t = x.div_(logit_softcap).tanh_()
    derivative = None
    if want_derivative:
        derivative = (1.0 - t * t).mul_(logit_scale)
    return t.mul_(logit_softcap), derivative


@dataclass
class TokenInputs:
    """Per-token inputs, flattened to the active tokens (completion_mask == 1) in row-major order."""

    targets: Tensor  # [n] int64 completion token ids
    token_weight: Tensor  # [n] fp32 loss-normalisation weight of each token
    advantages: Tensor  # [n] fp32 advantage of the token's sequence (broadcast)
    seq_index: Tensor  # [n] int64 row (sequence) of each token
    num_sequences: int  # B
    old_logps: Optional[Tensor] = None  # [n] fp32, None = on-policy
    ref_logps: Optional[Tensor] = None  # [n] fp32, None = no KL


def policy_terms(log_ratio: Tensor, advantages: Tensor, spec: LossSpec):
    """Clipped surrogate for a log ratio. Returns (loss, d loss / d log_ratio, low, high)."""
    c1 = torch.exp(log_ratio)
    lo, hi = 1.0 - spec.epsilon_low, 1.0 + spec.epsilon_high
    c2 = c1.clamp(lo, hi)
    c1_used = c1 if spec.delta is None else c1.clamp(max=spec.delta)
    l1 = c1_used * advantages
    l2 = c2 * advantages
    loss = -torch.minimum(l1, l2)
    d1 = advantages * c1
    if spec.delta is not None:
        d1 = d1 * (c1 <= spec.delta)
    d2 = advantages * c1 * ((c1 >= lo) & (c1 <= hi))
    d_min = torch.where(l1 < l2, d1, torch.where(l1 > l2, d2, 0.5 * (d1 + d2)))
    low = (c1_used < lo) & (advantages < 0)
    high = (c1_used > hi) & (advantages > 0)
    return loss, -d_min, low, high


def kl_terms(logp: Tensor, ref_logps: Tensor):
    """k3 KL estimate per token and its derivative w.r.t. logp."""
    diff = ref_logps - logp
    e = torch.exp(diff)
    return e - diff - 1.0, 1.0 - e


@dataclass
class SequencePolicy:
    """Sequence-level importance sampling, computed once from every token's log-prob."""

    token_grad: Tensor  # [n] d(policy part of the loss, and the KL's ratio factor) / d logp_t
    loss: Tensor  # scalar: policy part of the loss
    token_ratio: Tensor  # [n] the sequence's ratio exp(mean log ratio), broadcast to its tokens
    low: Tensor  # [B] bool
    high: Tensor  # [B] bool


def sequence_policy(logp: Tensor, inputs: TokenInputs, spec: LossSpec) -> SequencePolicy:
    B = inputs.num_sequences
    idx = inputs.seq_index
    ones = torch.ones_like(logp)
    counts = torch.zeros(B, device=logp.device, dtype=torch.float32).index_add_(0, idx, ones)
    counts = counts.clamp(min=1.0)
    # on-policy (no old_logps): old = logp.detach(), so the ratio is 1 with gradient 1
    diff = torch.zeros_like(logp) if inputs.old_logps is None else logp - inputs.old_logps
    seq_lr = torch.zeros(B, device=logp.device, dtype=torch.float32).index_add_(0, idx, diff) / counts
    seq_adv = torch.zeros(B, device=logp.device, dtype=torch.float32)
    seq_adv[idx] = inputs.advantages
    loss_b, dlr_b, low_b, high_b = policy_terms(seq_lr, seq_adv, spec)
    weight_b = torch.zeros(B, device=logp.device, dtype=torch.float32).index_add_(0, idx, inputs.token_weight)
    dlr_b = dlr_b * weight_b
    ratio_b = torch.exp(seq_lr)
    if spec.kl_bias_correction and spec.beta != 0.0 and inputs.ref_logps is not None:
        # sum_t w_t beta kl_t r_b: its gradient through r_b reaches every token of the sequence
        kl, _ = kl_terms(logp, inputs.ref_logps)
        kl_b = torch.zeros(B, device=logp.device, dtype=torch.float32).index_add_(0, idx, inputs.token_weight * kl)
        dlr_b = dlr_b + spec.beta * kl_b * ratio_b
    token_grad = (dlr_b / counts)[idx]
    return SequencePolicy(token_grad=token_grad, loss=(loss_b * weight_b).sum(), low=low_b, high=high_b,
                          token_ratio=ratio_b[idx])


@dataclass
class TokenTerms:
    loss: Tensor  # [n] weighted per-token loss contribution (policy part excluded at sequence level)
    grad: Tensor  # [n] d loss / d logp_t
    kl: Optional[Tensor]  # [n] or None without ref_logps
    low: Optional[Tensor]  # [n] bool (token level) or None
    high: Optional[Tensor]


def token_terms(
    logp: Tensor, inputs: TokenInputs, spec: LossSpec, seq_token_grad: Optional[Tensor] = None,
    seq_token_ratio: Optional[Tensor] = None,
) -> TokenTerms:
    """Loss contribution and gradient coefficient of each token (slice of `inputs` matching logp);
    at sequence level `seq_token_grad` / `seq_token_ratio` come from `sequence_policy`."""
    w = inputs.token_weight
    kl = None
    if spec.sequence_level:
        assert seq_token_grad is not None, "sequence level needs the pre-pass (sequence_policy)"
        loss = torch.zeros_like(logp)
        grad = seq_token_grad.clone()
        low = high = None
        ratio = seq_token_ratio
    else:
        log_ratio = torch.zeros_like(logp) if inputs.old_logps is None else logp - inputs.old_logps
        pol, dpol, low, high = policy_terms(log_ratio, inputs.advantages, spec)
        loss = w * pol
        grad = w * dpol
        ratio = torch.exp(log_ratio) if spec.kl_bias_correction else None  # policy_terms has its own
    if inputs.ref_logps is not None:
        kl, dkl = kl_terms(logp, inputs.ref_logps)
        if spec.kl_bias_correction:
            # d(kl * r)/d logp = r * (dkl + kl) at token level (d r / d logp = r); at sequence level
            # the ratio's share is in seq_token_grad, only r * dkl is this token's own
            dkl = ratio * (dkl if spec.sequence_level else dkl + kl)
            kl = kl * ratio
        if spec.beta != 0.0:
            loss = loss + w * spec.beta * kl
            grad = grad + w * spec.beta * dkl
    return TokenTerms(loss=loss, grad=grad, kl=kl, low=low, high=high)


def slice_inputs(inputs: TokenInputs, start: int, end: int) -> TokenInputs:
    def cut(t):
        return None if t is None else t[start:end]

    return TokenInputs(
        targets=inputs.targets[start:end],
        token_weight=inputs.token_weight[start:end],
        advantages=inputs.advantages[start:end],
        seq_index=inputs.seq_index[start:end],
        num_sequences=inputs.num_sequences,
        old_logps=cut(inputs.old_logps),
        ref_logps=cut(inputs.ref_logps),
    )
