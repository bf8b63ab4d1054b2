"""grpo-fast inside verl (0.9.x): its fused log-prob path and TRL's loss types as verl policy losses.

verl has two seams, both filled here without forking it:

- **The fused log-prob path.** With ``actor_rollout_ref.model.use_fused_kernels=True`` and
  ``fused_kernel_options.impl_backend=torch`` (or ``liger``), verl's model forward stops at the
  hidden states and calls ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (looked up
  at each call) for the per-token log-probs and entropies of the targets. ``FusedLinearForPPO``
  below has its signature and outputs; it runs grpo-fast's chunked passes (Triton on CUDA, PyTorch
  elsewhere) with fp32 logits, so its log-probs are those of ``grpo_fast.token_logprobs``.
- **The policy-loss registry.** ``grpo_fast_<loss_type>`` for each of TRL's loss types
  (``grpo_fast.loss.LOSS_TYPES``), selected with ``actor_rollout_ref.actor.policy_loss.loss_mode``.

verl has no config key that names an outside implementation of either, so both are installed by
importing this module in every verl process: ``actor_rollout_ref.model.external_lib=
grpo_fast.integrations.verl`` (verl imports it in each worker when it builds the model config;
the import installs when verl is already loaded), or ``install()`` from your own code.

Differences from verl's own torch function, all deliberate: the logits are fp32 (verl's are the
product in the hidden dtype, a bf16 logit of 32 is off by up to 0.125); the entropy is fp32 (verl
rounds it to the hidden dtype); the gradients accumulate in fp32 before one rounding; ``chunk_size``
defaults to grpo-fast's memory budget rather than 512 tokens.

The policy losses compute TRL 1.16's per-token policy term (the shared surrogates of
``grpo_fast.kernels.token_math``) and aggregate it with verl's ``agg_loss``, so verl's
data-parallel normalisation (``global_batch_info``) applies. Each loss type normalises as TRL's
does, which pins ``actor.loss_agg_mode`` (``LOSS_AGG_MODES``; another value is refused, since verl
also aggregates the entropy and KL terms with it). verl's names map to TRL's: ``clip_ratio_low`` /
``clip_ratio_high`` are ``epsilon_low`` / ``epsilon_high`` (``cispo``: TRL's cap on the ratio is
``1 + clip_ratio_high``), ``tau_pos`` / ``tau_neg`` are ``sapo_temperature_pos`` / ``_neg``.
verl's ``rollout_is_weights`` (its rollout correction from the rollout log-probs,
``algorithm.rollout_correction``) multiply the policy term as TRL's vLLM importance-sampling ratio
does (vespo: inside its sequence weight, so it needs ``rollout_is=token``). The KL term
(``use_kl_loss``, ``kl_loss_type=k3`` is TRL's) and the entropy bonus (``entropy_coeff``) stay verl's.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..kernels import LossSpec, TokenInputs, default_kernel_config, forward_logprobs
from ..kernels.chunked import gradient_chunks
from ..kernels.matmul import Head
from ..kernels.token_math import Policy, gamma_weight, log_importance_ratio, token_policy
from ..loss import (LOSS_TYPES, GRPOLossConfig, _check_head, _check_ids, _check_threshold, _choice, _finite,
                    _resolve_backend, _with_fallback)

# TRL's loss type -> the verl loss_agg_mode that normalises as TRL does. bnpo: verl's token-mean counts
# the tokens of the global batch (TRL's bnpo those of one process's batch), as dapo does.
LOSS_AGG_MODES = {
    "dapo": "token-mean", "bnpo": "token-mean", "cispo": "token-mean", "vespo": "token-mean",
    "grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",  # set actor.loss_scale_factor to the max response length
    "luspo": "seq-mean-token-sum",
}
LOSS_PREFIX = "grpo_fast_"
KERNEL = "verl_fused_linear"  # its name for grpo_fast.fallback


# ----------------------------------------------------------------------------------------------
# the fused log-prob function
# ----------------------------------------------------------------------------------------------


def _input_grads(hidden, weight, targets, threshold, d_logp, d_entropy, spec, backend, cfg, chunk_size, need_dh,
                 need_dw):
    """fp32 (d hidden [n, H], d weight [V, H]) of sum(d_logp * logp + d_entropy * entropy), one chunk of
    logits at a time. The incoming gradients are the row pass's per-token coefficients (a Policy
    computed outside), so the rows are the loss's own torch / Triton code."""
    n, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    zeros = torch.zeros(n, **f32)
    policy = Policy(token_grad=zeros if d_logp is None else d_logp.reshape(-1).float(), loss=zeros.sum(),
                    token_ratio=None, entropy_grad=None if d_entropy is None else d_entropy.reshape(-1).float(),
                    low=None, high=None)
    inputs = TokenInputs(targets=targets, token_weight=zeros, advantages=zeros,
                         seq_index=torch.zeros(n, device=hidden.device, dtype=torch.long), num_sequences=1,
                         num_tokens=n, logit_threshold=threshold)
    d_hidden = torch.empty(n, H, **f32) if need_dh else None
    d_weight = torch.zeros(V, H, **f32) if need_dw else None
    out = {k: torch.empty(n, **f32) for k in ("logp", "entropy", "loss", "low", "high")}
    out["kl"] = None
    gradient_chunks(hidden, Head(weight, None), inputs, spec, policy, backend, cfg, chunk_size, out,
                    d_hidden, d_weight, None)
    return d_hidden, d_weight


