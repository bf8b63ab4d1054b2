"""The drop-in GRPO loss: `grpo_loss`, `token_logprobs`, `GRPOLossConfig`, `GRPOLoss`.

`grpo_loss(hidden, weight, completion_ids, completion_mask, ...)` computes TRL GRPOTrainer's
loss from the last hidden states and the lm_head weight, i.e. the value and gradients of

    logp  = log_softmax(f((hidden @ weight.T + bias).float()) / temperature).gather(completion_ids)
            f(x) = logit_softcap * tanh(logit_scale * x / logit_softcap)   (or logit_scale * x: the
                   model's logit transform, e.g. Gemma's final_logit_softcapping; identity by default)
            (with logit_threshold, a truncating sampler's: the log_softmax over the kept set only,
             {v : z_v / temperature >= threshold} plus the target)
    ratio = exp(logp - old_logps)            (token level; sequence level: masked mean per row)
    loss  = aggregate_{loss_type}( -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
                                    + beta * (exp(ref - logp) - (ref - logp) - 1) [* ratio] )
                                                 ([* ratio]: kl_bias_correction, TRL's use_bias_correction_kl)

without materialising the [tokens, vocab] logits (backends "torch" and "triton"). The fused
backends keep the logits in fp32 (a bf16 logit of 32 is off by up to 0.125), in the training pass
and the no-grad `token_logprobs` alike, so both give the same log-probs. Checks live here; the maths lives in grpo_fast.kernels (fused) and grpo_fast.reference (eager oracle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .kernels import LossSpec, TokenInputs, default_kernel_config, forward_logprobs, fused_grpo_loss, triton_usable_on
from .kernels.config import triton_available
from . import fallback
from .logits import check_logit_transform
from .outputs import GRPOLossOutput
from .reference import nan_extreme

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")
# the loss types that share the clipped surrogate (they differ only in how token losses are averaged)
CLIP_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo")
# the loss types normalised by a token count (num_items_in_batch), the others per sequence or call
TOKEN_NORMALISED_LOSS_TYPES = ("dapo", "cispo", "vespo")
SAMPLER_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GRPOLossConfig:
    """Options of the GRPO loss (TRL GRPOConfig names and defaults)."""

    # "dapo" | "grpo" | "bnpo" | "dr_grpo" | "luspo" (the clipped surrogate, averaged in different ways),
    # "cispo" (capped detached ratio times logp), "sapo" (soft gate), "vespo" (gamma-weighted sequences)
    loss_type: str = "dapo"
    beta: float = 0.0  # weight of the k3 KL to the reference policy (needs ref_logps when != 0)
    epsilon_low: float = 0.2  # lower clip: ratio >= 1 - epsilon_low
    epsilon_high: Optional[float] = None  # upper clip: ratio <= 1 + epsilon_high (None: = epsilon_low); cispo: the cap
    delta: Optional[float] = None  # if set, the unclipped ratio is also capped at delta (two-sided clip)
    temperature: float = 1.0  # logits are divided by it (use the sampling temperature)
    importance_sampling_level: str = "token"  # "token" (GRPO) | "sequence" (GSPO)
    scale_rewards: str = "group"  # advantages from rewards: divide by "group" | "batch" std, or "none"
    max_completion_length: Optional[int] = None  # dr_grpo normaliser (None: the T of the call)
    num_items_in_batch: Optional[float] = None  # dapo normaliser (None: active tokens in this call)
    chunk_size: Optional[int] = None  # tokens per logits chunk (None: from a 512 MiB budget)
    kl_bias_correction: bool = False  # KL times the importance ratio (TRL's use_bias_correction_kl)
    # The model's logit transform (grpo_fast.logits.logit_transform(model).loss_keywords() reads it):
    logit_scale: float = 1.0  # logits times this (Cohere's logit_scale, Granite's 1 / logits_scaling)
    logit_softcap: Optional[float] = None  # then softcap * tanh(logits / softcap) (Gemma's final_logit_softcapping)
    sapo_temperature_pos: float = 1.0  # sapo: the gate's temperature for A > 0
    sapo_temperature_neg: float = 1.05  # and for A <= 0
    vespo_k_pos: float = 2.0  # vespo: phi(w) = e^lambda w^k e^(-lambda w), k and lambda for A >= 0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # and for A < 0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0  # the loss minus entropy_coef * mean entropy (of the top-entropy tokens if masked)
    top_entropy_quantile: float = 1.0  # < 1: the policy term only on tokens at or above this entropy quantile
    off_policy_mask_threshold: Optional[float] = None  # drop A < 0 sequences whose mean KL to the sampler exceeds it

    def __post_init__(self):
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        if not isinstance(self.kl_bias_correction, bool):
            raise ValueError(f"kl_bias_correction: expected True or False, got {self.kl_bias_correction!r}")
        _choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_LEVELS)
        _choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _finite("beta", self.beta, minimum=0.0)
        _finite("epsilon_low", self.epsilon_low, minimum=0.0)
        if self.epsilon_low >= 1.0:
            raise ValueError(f"epsilon_low: expected a value in [0, 1), got {self.epsilon_low!r}")
        if self.epsilon_high is not None:
            _finite("epsilon_high", self.epsilon_high, minimum=0.0)
        if self.delta is not None:
            _finite("delta", self.delta, minimum=0.0)
            if self.delta <= 1.0:
                raise ValueError(f"delta: expected a value > 1 (a cap on the ratio), got {self.delta!r}")
        _finite("temperature", self.temperature, minimum=0.0)
        if self.temperature == 0.0:
            raise ValueError("temperature: expected a value > 0, got 0.0")
        for name in ("max_completion_length", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        if self.num_items_in_batch is not None:
            _finite("num_items_in_batch", self.num_items_in_batch, minimum=0.0)
            if self.num_items_in_batch == 0:
                raise ValueError("num_items_in_batch: expected a value > 0, got 0")
        check_logit_transform(self.logit_scale, self.logit_softcap)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            _finite(name, getattr(self, name), minimum=0.0)
            if getattr(self, name) == 0.0:
                raise ValueError(f"{name}: expected a value > 0, got 0.0")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _finite(name, getattr(self, name), minimum=0.0)
        _finite("entropy_coef", self.entropy_coef)
        _finite("top_entropy_quantile", self.top_entropy_quantile, minimum=0.0)
        if self.top_entropy_quantile > 1.0:
            raise ValueError(f"top_entropy_quantile: expected a value in [0, 1], got {self.top_entropy_quantile!r}")
        if self.off_policy_mask_threshold is not None:
            _finite("off_policy_mask_threshold", self.off_policy_mask_threshold, minimum=0.0)
        if self.loss_type == "cispo" and self.resolved_epsilon_high <= 0.0:
            raise ValueError(f"epsilon_high: expected a value > 0 for loss_type='cispo' (the cap on the ratio), "
                             f"got {self.resolved_epsilon_high!r}")

    @property
    def resolved_epsilon_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    def spec(self) -> LossSpec:
        return LossSpec(
            beta=float(self.beta),
            epsilon_low=float(self.epsilon_low),
            epsilon_high=float(self.resolved_epsilon_high),
            delta=None if self.delta is None else float(self.delta),
            temperature=float(self.temperature),
            sequence_level=self.importance_sampling_level == "sequence",
            kl_bias_correction=bool(self.kl_bias_correction),
            logit_scale=float(self.logit_scale),
            logit_softcap=None if self.logit_softcap is None else float(self.logit_softcap),
            policy="clip" if self.loss_type in CLIP_LOSS_TYPES else self.loss_type,
            sapo_temperature_pos=float(self.sapo_temperature_pos),
            sapo_temperature_neg=float(self.sapo_temperature_neg),
            vespo_k_pos=float(self.vespo_k_pos),
            vespo_lambda_pos=float(self.vespo_lambda_pos),
            vespo_k_neg=float(self.vespo_k_neg),
            vespo_lambda_neg=float(self.vespo_lambda_neg),
            entropy_coef=float(self.entropy_coef),
            top_entropy_quantile=float(self.top_entropy_quantile),
            off_policy_mask_threshold=(None if self.off_policy_mask_threshold is None
                                       else float(self.off_policy_mask_threshold)),
        )


# TRL's names: kl (with ref_logps), entropy, and by loss type the clip ratios (clip types), cispo_clip_ratio
# (cispo) or vespo/phi_seq_mean (vespo); policy_loss (the loss without the bonus) with an entropy bonus
METRIC_NAMES = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean", "policy_loss")


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")


def _finite(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a value >= {minimum}, got {value!r}")


def _tensor(name, value, ndim=None, shape=None, device=None, float_dtype=False, int_dtype=False):
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where hidden is), got one on {value.device}")
    if float_dtype and not value.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if int_dtype and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"{name}: expected an integer tensor of token ids, got dtype {value.dtype}")


def _check_head(hidden, weight, bias):
    _tensor("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape [B, T, H], got {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden: expected dtype float32, bfloat16 or float16, got {hidden.dtype}")
    H = hidden.shape[-1]
    _tensor("weight", weight, ndim=2, device=hidden.device)
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [V, {H}] (H from hidden), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}")
    if weight.shape[0] < 1:
        raise ValueError("weight: expected at least one vocabulary row, got V = 0")
    if bias is not None:
        _tensor("bias", bias, shape=(weight.shape[0],), device=hidden.device, float_dtype=True)


def _check_ids(completion_ids, completion_mask, B, T, V, device):
    _tensor("completion_ids", completion_ids, shape=(B, T), device=device, int_dtype=True)
    if completion_mask is not None:
        _tensor("completion_mask", completion_mask, shape=(B, T), device=device)
        active_ids = completion_ids[completion_mask.bool()]
    else:
        active_ids = completion_ids
    if active_ids.numel():
        lo, hi = int(active_ids.min()), int(active_ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"completion_ids: expected ids in [0, {V}) (V from weight), got {bad}")


def _check_threshold(logit_threshold, shape, device, active: Optional[Tensor] = None) -> None:
    """A truncating sampler's per-token thresholds: fp32 of `shape` on `device`, no NaN at the tokens
    that are computed (`active`: a bool mask of them, None: all); -inf = not truncated."""
    if logit_threshold is None:
        return
    _tensor("logit_threshold", logit_threshold, shape=shape, device=device)
    if logit_threshold.dtype != torch.float32:
        raise ValueError(f"logit_threshold: expected dtype torch.float32 (thresholds on the temperature-scaled "
                         f"logits, -inf where the sampler kept every token), got {logit_threshold.dtype}")
    values = logit_threshold if active is None else logit_threshold[active]
    if bool(torch.isnan(values).any()):
        raise ValueError("logit_threshold: expected no NaN (-inf where the sampler kept every token), got NaN at "
                         f"{int(torch.isnan(values).sum())} computed token(s)")


def _resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """auto: triton on a GPU the kernels support for ``dtype`` (kernels.config.capability_supports: the
    support matrix's architectures; no bf16 before sm_80), else torch."""
    _choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable_on(device, dtype) else "torch"
    if backend == "triton" and not triton_usable_on(device, dtype):
        if not triton_available():
            why = "triton is not installed"
        elif device.type != "cuda":
            why = f"tensors are on {device}"
        else:
            major, minor = torch.cuda.get_device_capability(device)
            why = f"{device} (sm_{major}{minor}) is not an architecture the kernels support for {dtype}"
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors of a supported GPU (or TRITON_INTERPRET=1 on CPU), but {why}; "
            "use backend='torch' or 'auto'"
        )
    return backend


