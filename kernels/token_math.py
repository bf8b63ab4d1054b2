"""Per-token GRPO terms in plain PyTorch, with their analytic gradient w.r.t. the log-prob.

This is the elementwise part of the loss (everything after the log-softmax), written once for the
chunked `torch` backend, for the whole-batch pre-pass of both fused backends, for the no-grad
passes, and as the statement of what the Triton row kernel computes in registers. Semantics are
TRL 1.16 GRPOTrainer's. With `lr = logp - old` the log importance ratio (its masked mean over the
sequence at sequence level), `c1 = exp(lr)` and `A` the advantage:

    clip  (grpo, bnpo, dr_grpo, dapo, luspo):  c2 = clamp(c1, 1 - eps_low, 1 + eps_high);
          c1' = min(c1, delta) if delta;  policy = -min(c1' A, c2 A)
    cispo: policy = -sg(min(c1, eps_high)) A logp                (sg: no gradient)
    sapo:  policy = -sigmoid(tau (c1 - 1)) 4 / tau A,  tau = tau_pos if A > 0 else tau_neg
    vespo: policy = -sg(phi(w)) A logp, phi(w) = e^lam w^k e^(-lam w), w = prod_t pi / pi_old of
           the sequence (times the sampler correction), k and lam by the sign of A
    policy *= off-policy sequence mask * top-entropy token mask * sampler IS ratio (not vespo)
    kl     = exp(ref - logp) - (ref - logp) - 1  (k3), times c1 with kl_bias_correction (before
             the delta cap, differentiable; the sequence's c1 at sequence level)
    token  = w * (policy + beta * kl) - entropy_coef * H * em / sum(em)

where w is the token's loss-normalisation weight (loss_type) and em the tokens the entropy bonus
acts on. `torch.min` sends half the gradient to each side on a tie and `clamp` passes it at its
bounds; the formulas below do the same so that the fused backends agree with autograd on the
reference in structure.

A token's policy term depends on other tokens at sequence level, for vespo, and with the
top-entropy or off-policy masks ("whole batch"): the fused backends then compute every token's
log-prob and entropy first (forward-only pass, the same values the training pass computes) and
the policy part of each gradient here (`whole_batch_policy`); otherwise the row kernel computes it
in registers (`token_terms` is its PyTorch twin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

POLICIES = ("clip", "cispo", "sapo", "vespo")


@dataclass(frozen=True)
class LossSpec:
    """Non-tensor options of the fused loss (validated by grpo_fast.loss)."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # cispo: the cap eps_max on the ratio
    delta: Optional[float] = None
    temperature: float = 1.0
    sequence_level: bool = False
    kl_bias_correction: bool = False  # multiply the KL by the importance ratio (unbiased reverse-KL gradient)
    logit_scale: float = 1.0  # the model's logit transform: z = softcap * tanh(logit_scale * x / softcap),
    logit_softcap: Optional[float] = None  # or z = logit_scale * x without a cap (kernels/tl_math.py)
    policy: str = "clip"  # one of POLICIES (the loss types that share the clipped surrogate are "clip")
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0  # the loss minus entropy_coef * the mean entropy of the bonus's tokens
    top_entropy_quantile: float = 1.0  # < 1: the policy term only on tokens at or above this entropy quantile
    off_policy_mask_threshold: Optional[float] = None  # drop A < 0 sequences whose mean sampler KL exceeds it

    @property
    def whole_batch(self) -> bool:
        """A token's policy term depends on other tokens: computed from a pre-pass over all of them."""
        return (self.sequence_level or self.policy == "vespo" or self.top_entropy_quantile < 1.0
                or self.off_policy_mask_threshold is not None)


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