def _flat_inputs(hidden_states, vocab_weights, input_ids):
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() not in (2, 3):
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states: expected a [T, H] or [B, T, H] tensor, got {shape}")
    if not isinstance(input_ids, Tensor) or tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected shape {tuple(hidden_states.shape[:-1])} (hidden_states' "
                         f"leading dims), got {shape}")
    H = hidden_states.shape[-1]
    flat = hidden_states.reshape(-1, H)
    _check_head(flat.unsqueeze(0), vocab_weights, None)
    ids = input_ids.reshape(1, -1)
    _check_ids(ids, None, 1, ids.shape[1], vocab_weights.shape[0], hidden_states.device)
    return flat, ids.reshape(-1).long()


class FusedLinearForPPOFunction(torch.autograd.Function):
    """verl's ``FusedLinearForPPOFunction.apply(hidden_states, vocab_weights, input_ids, temperature,
    chunk_size)``: per-token (log-probs, entropies), both fp32 and shaped as ``input_ids``, of
    ``softmax(hidden_states @ vocab_weights.T / temperature)``, differentiable w.r.t. hidden_states
    and vocab_weights. ``chunk_size`` None: grpo-fast's memory budget; ``backend`` and
    ``logit_threshold`` (float32, shaped as ``input_ids``: log-probs over a truncating sampler's kept
    sets) as grpo_loss's."""

    @staticmethod
    def forward(ctx, hidden_states, vocab_weights, input_ids, temperature=1.0, chunk_size=None, backend="auto",
                logit_threshold=None):
        ctx.set_materialize_grads(False)
        _finite("temperature", temperature, minimum=0.0)
        if temperature == 0.0:
            raise ValueError("temperature: expected a value > 0, got 0.0")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
        flat, ids = _flat_inputs(hidden_states, vocab_weights, input_ids)
        device = flat.device
        _check_threshold(logit_threshold, tuple(input_ids.shape), device)
        threshold = None if logit_threshold is None else logit_threshold.reshape(-1)
        backend = _resolve_backend(backend, device, flat.dtype)
        if backend == "reference":
            raise ValueError("backend: expected 'auto', 'triton' or 'torch' (the chunked passes), got 'reference'")
        spec = LossSpec(temperature=float(temperature))
        cfg = default_kernel_config(device, flat.dtype)

        def run(on):
            return (on,) + tuple(forward_logprobs(flat, vocab_weights, ids, None, spec, on, cfg, chunk_size,
                                                  logit_threshold=threshold))

        # the backward reruns the row pass on whichever backend the forward ran
        used, logp, entropy = _with_fallback(KERNEL, backend, device, run)
        ctx.save_for_backward(flat, vocab_weights, ids, threshold)
        ctx.options = (spec, used, cfg, chunk_size, tuple(hidden_states.shape))
        return logp.view(input_ids.shape), entropy.view(input_ids.shape)

    @staticmethod
    def backward(ctx, d_logp, d_entropy):
        flat, weight, ids, threshold = ctx.saved_tensors
        spec, backend, cfg, chunk_size, shape = ctx.options
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (d_logp is None and d_entropy is None) or not (need_dh or need_dw):
            return None, None, None, None, None, None, None
        def run(on):  # each run writes only buffers of its own, so a failed Triton launch leaves nothing
            return _input_grads(flat, weight, ids, threshold, d_logp, d_entropy, spec, on, cfg, chunk_size, need_dh,
                                need_dw)

        d_hidden, d_weight = _with_fallback(KERNEL, backend, flat.device, run)
        return (None if d_hidden is None else d_hidden.to(flat.dtype).view(shape),
                None if d_weight is None else d_weight.to(weight.dtype), None, None, None, None, None)


class FusedLinearForPPO(nn.Module):
    """Drop-in for verl's ``FusedLinearForPPO(chunk_size, impl_backend)``; ``forward(hidden_states,
    vocab_weights, input_ids, temperature)`` returns fp32 (log_probs, entropy) shaped as input_ids.
    ``impl_backend`` is verl's choice ("torch" / "liger"), accepted and replaced by grpo-fast's
    ``backend`` ("auto": Triton on CUDA, PyTorch elsewhere)."""

    def __init__(self, chunk_size: Optional[int] = None, impl_backend: str = "torch", backend: str = "auto"):
        super().__init__()
        _choice("impl_backend", impl_backend, ("torch", "liger"))
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend
        self.backend = backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0,
                logit_threshold: Optional[Tensor] = None):
        return FusedLinearForPPOFunction.apply(hidden_states, vocab_weights, input_ids, temperature,
                                               self.chunk_size, self.backend, logit_threshold)


# ----------------------------------------------------------------------------------------------
# TRL's loss types as verl policy losses
# ----------------------------------------------------------------------------------------------