def _with_fallback(kernel: str, backend: str, device: torch.device, run: Callable[[str], object]):
    """``run(backend)``; for "triton", ``run("torch")`` when the kernel cannot compile or launch here
    (grpo_fast.fallback: one warning, or an error under GRPO_FAST_STRICT=1).

    Autograd: the fused pass computes every gradient in its forward and writes only buffers of its
    own, so a failed launch leaves nothing behind (no graph node, no partial output) and the torch
    pass recomputes the whole call. Its backward launches no kernel (it scales the stored fp32
    gradients), so there is no failure to recover from there."""
    if backend != "triton":
        return run(backend)
    return fallback.run(kernel, device, lambda: run("triton"), lambda: run("torch"))


# ----------------------------------------------------------------------------------------------
# advantages and loss normalisation (shared by every backend)
# ----------------------------------------------------------------------------------------------


def compute_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """Group-relative advantages: (r - group mean) / (std + 1e-4), rows grouped contiguously.

    std is Bessel-corrected, over the group ("group") or the whole batch ("batch"); "none" keeps
    the centred rewards.
    """
    _tensor("rewards", rewards, ndim=1, float_dtype=True)
    _choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    B = rewards.shape[0]
    if B % group_size != 0:
        raise ValueError(f"group_size: expected a divisor of the batch size {B}, got {group_size}")
    if scale_rewards == "group" and group_size < 2:
        raise ValueError("group_size: scale_rewards='group' needs groups of at least 2 completions, got 1")
    r = rewards.float()
    grouped = r.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
        return centred / (std + 1e-4)
    if scale_rewards == "batch":
        std = r.std() if B > 1 else torch.zeros((), device=r.device)
        return centred / (std + 1e-4)
    return centred