def kept_log_sum_exp(m: Tensor, s_kept: Tensor, z_target: Tensor, threshold: Tensor) -> Tensor:
    """log sum exp(z) over the kept set {z >= threshold} + {target} of each row, from the row's max m
    and s_kept = sum exp(z - m) over {z >= threshold} (the PyTorch twin of tl_math.kept_log_sum_exp:
    that set, when not empty, holds the max, so s_kept >= 1; when empty the target is alone)."""
    extra = torch.where(z_target < threshold, torch.exp(z_target - m), 0.0)
    return torch.where(s_kept > 0.0, m + torch.log(s_kept + extra), z_target)


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
    is_ratio: Optional[Tensor] = None  # [n] fp32 sampler importance-sampling ratio of the token (or its sequence)
    sampling_logps: Optional[Tensor] = None  # [n] fp32 sampler log-probs (off-policy mask; None: old_logps)
    # the whole-batch options' threshold of the entropies: (local entropies, q) -> threshold (torch.quantile)
    entropy_threshold_fn: Optional[Callable[[Tensor, float], Tensor]] = None
    num_tokens: Optional[int] = None  # the call's active tokens (a chunk's inputs are a slice of them)
    # [n] fp32 truncated sampling: log-probs over {v : z_v / T >= threshold} + {target} (-inf: every token)
    logit_threshold: Optional[Tensor] = None

    def policy_weight(self, spec: LossSpec) -> Tensor:
        """[n] weight of the token's policy term: w, times the sampler IS ratio (which vespo puts in phi)."""
        if self.is_ratio is None or spec.policy == "vespo":
            return self.token_weight
        return self.token_weight * self.is_ratio


def slice_inputs(inputs: TokenInputs, start: int, end: int) -> TokenInputs:
    def cut(t):
        return None if t is None else t[start:end]

    return replace(inputs, targets=inputs.targets[start:end], token_weight=inputs.token_weight[start:end],
                   advantages=inputs.advantages[start:end], seq_index=inputs.seq_index[start:end],
                   old_logps=cut(inputs.old_logps), ref_logps=cut(inputs.ref_logps), is_ratio=cut(inputs.is_ratio),
                   sampling_logps=cut(inputs.sampling_logps), logit_threshold=cut(inputs.logit_threshold))


# ----------------------------------------------------------------------------------------------
# the policy surrogates of one ratio (a token's or a sequence's)
# ----------------------------------------------------------------------------------------------


def clip_terms(log_ratio: Tensor, advantages: Tensor, spec: LossSpec):
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


def sapo_terms(log_ratio: Tensor, advantages: Tensor, spec: LossSpec):
    """Soft-gated surrogate. Returns (loss, d loss / d log_ratio)."""
    c1 = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, spec.sapo_temperature_pos, spec.sapo_temperature_neg)
    gate = torch.sigmoid(tau * (c1 - 1.0))
    return -gate * 4.0 / tau * advantages, -4.0 * advantages * gate * (1.0 - gate) * c1


def cispo_coefficient(log_ratio: Tensor, advantages: Tensor, spec: LossSpec):
    """CISPO's detached ratio min(c1, eps_max) and its clip flag (c1 > eps_max with A > 0)."""
    c1 = torch.exp(log_ratio)
    return c1.clamp(max=spec.epsilon_high), (c1 > spec.epsilon_high) & (advantages > 0)


