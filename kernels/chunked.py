"""Chunked, memory-lean GRPO loss: the driver shared by the `torch` and `triton` backends.

Inputs are the active tokens only (rows of `hidden` where completion_mask == 1), so padding
costs no FLOPs. Per chunk of at most `chunk` tokens:

    logits   = h_c @ W^T (+ b)                      tensor-core matmul, fp32 result (kernels/matmul.py)
    row pass = lse, logp, entropy, GRPO terms, g;   d_logits (input dtype, scaled by S for fp16)
               (triton: one fused kernel writing d_logits over the chunk's own buffer;
                torch: the same maths in fp32 PyTorch ops)
    d_h_c    = (d_logits @ W) / S                   fp32, only when hidden requires grad
    d_W     += (d_logits^T @ h_c) / S               fp32 accumulator, only when the head is trained

The loss is a scalar, so its gradients are computed in the forward pass (in fp32) and scaled by the
incoming gradient in backward, in fp32, before their one rounding to the input dtype; nothing of
size [tokens, vocab] outlives a chunk. Without any input requiring grad (no-grad passes) the
forward-only path runs instead. Both passes read the same fp32 logits, so the log-probs of the
training pass equal those of `forward_logprobs` (old / reference policy) on the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .config import KernelConfig
from .matmul import Head
from .token_math import (LossSpec, Policy, TokenInputs, inputs_entropy_grad, kept_log_sum_exp, slice_inputs,
                         token_terms, transform_logits_, whole_batch_policy)

FP16_MAX = 65504.0


@dataclass
class FusedResult:
    loss: Tensor  # scalar fp32
    logp: Tensor  # [n] fp32
    entropy: Tensor  # [n] fp32
    kl: Optional[Tensor]  # [n] fp32, None without ref_logps
    clip_low: Tensor  # [n] (token level) or [B] (sequence level) fp32 0/1 (clip policies)
    clip_high: Tensor  # likewise; cispo: its clip flags
    policy_loss: Tensor  # scalar: the loss without the entropy bonus
    phi: Tensor  # [B] vespo's sequence weights, else empty
    flags_per_sequence: bool = False  # clip_low / clip_high hold one value per sequence


def _result(loss, logp, entropy, kl, policy: Optional[Policy], low, high, entropy_grad, spec) -> FusedResult:
    """Assemble a FusedResult: the clip flags from the whole-batch policy when there is one, else the rows'."""
    per_sequence = False
    if policy is not None:
        per_sequence = spec.sequence_level and spec.policy != "vespo"
        flags = [f.float() if f is not None else None for f in (policy.low, policy.high)]
        shape_of = next((f for f in flags if f is not None), low)
        low, high = (f if f is not None else torch.zeros_like(shape_of) for f in flags)
    bonus = (entropy_grad * entropy).sum() if entropy_grad is not None else 0.0
    phi = policy.phi if policy is not None and policy.phi is not None else logp.new_zeros(0)
    return FusedResult(loss, logp, entropy, kl, low, high, (loss - bonus).detach(), phi, per_sequence)


def log_sum_exp(z: Tensor) -> Tensor:
    """Row-wise max + log(sum(exp(z - max))), as the Triton kernel and log_softmax compute it: a row with
    an infinite logit gives NaN (torch.logsumexp gives inf there, and the target's log-prob would be a
    plausible -inf instead of NaN)."""
    m = z.amax(dim=-1, keepdim=True)
    return m.squeeze(-1) + torch.log(torch.exp(z - m).sum(dim=-1))


def truncated_log_sum_exps(z: Tensor, z_target: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """(log_sum_exp(z), the log-sum-exp over each row's kept set {z >= threshold} + {target}), the
    second from the first's max and exps (as the Triton kernels compute it)."""
    m = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - m)
    m = m.squeeze(-1)
    lse = m + torch.log(e.sum(dim=-1))
    s_kept = e.masked_fill_(z < threshold[:, None], 0.0).sum(dim=-1)
    return lse, kept_log_sum_exp(m, s_kept, z_target, threshold)