def sampler_correction(old_logps: Tensor, sampling_logps: Tensor, completion_mask: Tensor, mode: str,
                       clip_min: Optional[float] = None, clip_max: Optional[float] = 3.0) -> Tensor:
    """The importance-sampling correction for a sampler whose distribution differs from the training
    forward's (TRL's vLLM correction): exp(old - sampler) per token ([B, T], "token_*") or per sequence
    ([B, 1], the differences summed: "sequence_*"), clipped to [clip_min, clip_max] ("*_truncate") or
    set to 0 outside it ("*_mask"). A sampler log-prob of NaN counts as no difference."""
    _choice("mode", mode, SAMPLER_CORRECTION_MODES)
    _tensor("old_logps", old_logps, ndim=2, float_dtype=True)
    _tensor("sampling_logps", sampling_logps, shape=old_logps.shape, device=old_logps.device, float_dtype=True)
    _tensor("completion_mask", completion_mask, shape=old_logps.shape, device=old_logps.device)
    diff = torch.nan_to_num((old_logps - sampling_logps) * completion_mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def token_weights(mask: Tensor, config: GRPOLossConfig) -> Tensor:
    """[B, T] fp32 weight of each token in the loss: loss = sum(weight * per_token_loss)."""
    mask = mask.float()
    B, T = mask.shape
    if config.loss_type in ("grpo", "sapo"):
        per_row = mask.sum(-1, keepdim=True).clamp(min=1.0)
        return mask / (per_row * B)
    if config.loss_type == "luspo":  # the sum over each sequence's tokens, averaged over sequences
        return mask / B
    if config.loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if config.loss_type == "dr_grpo":
        length = config.max_completion_length if config.max_completion_length is not None else T
        return mask / (B * length)
    normaliser = config.num_items_in_batch  # dapo, cispo, vespo
    if normaliser is None:
        return mask / mask.sum().clamp(min=1.0)
    return mask / float(normaliser)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    advantages: Optional[Tensor] = None,
    rewards: Optional[Tensor] = None,
    group_size: Optional[int] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    config: Optional[GRPOLossConfig] = None,
    backend: str = "auto",
    importance_sampling_ratio: Optional[Tensor] = None,
    sampling_logps: Optional[Tensor] = None,
    entropy_threshold_fn: Optional[Callable[[Tensor, float], Tensor]] = None,
    logit_threshold: Optional[Tensor] = None,
) -> GRPOLossOutput:
    """GRPO loss of TRL's GRPOTrainer, computed from hidden states and the lm_head weight.

    Args:
        hidden: [B, T, H] hidden state at the position that predicts completion token t.
        weight: [V, H] lm_head weight, same dtype as hidden; may require grad.
        completion_ids: [B, T] int targets. completion_mask: [B, T], 1 where the token counts.
        advantages: [B] per-completion advantages, or
        rewards: [B] raw rewards with `group_size` contiguous rows per prompt.
        old_logps: [B, T] sampling-policy log-probs; None = on-policy (ratio 1, detached).
        ref_logps: [B, T] reference log-probs; required when config.beta != 0.
        bias: [V] optional lm_head bias.
        backend: "auto" (triton on CUDA, torch elsewhere) | "triton" | "torch" | "reference".
        importance_sampling_ratio: the sampler correction (TRL's vLLM importance sampling): [B, T]
            per token or [B] / [B, 1] per sequence, multiplying the policy term (vespo: its weights).
        sampling_logps: [B, T] the sampler's log-probs, for config.off_policy_mask_threshold
            (None: old_logps, else the current log-probs).
        entropy_threshold_fn: (entropies, q) -> the q-quantile for config.top_entropy_quantile
            (default torch.quantile of this call's tokens; a distributed trainer gathers them first).
        logit_threshold: [B, T] float32, for a sampler that truncated (top-k, top-p, min-p): the
            smallest temperature-scaled logit it kept at each token (-inf: it kept every token).
            The log-probs are then over the kept set {v : z_v / temperature >= threshold} plus the
            sampled token, and so are everything computed from them (ratio, KL, off-policy mask);
            the entropies (metric and bonus) stay those of the full distribution. old_logps and
            sampling_logps must be computed over the same kept sets to compare; ref_logps over the
            full vocabulary (the k3 KL is then that of the truncated policy, the one the tokens were
            drawn from, to the reference model: a threshold on the reference's own logits would
            select another set).

    Returns a GRPOLossOutput; `logps` is 0 where the mask is 0 (padding is never computed).
    """
    config = GRPOLossConfig() if config is None else config
    if not isinstance(config, GRPOLossConfig):
        raise ValueError(f"config: expected a GRPOLossConfig, got {type(config).__name__}")
    _check_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    _check_ids(completion_ids, completion_mask, B, T, V, device)
    for name, value in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
        if value is not None:
            _tensor(name, value, shape=(B, T), device=device, float_dtype=True)
    if importance_sampling_ratio is not None:
        _tensor("importance_sampling_ratio", importance_sampling_ratio, device=device, float_dtype=True)
        if tuple(importance_sampling_ratio.shape) not in ((B, T), (B, 1), (B,)):
            raise ValueError(f"importance_sampling_ratio: expected shape ({B}, {T}), ({B}, 1) or ({B},), "
                             f"got {tuple(importance_sampling_ratio.shape)}")
        if config.loss_type == "vespo" and tuple(importance_sampling_ratio.shape) != (B, T):
            raise ValueError(f"importance_sampling_ratio: expected one ratio per token, shape ({B}, {T}), with "
                             f"loss_type='vespo' (as TRL, which needs a token-level correction mode), "
                             f"got {tuple(importance_sampling_ratio.shape)}")
    _check_threshold(logit_threshold, (B, T), device, completion_mask.bool())
    if entropy_threshold_fn is not None and not callable(entropy_threshold_fn):
        raise ValueError(f"entropy_threshold_fn: expected a callable or None, got {type(entropy_threshold_fn).__name__}")
    if config.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps: required when config.beta != 0 (beta={config.beta}), got None")
    if (advantages is None) == (rewards is None):
        raise ValueError("advantages / rewards: expected exactly one of them, got "
                         + ("both" if advantages is not None else "neither"))
    if rewards is not None:
        _tensor("rewards", rewards, shape=(B,), device=device, float_dtype=True)
        if group_size is None:
            raise ValueError("group_size: required with rewards, got None")
        advantages = compute_advantages(rewards, group_size, config.scale_rewards)
    else:
        _tensor("advantages", advantages, shape=(B,), device=device, float_dtype=True)
        advantages = advantages.float()
    backend = _resolve_backend(backend, device, hidden.dtype)

    mask = completion_mask.bool()
    if backend == "reference":
        from .reference import reference_grpo_loss

        return reference_grpo_loss(
            hidden, weight, completion_ids, mask, advantages, old_logps, ref_logps, bias, config,
            sampling_logps=sampling_logps, importance_sampling_ratio=importance_sampling_ratio,
            entropy_threshold_fn=entropy_threshold_fn, logit_threshold=logit_threshold,
        )

    flat_mask = mask.reshape(-1)
    active = flat_mask.nonzero().squeeze(1)
    seq_index = torch.div(active, T, rounding_mode="floor")
    weights = token_weights(mask, config).reshape(-1)

    def pick(t):
        return None if t is None else t.detach().reshape(-1).index_select(0, active).float()

    is_ratio = None
    if importance_sampling_ratio is not None:
        ratio = importance_sampling_ratio.detach().float()
        is_ratio = pick(ratio) if ratio.shape == (B, T) else ratio.reshape(B).index_select(0, seq_index)
    inputs = TokenInputs(
        targets=completion_ids.reshape(-1).index_select(0, active).long(),
        token_weight=weights.index_select(0, active),
        advantages=advantages.detach().index_select(0, seq_index),
        seq_index=seq_index,
        num_sequences=B,
        old_logps=pick(old_logps),
        ref_logps=pick(ref_logps),
        is_ratio=is_ratio,
        sampling_logps=pick(sampling_logps),
        entropy_threshold_fn=entropy_threshold_fn,
        num_tokens=int(active.numel()),
        logit_threshold=pick(logit_threshold),
    )
    hidden_active = hidden.reshape(B * T, hidden.shape[-1]).index_select(0, active)  # B or T may be 0

    def run(on: str):
        return fused_grpo_loss(hidden_active, weight, bias, inputs, config.spec(), on,
                               default_kernel_config(device, hidden.dtype), config.chunk_size)

    result = _with_fallback("grpo_loss", backend, device, run)

    logps = torch.zeros(B * T, device=device, dtype=torch.float32).index_copy_(0, active, result.logp)
    entropy = torch.zeros(B * T, device=device, dtype=torch.float32).index_copy_(0, active, result.entropy)
    metrics = _metrics(result, inputs, config)
    return GRPOLossOutput(loss=result.loss, logps=logps.view(B, T), advantages=advantages.detach(), metrics=metrics,
                          entropy=entropy.view(B, T))