def gamma_weight(seq_log_ratio_sum: Tensor, advantages: Tensor, spec: LossSpec) -> Tensor:
    """VESPO's phi(w) for log w (already including the sampler correction), NaN / inf to 0."""
    log_w = seq_log_ratio_sum.clamp(math.log(1e-8), 20.0)
    positive = advantages >= 0
    k = torch.where(positive, spec.vespo_k_pos, spec.vespo_k_neg)
    lam = torch.where(positive, spec.vespo_lambda_pos, spec.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def log_importance_ratio(logp: Tensor, old_logps: Optional[Tensor]) -> Tensor:
    """logp - old; on-policy (no old) logp - sg(logp) as TRL: 0 for a finite log-prob, NaN for a NaN or
    infinite one, so that a non-finite log-prob reaches the loss (a constant 0 would leave the loss
    finite beside NaN gradients)."""
    return logp - (logp if old_logps is None else old_logps)


def kl_terms(logp: Tensor, ref_logps: Tensor):
    """k3 KL estimate per token and its derivative w.r.t. logp."""
    diff = ref_logps - logp
    e = torch.exp(diff)
    return e - diff - 1.0, 1.0 - e


# ----------------------------------------------------------------------------------------------
# the whole batch: policy terms that depend on other tokens
# ----------------------------------------------------------------------------------------------


def _per_sequence(values: Tensor, inputs: TokenInputs) -> Tensor:
    return torch.zeros(inputs.num_sequences, device=values.device, dtype=torch.float32).index_add_(
        0, inputs.seq_index, values.float())


@dataclass
class Policy:
    """The policy part of every token's loss and gradient, from the log-probs of all of them."""

    token_grad: Tensor  # [n] d(policy part, and the sequence ratio's share of a corrected KL) / d logp_t
    loss: Tensor  # scalar: the policy part of the loss
    token_ratio: Optional[Tensor]  # [n] the sequence's ratio (sequence level), for the KL correction
    entropy_grad: Optional[Tensor]  # [n] d loss / d entropy_t (the bonus), None without one
    low: Optional[Tensor]  # clip flags: [n] (token level) or [B] (sequence level), None for other policies
    high: Optional[Tensor]  # clip flags, or cispo's clip flags
    phi: Optional[Tensor] = None  # [B] vespo's weights


def entropy_bonus_grad(entropy_mask: Optional[Tensor], n: int, spec: LossSpec, device) -> Optional[Tensor]:
    """[n] d loss / d H_t = -entropy_coef * em_t / sum(em) (em: the bonus's tokens), None without a bonus."""
    if spec.entropy_coef == 0.0:
        return None
    if entropy_mask is None:
        return torch.full((n,), -spec.entropy_coef / max(n, 1), device=device, dtype=torch.float32)
    em = entropy_mask.float()
    return em * (-spec.entropy_coef / em.sum().clamp(min=1.0))


def whole_batch_policy(logp: Tensor, entropy: Tensor, inputs: TokenInputs, spec: LossSpec) -> Policy:
    """The policy terms of every active token (logp, entropy: [n], all of the call's tokens)."""
    n = logp.shape[0]
    idx = inputs.seq_index
    counts = _per_sequence(torch.ones_like(logp), inputs).clamp(min=1.0)
    adv = inputs.advantages
    seq_adv = torch.zeros(inputs.num_sequences, device=logp.device, dtype=torch.float32)
    seq_adv[idx] = adv
    log_ratio = log_importance_ratio(logp, inputs.old_logps)

    multiplier = torch.ones_like(logp)  # the masks on the policy term
    entropy_mask = None
    if spec.top_entropy_quantile < 1.0 and n:
        threshold_fn = inputs.entropy_threshold_fn or torch.quantile
        threshold = threshold_fn(entropy.float(), 1.0 - spec.top_entropy_quantile)
        entropy_mask = entropy >= threshold
        multiplier = multiplier * entropy_mask
    if spec.off_policy_mask_threshold is not None:
        sampled = inputs.sampling_logps if inputs.sampling_logps is not None else (
            inputs.old_logps if inputs.old_logps is not None else logp)
        mean_kl = _per_sequence(torch.nan_to_num(sampled - logp, nan=0.0), inputs) / counts
        keep = (seq_adv >= 0) | (mean_kl <= spec.off_policy_mask_threshold)
        multiplier = multiplier * keep[idx]
    weight = inputs.policy_weight(spec) * multiplier  # the policy term's weight per token

    low = high = phi = token_ratio = None
    if spec.policy == "vespo":
        seq_sum = _per_sequence(log_ratio.clamp(-20.0, 20.0), inputs)
        if inputs.is_ratio is not None:
            seq_sum = seq_sum + _per_sequence(torch.log(inputs.is_ratio).clamp(math.log(1e-8), 20.0), inputs)
        phi = gamma_weight(seq_sum, seq_adv, spec)
        coefficient = -phi[idx] * adv * weight
        loss, grad = (coefficient * logp).sum(), coefficient
    elif spec.sequence_level:
        seq_lr = _per_sequence(log_ratio, inputs) / counts
        seq_weight = _per_sequence(weight, inputs)
        if spec.policy == "cispo":
            c, high = cispo_coefficient(seq_lr, seq_adv, spec)
            coefficient = -c[idx] * adv * weight
            loss, grad = (coefficient * logp).sum(), coefficient
        else:
            if spec.policy == "sapo":
                loss_b, dlr_b = sapo_terms(seq_lr, seq_adv, spec)
            else:
                loss_b, dlr_b, low, high = clip_terms(seq_lr, seq_adv, spec)
            loss = (loss_b * seq_weight).sum()
            grad = (dlr_b * seq_weight / counts)[idx]
        ratio_b = torch.exp(seq_lr)
        token_ratio = ratio_b[idx]
        if spec.kl_bias_correction and spec.beta != 0.0 and inputs.ref_logps is not None:
            # sum_t w_t beta kl_t r_b: its gradient through r_b reaches every token of the sequence
            kl, _ = kl_terms(logp, inputs.ref_logps)
            kl_b = _per_sequence(inputs.token_weight * kl, inputs)
            grad = grad + (spec.beta * kl_b * ratio_b / counts)[idx]
    else:
        loss_t, grad, low, high = token_policy(logp, log_ratio, adv, weight, spec)
        loss = loss_t.sum()
    return Policy(token_grad=grad, loss=loss, token_ratio=token_ratio,
                  entropy_grad=entropy_bonus_grad(entropy_mask, n, spec, logp.device), low=low, high=high, phi=phi)


def token_policy(logp: Tensor, log_ratio: Tensor, adv: Tensor, weight: Tensor, spec: LossSpec):
    """Token-level policy terms (the row kernel's inline path): (weighted loss [n], d/d logp [n],
    low, high); for cispo `high` holds its clip flags and `low` is None; sapo has no flags."""
    low = high = None
    if spec.policy == "cispo":
        c, high = cispo_coefficient(log_ratio, adv, spec)
        coefficient = -c * adv * weight
        return coefficient * logp, coefficient, low, high
    if spec.policy == "sapo":
        loss, dlr = sapo_terms(log_ratio, adv, spec)
    else:
        loss, dlr, low, high = clip_terms(log_ratio, adv, spec)
    return weight * loss, weight * dlr, low, high


# ----------------------------------------------------------------------------------------------
# one chunk's tokens
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenTerms:
    loss: Tensor  # [n] weighted per-token loss contribution (whole batch: the policy part excluded)
    grad: Tensor  # [n] d loss / d logp_t
    entropy_grad: Optional[Tensor]  # [n] d loss / d H_t, None without an entropy bonus
    kl: Optional[Tensor]  # [n] or None without ref_logps
    low: Optional[Tensor]  # [n] bool clip flags (token level), else None
    high: Optional[Tensor]


def token_terms(logp: Tensor, entropy: Tensor, inputs: TokenInputs, spec: LossSpec,
                policy: Optional[Policy] = None, start: int = 0) -> TokenTerms:
    """Loss contribution and gradient coefficients of each token of a slice of `inputs` matching logp;
    with `spec.whole_batch`, `policy` is `whole_batch_policy` of all tokens and `start` the slice's offset."""
    w = inputs.token_weight
    n = logp.shape[0]
    log_ratio = log_importance_ratio(logp, inputs.old_logps)
    if policy is not None:
        end = start + n
        loss = torch.zeros_like(logp)
        grad = policy.token_grad[start:end].clone()
        ratio = None if policy.token_ratio is None else policy.token_ratio[start:end]
        entropy_grad = None if policy.entropy_grad is None else policy.entropy_grad[start:end]
        low = high = None
    else:
        loss, grad, low, high = token_policy(logp, log_ratio, inputs.advantages, inputs.policy_weight(spec), spec)
        ratio = None
        entropy_grad = inputs_entropy_grad(inputs, n, spec)
    kl = None
    if inputs.ref_logps is not None:
        kl, dkl = kl_terms(logp, inputs.ref_logps)
        if spec.kl_bias_correction:
            if ratio is None:  # token level: d(kl r)/d logp = r (dkl + kl), d r / d logp = r
                ratio = torch.exp(log_ratio)
                dkl = ratio * (dkl + kl)
            else:  # sequence level: the ratio's share is in the policy's token_grad, only r dkl is this token's
                dkl = ratio * dkl
            kl = kl * ratio
        if spec.beta != 0.0:
            loss = loss + w * spec.beta * kl
            grad = grad + w * spec.beta * dkl
    if entropy_grad is not None:
        loss = loss + entropy_grad * entropy
    return TokenTerms(loss=loss, grad=grad, entropy_grad=entropy_grad, kl=kl, low=low, high=high)


def inputs_entropy_grad(inputs: TokenInputs, n: int, spec: LossSpec) -> Optional[Tensor]:
    """Token level (no entropy mask): every active token of the call shares the bonus equally; `n`
    is the chunk's size, the call's count is the length of `seq_index` of the whole call."""
    if spec.entropy_coef == 0.0:
        return None
    total = inputs.num_tokens if inputs.num_tokens is not None else n
    return torch.full((n,), -spec.entropy_coef / max(total, 1), device=inputs.targets.device, dtype=torch.float32)