def _option(config, name, default):
    value = None if config is None else (config.get(name, None) if hasattr(config, "get") else getattr(config, name, None))
    return default if value is None else value


def loss_config(loss_type: str, config=None) -> GRPOLossConfig:
    """The GRPOLossConfig of a verl actor config (its keys read by verl's own losses)."""
    clip = _option(config, "clip_ratio", 0.2)
    low, high = _option(config, "clip_ratio_low", clip), _option(config, "clip_ratio_high", clip)
    return GRPOLossConfig(loss_type=loss_type, epsilon_low=float(low),
                          epsilon_high=float(1.0 + high if loss_type == "cispo" else high),
                          sapo_temperature_pos=float(_option(config, "tau_pos", 1.0)),
                          sapo_temperature_neg=float(_option(config, "tau_neg", 1.05)))


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    return float((x.float() * mask).sum() / mask.sum().clamp(min=1.0))


def make_policy_loss(loss_type: str, agg_loss: Callable) -> Callable:
    """verl's policy-loss function for TRL's ``loss_type``; ``agg_loss`` is verl's
    (``verl.trainer.ppo.core_algos.agg_loss``)."""
    _choice("loss_type", loss_type, LOSS_TYPES)
    expected_mode = LOSS_AGG_MODES[loss_type]

    def policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                    loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Optional[Tensor] = None):
        if loss_agg_mode != expected_mode:
            raise ValueError(f"loss_agg_mode: {LOSS_PREFIX}{loss_type} normalises as TRL's loss_type="
                             f"'{loss_type}', expected {expected_mode!r} (actor.loss_agg_mode), got {loss_agg_mode!r}")
        spec = loss_config(loss_type, config).spec()
        mask = response_mask.bool()
        zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
        # padding is never read: verl's padded positions may hold anything
        logp = torch.where(mask, log_prob, zero)
        old = torch.where(mask, old_log_prob.detach().to(log_prob.dtype), zero)
        adv = torch.where(mask, advantages.detach().to(log_prob.dtype), zero)
        log_ratio = log_importance_ratio(logp, old)
        weight = torch.ones_like(logp) if rollout_is_weights is None else rollout_is_weights.detach().to(logp.dtype)
        metrics = {"actor/ppo_kl": _masked_mean(-log_ratio.detach(), mask)}
        if loss_type == "vespo":
            seq_log_w = (log_ratio.detach().clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
            if rollout_is_weights is not None:
                log_is = torch.log(weight).clamp(-18.420680743952367, 20.0)  # log(1e-8), as TRL
                seq_log_w = seq_log_w + (log_is * mask).sum(-1, keepdim=True)
            phi = gamma_weight(seq_log_w, adv, spec)
            per_token = -phi * adv * logp
            metrics["actor/vespo/phi_seq_mean"] = _masked_mean(phi, mask)
        else:
            # cispo's ratio carries no gradient (TRL's detach); the others' gradient is through the ratio
            ratio_input = log_ratio.detach() if loss_type == "cispo" else log_ratio
            per_token, _, low, high = token_policy(logp, ratio_input, adv, weight, spec)
            if loss_type == "cispo":
                metrics["actor/cispo_clip_ratio"] = _masked_mean(high, mask)
            elif low is not None:
                metrics["actor/clip_ratio/low_mean"] = _masked_mean(low, mask)
                metrics["actor/clip_ratio/high_mean"] = _masked_mean(high, mask)
                metrics["actor/clip_ratio/region_mean"] = _masked_mean(low | high, mask)
        batch_info = dict(_option(config, "global_batch_info", {}) or {})
        loss = agg_loss(loss_mat=per_token, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
        return loss, metrics

    policy_loss.__name__ = f"{LOSS_PREFIX}{loss_type}"
    return policy_loss


# ----------------------------------------------------------------------------------------------
# installing into verl
# ----------------------------------------------------------------------------------------------


def register_policy_losses() -> list[str]:
    """Register ``grpo_fast_<loss_type>`` for every loss type in verl's registry; returns the names."""
    from verl.trainer.ppo import core_algos

    names = []
    for loss_type in LOSS_TYPES:
        name = f"{LOSS_PREFIX}{loss_type}"
        core_algos.register_policy_loss(name)(make_policy_loss(loss_type, core_algos.agg_loss))
        names.append(name)
    return names


def patch_fused_linear() -> None:
    """Make verl's fused log-prob path (``use_fused_kernels``, impl_backend torch / liger) run grpo-fast's.
    verl's model forwards import ``FusedLinearForPPO`` from this module at each call."""
    from verl.utils.experimental import torch_functional

    torch_functional.FusedLinearForPPO = FusedLinearForPPO
    torch_functional.FusedLinearForPPOFunction = FusedLinearForPPOFunction


def install() -> list[str]:
    """Both: the policy losses registered and the fused path patched, in this process."""
    patch_fused_linear()
    return register_policy_losses()


if "verl" in sys.modules:  # imported by verl itself (actor_rollout_ref.model.external_lib)
    install()