def _metrics(result, inputs: TokenInputs, config: GRPOLossConfig) -> dict:
    """TRL's metrics of one call (0-dim detached tensors): masked means over this call's tokens, or
    over its sequences where the quantity is one per sequence."""
    n_active = max(int(inputs.targets.numel()), 1)  # masked means over zero tokens are 0
    metrics = {"entropy": result.entropy.sum() / n_active}
    if result.kl is not None:
        metrics["kl"] = result.kl.sum() / n_active
    if config.entropy_coef != 0.0:
        metrics["policy_loss"] = result.policy_loss

    def mean(flags):
        return flags.mean() if result.flags_per_sequence else flags.sum() / n_active

    def per_sequence(flags):  # [B] masked means (NaN for a sequence without tokens), as TRL's masked_seq_mean
        if result.flags_per_sequence:
            return flags
        B = inputs.num_sequences
        sums = torch.zeros(B, device=flags.device).index_add_(0, inputs.seq_index, flags)
        counts = torch.zeros(B, device=flags.device).index_add_(0, inputs.seq_index, torch.ones_like(flags))
        return sums / counts

    if config.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = mean(result.clip_high)
    elif config.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = result.phi.mean()
    elif config.loss_type != "sapo":
        metrics["clip_ratio/low_mean"] = mean(result.clip_low)
        metrics["clip_ratio/high_mean"] = mean(result.clip_high)
        metrics["clip_ratio/region_mean"] = mean(torch.maximum(result.clip_low, result.clip_high))
        metrics["clip_ratio/low_min"] = nan_extreme(per_sequence(result.clip_low), "min")
        metrics["clip_ratio/high_max"] = nan_extreme(per_sequence(result.clip_high), "max")
    return {k: v.detach() for k, v in metrics.items()}


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    completion_mask: Optional[Tensor] = None,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    on_chip: bool = False,
    logit_threshold: Optional[Tensor] = None,
):
    """Per-token log-probs `log_softmax(f(hidden @ weight.T + bias) / temperature)[completion_ids]`
    as a detached [B, T] fp32 tensor, without materialising the logits (old / reference policy
    passes, evaluation); f is the model's logit transform (`logit_scale`, `logit_softcap`, as in
    GRPOLossConfig). With `completion_mask`, only masked-in tokens are computed (others are 0).
    With `return_entropy=True`, returns (logps, entropy). `logit_threshold` ([B, T] float32, as in
    `grpo_loss`): each log-prob over the sampler's kept set {v : z_v / temperature >= threshold} plus
    the token itself; the entropy stays the full distribution's.

    For the same inputs and `chunk_size` the log-probs are those of `grpo_loss(...).logps` on the
    same backend, bit for bit: both compute one chunk of fp32 logits at a time (a few hundred MB)
    and read it with the same code, so a first iteration's ratio is exactly 1. `on_chip=True`
    (triton only) runs the forward-only kernel instead, which never writes logits at all; its fp32
    sums run in another order (log-probs within ~1e-5 of grpo_loss's)."""
    _check_head(hidden, weight, bias)
    B, T, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    _check_ids(completion_ids, completion_mask, B, T, V, device)
    _finite("temperature", temperature, minimum=0.0)
    if temperature == 0.0:
        raise ValueError("temperature: expected a value > 0, got 0.0")
    check_logit_transform(logit_scale, logit_softcap)
    _check_threshold(logit_threshold, (B, T), device, None if completion_mask is None else completion_mask.bool())
    backend = _resolve_backend(backend, device, hidden.dtype)
    if on_chip and backend != "triton":
        raise ValueError(f"on_chip: True needs the triton backend, got backend {backend!r}")
    with torch.no_grad():
        if backend == "reference":
            from .reference import neutral_at_masked, reference_logprobs

            keep = None if completion_mask is None else completion_mask.bool()
            threshold = logit_threshold
            if keep is not None:  # as the fused backends, never read masked positions (NaN, id -100)
                hidden, completion_ids = neutral_at_masked(keep, hidden, completion_ids)
                (threshold,) = neutral_at_masked(keep, threshold, fill=-math.inf)
            logps, entropy = reference_logprobs(hidden, weight, completion_ids, bias, temperature,
                                                logit_scale, logit_softcap, threshold)
            if keep is not None:
                logps, entropy = logps * keep, entropy * keep
        else:
            flat = hidden.reshape(B * T, H)
            ids = completion_ids.reshape(-1).long()
            threshold = None if logit_threshold is None else logit_threshold.reshape(-1)
            if completion_mask is not None:
                active = completion_mask.reshape(-1).bool().nonzero().squeeze(1)
                flat, ids = flat.index_select(0, active), ids.index_select(0, active)
                threshold = None if threshold is None else threshold.index_select(0, active)
            spec = LossSpec(temperature=float(temperature), logit_scale=float(logit_scale),
                            logit_softcap=None if logit_softcap is None else float(logit_softcap))

            def run(on: str):
                return forward_logprobs(flat, weight, ids, bias, spec, on, default_kernel_config(device, hidden.dtype),
                                        chunk_size, on_chip and on == "triton", logit_threshold=threshold)

            lp, ent = _with_fallback("token_logprobs_on_chip" if on_chip else "token_logprobs", backend, device, run)
            if completion_mask is not None:
                logps = torch.zeros(B * T, device=device).index_copy_(0, active, lp).view(B, T)
                entropy = torch.zeros(B * T, device=device).index_copy_(0, active, ent).view(B, T)
            else:
                logps, entropy = lp.view(B, T), ent.view(B, T)
    return (logps, entropy) if return_entropy else logps


class GRPOLoss(nn.Module):
    """nn.Module form of `grpo_loss` with a fixed config and backend."""

    def __init__(self, config: Optional[GRPOLossConfig] = None, backend: str = "auto"):
        super().__init__()
        self.config = GRPOLossConfig() if config is None else config
        _choice("backend", backend, BACKENDS)
        self.backend = backend

    def forward(self, hidden, weight, completion_ids, completion_mask, **kwargs) -> GRPOLossOutput:
        return grpo_loss(hidden, weight, completion_ids, completion_mask, config=self.config,
                         backend=self.backend, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}"