def _row_logp(z: Tensor, targets: Tensor, threshold: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(logp, lse, lse over the kept set or None) of temperature-scaled fp32 logits z: the one
    log-prob computation of the torch backend's no-grad and training passes."""
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    if threshold is None:
        lse = log_sum_exp(z)
        return z_target - lse, lse, None
    lse, lse_kept = truncated_log_sum_exps(z, z_target, threshold)
    return z_target - lse_kept, lse, lse_kept


# The token tile of the chunk's GEMMs (cuBLAS's and Triton's largest M tile): a chunk that is not a
# multiple of it ends in a partly empty row of tiles (882 tokens = 6.9 tiles of 128).
GEMM_TILE_TOKENS = 128


def chunk_tokens(n: int, vocab: int, bytes_per_logit: int, cfg: KernelConfig, chunk_size: Optional[int]) -> int:
    """Tokens per chunk: `chunk_size`, else as many as `cfg.chunk_bytes` holds, rounded down to a
    multiple of GEMM_TILE_TOKENS when it holds more than one tile (so never above the budget). The
    training and no-grad passes both chunk with this, so they read the same logits."""
    if chunk_size is not None:
        return max(1, min(n, chunk_size))
    per_token = max(1, vocab * bytes_per_logit)
    budget = cfg.chunk_bytes // per_token
    if budget > GEMM_TILE_TOKENS:
        budget -= budget % GEMM_TILE_TOKENS
    return max(1, min(n, budget))


# ----------------------------------------------------------------------------------------------
# forward-only log-probs: the training pass's first half, on the same fp32 chunks
# ----------------------------------------------------------------------------------------------


def _logprobs_torch(head: Head, hidden, targets, spec: LossSpec, chunk, threshold) -> tuple[Tensor, Tensor]:
    n = hidden.shape[0]
    logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(n, device=hidden.device, dtype=torch.float32)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        z, _ = transform_logits_(head.logits(hidden[start:end]), spec.logit_scale, spec.logit_softcap)
        z.mul_(1.0 / spec.temperature)
        logp[start:end], lse, _ = _row_logp(z, targets[start:end], None if threshold is None else threshold[start:end])
        log_p = z.sub_(lse[:, None])
        entropy[start:end] = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def _logprobs_triton(head: Head, hidden, targets, spec: LossSpec, chunk, cfg, threshold) -> tuple[Tensor, Tensor]:
    from .grpo_kernel import logprob_rows_triton

    n = hidden.shape[0]
    logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(n, device=hidden.device, dtype=torch.float32)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logprob_rows_triton(head.logits(hidden[start:end]), targets[start:end], logp[start:end], entropy[start:end],
                            temperature=spec.temperature, logit_scale=spec.logit_scale,
                            logit_softcap=spec.logit_softcap, cfg=cfg,
                            logit_threshold=None if threshold is None else threshold[start:end])
    return logp, entropy


def forward_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    spec: LossSpec,
    backend: str,
    cfg: KernelConfig,
    chunk_size: Optional[int] = None,
    on_chip: bool = False,
    logit_threshold: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Per-token (logp, entropy) in fp32 for hidden [n, H]; no autograd; spec's temperature and logit
    transform. The logits of a chunk are computed and read exactly as in the training pass (same
    chunking for the same `chunk_size`), so the log-probs equal the training pass's.

    `logit_threshold` ([n] fp32, or None): truncated sampling's threshold on z / T; each log-prob is
    then over the kept set {v : z_v / T >= threshold} + {target} (-inf: the full vocabulary), the
    entropy still of the full distribution.

    `on_chip` (triton only): the forward-only kernel whose logit tiles never leave the chip: no chunk
    buffer, but fp32 sums in another order (log-probs within ~1e-5 of the training pass's)."""
    with torch.no_grad():
        if on_chip:
            from .logprob_kernel import logprobs_triton

            return logprobs_triton(hidden, weight, targets, bias, spec.temperature, cfg,
                                   logit_scale=spec.logit_scale, logit_softcap=spec.logit_softcap,
                                   logit_threshold=logit_threshold)
        head = Head(weight, bias)
        chunk = chunk_tokens(hidden.shape[0], weight.shape[0], _bytes_per_logit(backend), cfg, chunk_size)
        if backend == "triton":
            return _logprobs_triton(head, hidden, targets, spec, chunk, cfg, logit_threshold)
        return _logprobs_torch(head, hidden, targets, spec, chunk, logit_threshold)


def _bytes_per_logit(backend: str) -> int:
    # triton: the fp32 chunk (d_logits are written over it); torch: also fp32 temporaries (log p,
    # dz/dx) and the cast d_logits. Both passes chunk alike, so they see the same logits.
    return 4 if backend == "triton" else 12


# ----------------------------------------------------------------------------------------------
# one chunk of the training pass
# ----------------------------------------------------------------------------------------------


def fp16_gradient_scale(grad: Tensor, spec: LossSpec) -> Tensor:
    """[1] fp32 power of two S such that S * |d_logit| <= 65504 for every token of the chunk.

    |d_logit_j| = |g| |1[j == y] - p_j| |dz/dx| / T <= |g| logit_scale / T, so the scaled gradients
    fill fp16's range without overflowing, and the off-target terms |g| p_j keep ~2^16 / |g| more of
    their range than unscaled (they would flush to zero below 6e-8)."""
    bound = grad.abs().max().reshape(1) * (spec.logit_scale / spec.temperature)
    return torch.exp2(torch.floor(torch.log2(FP16_MAX / bound))).clamp_(max=2.0 ** 100)


def _gradient_scale_fn(spec: LossSpec, entropy: Tensor, entropy_grad: Optional[Tensor]):
    """The fp16 gradient scale of a chunk from its g (and, with an entropy bonus, e and H: the bonus's
    term e p_j (log p_j + H) is at most |e| (1/e + H), p |log p| <= 1/e)."""
    def scale(grad: Tensor) -> Tensor:
        bound = grad.abs()
        if entropy_grad is not None:
            bound = bound + entropy_grad.abs() * (math.exp(-1.0) + entropy.abs())
        return fp16_gradient_scale(bound, spec)

    return scale


def _rows_torch(logits: Tensor, inputs: TokenInputs, spec: LossSpec, policy: Optional[Policy], start: int,
                out: dict, grad_dtype: torch.dtype):
    """PyTorch twin of the Triton row kernel on fp32 `logits` (consumed); returns (d_logits in
    `grad_dtype`, the gradient scale S or None, the chunk's entropy gradient or None)."""
    inv_t = 1.0 / spec.temperature
    z, dz = transform_logits_(logits, spec.logit_scale, spec.logit_softcap, want_derivative=True)
    z.mul_(inv_t)
    threshold = inputs.logit_threshold
    logp, lse, lse_kept = _row_logp(z, inputs.targets, threshold)
    kept = None
    if threshold is not None:  # the kept set K, before z becomes log p
        kept = (z >= threshold[:, None]).scatter_(1, inputs.targets[:, None], True)
    log_p = z.sub_(lse[:, None])
    entropy = -(log_p.exp() * log_p).sum(-1)
    out["entropy"].copy_(entropy)
    out["logp"].copy_(logp)
    terms = token_terms(logp, entropy, inputs, spec, policy, start)
    out["loss"].copy_(terms.loss)
    if terms.kl is not None:
        out["kl"].copy_(terms.kl)
    if terms.low is not None:
        out["low"].copy_(terms.low)
    if terms.high is not None:
        out["high"].copy_(terms.high)
    # d loss / d raw logit = S [g (onehot - p') - e p (log p + H)] dz/dx / T, p' = p without a
    # threshold, else the kept set's softmax (0 outside it: masked, as its exp may overflow there)
    scale = None
    if grad_dtype == torch.float16:
        scale = _gradient_scale_fn(spec, entropy, terms.entropy_grad)(terms.grad)
    if terms.entropy_grad is not None:
        bonus = log_p.add(entropy[:, None]).mul_(log_p.exp()).mul_(terms.entropy_grad[:, None])
    p = log_p.exp_() if kept is None else log_p.add_((lse - lse_kept)[:, None]).exp_().masked_fill_(~kept, 0.0)
    p.neg_().scatter_add_(1, inputs.targets[:, None], torch.ones_like(logp[:, None])).mul_(terms.grad[:, None])
    if terms.entropy_grad is not None:
        p.sub_(bonus)
        del bonus
    p.mul_(dz if isinstance(dz, Tensor) else dz * inv_t)
    if isinstance(dz, Tensor):
        p.mul_(inv_t)
    if scale is not None:
        p.mul_(scale)
    return (p if p.dtype == grad_dtype else p.to(grad_dtype)), scale, terms.entropy_grad


def _rows_triton(logits: Tensor, inputs: TokenInputs, spec: LossSpec, policy: Optional[Policy], start: int,
                 out: dict, cfg, grad_dtype: torch.dtype):
    """The row kernel over fp32 `logits`; d_logits go over the chunk's own buffer (the first half of
    each row for bf16 / fp16). Returns (d_logits, the gradient scale S or None, the entropy gradient)."""
    from .grpo_kernel import grpo_rows_triton

    n, V = logits.shape
    end = start + n
    d_logits = logits if grad_dtype == torch.float32 else logits.view(grad_dtype)[:, :V]
    if policy is not None:
        entropy_grad = None if policy.entropy_grad is None else policy.entropy_grad[start:end]
    else:
        entropy_grad = inputs_entropy_grad(inputs, n, spec)
    tensors = {
        "targets": inputs.targets,
        "weight": inputs.token_weight,
        "policy_weight": inputs.policy_weight(spec),
        "advantages": inputs.advantages,
        "old": inputs.old_logps,
        "ref": inputs.ref_logps,
        "policy_grad": None if policy is None else policy.token_grad[start:end],
        "seq_ratio": None if policy is None or policy.token_ratio is None else policy.token_ratio[start:end],
        "entropy_grad": entropy_grad,
        "threshold": inputs.logit_threshold,
    }
    scales = []
    pick = _gradient_scale_fn(spec, out["entropy"], entropy_grad)

    def pick_scale(grad: Tensor) -> Tensor:
        scales.append(pick(grad))
        return scales[-1]

    grpo_rows_triton(logits, d_logits, out, tensors, spec,
                     grad_scale=pick_scale if grad_dtype == torch.float16 else None, cfg=cfg)
    return d_logits, (scales[0] if scales else None), entropy_grad


def gradient_chunks(hidden: Tensor, head: Head, inputs: TokenInputs, spec: LossSpec, policy: Optional[Policy],
                    backend: str, cfg: KernelConfig, chunk_size, out: dict, d_hidden: Optional[Tensor],
                    d_weight: Optional[Tensor], d_bias: Optional[Tensor]) -> list:
    """The training pass's chunk loop: per chunk of tokens (the forward's chunks: the same logits), the
    fp32 logits, the row pass (writing ``out``'s per-token [n] tensors and the chunk's d_logits in place),
    then d_hidden (rows of it), d_weight and d_bias accumulated in fp32 where given (None: not needed).
    Returns each chunk's entropy gradient (None where the row pass has none)."""
    n, V = hidden.shape[0], head.weight.shape[0]
    entropy_grads = []
    chunk = chunk_tokens(n, V, _bytes_per_logit(backend), cfg, chunk_size)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h = hidden[start:end]
        logits = head.logits(h)
        part = slice_inputs(inputs, start, end)
        part_out = {k: (v[start:end] if v is not None else None) for k, v in out.items()}
        if backend == "triton":
            d_logits, scale, entropy_grad = _rows_triton(logits, part, spec, policy, start, part_out, cfg, hidden.dtype)
        else:
            d_logits, scale, entropy_grad = _rows_torch(logits, part, spec, policy, start, part_out, hidden.dtype)
        entropy_grads.append(entropy_grad)
        del logits
        inv_scale = None if scale is None else 1.0 / scale
        if d_hidden is not None:
            head.d_hidden_into(d_logits, out=d_hidden[start:end])
            if inv_scale is not None:
                d_hidden[start:end].mul_(inv_scale)
        if d_weight is not None:  # fp16: one host sync per chunk for the product's scalar factor
            head.accumulate_d_weight(d_weight, d_logits, h, alpha=1.0 if inv_scale is None else float(inv_scale))
        if d_bias is not None:
            column_sums = d_logits.sum(0, dtype=torch.float32)
            d_bias.add_(column_sums if inv_scale is None else column_sums.mul_(inv_scale))
        del d_logits
    return entropy_grads


def _run(hidden, weight, bias, inputs: TokenInputs, spec: LossSpec, backend: str, cfg: KernelConfig,
         chunk_size, need_dh: bool, need_dw: bool, need_db: bool):
    n, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    f32 = dict(device=device, dtype=torch.float32)
    if inputs.num_tokens is None:  # the entropy bonus's mean is over the call's tokens, not a chunk's
        inputs = replace(inputs, num_tokens=n)

    threshold = inputs.logit_threshold
    if not (need_dh or need_dw or need_db):
        logp, entropy = forward_logprobs(hidden, weight, inputs.targets, bias, spec, backend, cfg, chunk_size,
                                         logit_threshold=threshold)
        policy = whole_batch_policy(logp, entropy, inputs, spec) if spec.whole_batch else None
        terms = token_terms(logp, entropy, inputs, spec, policy)
        loss = terms.loss.sum() + (policy.loss if policy is not None else 0.0)
        zeros = torch.zeros(n, **f32)
        low = terms.low.float() if terms.low is not None else zeros
        high = terms.high.float() if terms.high is not None else zeros
        return _result(loss, logp, entropy, terms.kl, policy, low, high, terms.entropy_grad, spec), None, None, None

    policy = None
    if spec.whole_batch:  # every token's log-prob first: the same values the chunks below compute
        pre_logp, pre_entropy = forward_logprobs(hidden, weight, inputs.targets, bias, spec, backend, cfg, chunk_size,
                                                 logit_threshold=threshold)
        policy = whole_batch_policy(pre_logp, pre_entropy, inputs, spec)

    head = Head(weight, bias)
    out = {k: torch.zeros(n, **f32) for k in ("logp", "entropy", "loss", "low", "high")}
    out["kl"] = torch.zeros(n, **f32) if inputs.ref_logps is not None else None
    # gradients are kept in fp32 until backward has scaled them by the upstream gradient
    d_hidden = torch.empty(n, H, **f32) if need_dh else None
    d_weight = torch.zeros(V, H, **f32) if need_dw else None
    d_bias = torch.zeros(V, **f32) if need_db else None
    entropy_grads = gradient_chunks(hidden, head, inputs, spec, policy, backend, cfg, chunk_size, out,
                                    d_hidden, d_weight, d_bias)

    loss = out["loss"].sum() + (policy.loss if policy is not None else 0.0)
    entropy_grad = None if not entropy_grads or entropy_grads[0] is None else torch.cat(entropy_grads)
    result = _result(loss, out["logp"], out["entropy"], out["kl"], policy, out["low"], out["high"], entropy_grad, spec)
    return result, d_hidden, d_weight, d_bias


class _FusedGRPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs, spec, backend, cfg, chunk_size):
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        result, d_hidden, d_weight, d_bias = _run(
            hidden, weight, bias, inputs, spec, backend, cfg, chunk_size, need_dh, need_dw, need_db
        )
        # Kept on ctx (not save_for_backward): they are outputs of this forward, scaled in place once.
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.flags_per_sequence = result.flags_per_sequence
        extras = [result.logp, result.entropy, result.clip_low, result.clip_high, result.policy_loss, result.phi]
        kl = result.kl if result.kl is not None else torch.zeros(0, device=hidden.device)
        ctx.mark_non_differentiable(*extras, kl)
        return (result.loss, *extras, kl)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("the fused GRPO loss does not support backward twice (retain_graph)")
        d_hidden, d_weight, d_bias = ctx.grads
        ctx.grads = None
        # The upstream gradient (a GradScaler's 65536, say) multiplies the fp32 gradients before their
        # one rounding to the input dtype: in fp16 the scale itself would not fit.
        scale = grad_loss.to(torch.float32)
        grads = []
        for g, dtype in zip((d_hidden, d_weight, d_bias), ctx.dtypes):
            grads.append(None if g is None else g.mul_(scale).to(dtype))
        return grads[0], grads[1], grads[2], None, None, None, None, None


def fused_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    inputs: TokenInputs,
    spec: LossSpec,
    backend: str,
    cfg: KernelConfig,
    chunk_size: Optional[int] = None,
) -> FusedResult:
    """GRPO loss over active tokens; `backend` is "torch" or "triton". Differentiable w.r.t.
    hidden, weight and bias (whichever require grad)."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend: expected 'torch' or 'triton', got {backend!r}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        loss, logp, entropy, low, high, policy_loss, phi, kl = _FusedGRPOFunction.apply(
            hidden, weight, bias, inputs, spec, backend, cfg, chunk_size
        )
        per_sequence = spec.sequence_level and spec.policy != "vespo"
        return FusedResult(loss, logp, entropy, kl if inputs.ref_logps is not None else None, low, high, policy_loss,
                           phi, per_sequence)
    result, _, _, _ = _run(hidden, weight, bias, inputs, spec, backend, cfg, chunk_size, False, False, False)
    return result
