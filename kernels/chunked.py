"""Chunked, memory-lean GRPO loss: the driver shared by the `torch` and `triton` backends.

Inputs are the active tokens only (rows of `hidden` where completion_mask == 1), so padding
costs no FLOPs. Per chunk of at most `chunk` tokens:

    logits   = h_c @ W^T (+ b)                      tensor-core matmul, logits dtype = input dtype
    row pass = lse, logp, entropy, GRPO terms, g;   logits <- d_logits in place
               (triton: one fused kernel; torch: the same maths in fp32 PyTorch ops)
    d_h_c    = d_logits @ W                         only when hidden requires grad
    d_W     += d_logits^T @ h_c                     only when the head is trained (fp32 accumulator)

The loss is a scalar, so its gradients are computed in the forward pass and scaled by the
incoming gradient in backward; nothing of size [tokens, vocab] outlives a chunk. Without any
input requiring grad (no-grad passes) the forward-only path runs instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .config import KernelConfig
from .token_math import LossSpec, TokenInputs, sequence_policy, slice_inputs, token_terms


@dataclass
class FusedResult:
    loss: Tensor  # scalar fp32
    logp: Tensor  # [n] fp32
    entropy: Tensor  # [n] fp32
    kl: Optional[Tensor]  # [n] fp32, None without ref_logps
    clip_low: Tensor  # [n] (token level) or [B] (sequence level) fp32 0/1
    clip_high: Tensor


def chunk_tokens(n: int, vocab: int, bytes_per_logit: int, cfg: KernelConfig, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(n, chunk_size))
    per_token = max(1, vocab * bytes_per_logit)
    return max(1, min(n, cfg.chunk_bytes // per_token))


# ----------------------------------------------------------------------------------------------
# forward-only log-probs (no logits kept: triton keeps tiles on chip, torch holds one chunk)
# ----------------------------------------------------------------------------------------------


def _logprobs_torch(hidden, weight, targets, bias, temperature, chunk) -> tuple[Tensor, Tensor]:
    n = hidden.shape[0]
    logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(n, device=hidden.device, dtype=torch.float32)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        z = hidden[start:end] @ weight.T
        if bias is not None:
            z = z + bias
        z = z.float().div_(temperature)
        lse = torch.logsumexp(z, dim=-1)
        logp[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - lse
        z.sub_(lse[:, None])  # z is now log p
        entropy[start:end] = -(z.exp() * z).sum(-1)
    return logp, entropy


def forward_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    backend: str,
    cfg: KernelConfig,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Per-token (logp, entropy) in fp32 for hidden [n, H]; no autograd."""
    with torch.no_grad():
        if backend == "triton":
            from .logprob_kernel import logprobs_triton

            return logprobs_triton(hidden, weight, targets, bias, temperature, cfg)
        chunk = chunk_tokens(hidden.shape[0], weight.shape[0], 12, cfg, chunk_size)
        return _logprobs_torch(hidden, weight, targets, bias, temperature, chunk)


# ----------------------------------------------------------------------------------------------
# one chunk of the training pass
# ----------------------------------------------------------------------------------------------


def _rows_torch(logits: Tensor, inputs: TokenInputs, spec: LossSpec, seq_grad, seq_ratio, out: dict) -> Tensor:
    """PyTorch twin of the Triton row kernel; returns d_logits (in logits' dtype)."""
    inv_t = 1.0 / spec.temperature
    z = logits.float().mul_(inv_t)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, inputs.targets[:, None]).squeeze(1) - lse
    p = torch.exp(z - lse[:, None])
    out["entropy"].copy_(lse - (p * z).sum(-1))
    del z
    out["logp"].copy_(logp)
    terms = token_terms(logp, inputs, spec, seq_grad, seq_ratio)
    out["loss"].copy_(terms.loss)
    if terms.kl is not None:
        out["kl"].copy_(terms.kl)
    if terms.low is not None:
        out["low"].copy_(terms.low)
        out["high"].copy_(terms.high)
    # d loss / d raw logit = g * (onehot - p) / T
    p.neg_().scatter_add_(1, inputs.targets[:, None], torch.ones_like(logp[:, None]))
    p.mul_((terms.grad * inv_t)[:, None])
    return p if p.dtype == logits.dtype else p.to(logits.dtype)


def _rows_triton(logits: Tensor, inputs: TokenInputs, spec: LossSpec, seq_grad, seq_ratio, out: dict, cfg) -> Tensor:
    from .grpo_kernel import grpo_rows_triton

    grpo_rows_triton(
        logits,
        inputs.targets,
        inputs.token_weight,
        inputs.advantages,
        inputs.old_logps,
        inputs.ref_logps,
        seq_grad,
        seq_ratio,
        out,
        beta=spec.beta,
        kl_bias_correction=spec.kl_bias_correction,
        epsilon_low=spec.epsilon_low,
        epsilon_high=spec.epsilon_high,
        delta=spec.delta,
        temperature=spec.temperature,
        cfg=cfg,
    )
    return logits


def _run(hidden, weight, bias, inputs: TokenInputs, spec: LossSpec, backend: str, cfg: KernelConfig,
         chunk_size, need_dh: bool, need_dw: bool, need_db: bool):
    n, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    f32 = dict(device=device, dtype=torch.float32)

    seq = None
    if spec.sequence_level:
        pre_logp, _ = forward_logprobs(hidden, weight, inputs.targets, bias, spec.temperature, backend, cfg, chunk_size)
        seq = sequence_policy(pre_logp, inputs, spec)

    if not (need_dh or need_dw or need_db):
        logp, entropy = forward_logprobs(hidden, weight, inputs.targets, bias, spec.temperature, backend, cfg, chunk_size)
        terms = token_terms(logp, inputs, spec, None if seq is None else seq.token_grad,
                            None if seq is None else seq.token_ratio)
        loss = terms.loss.sum() + (seq.loss if seq is not None else 0.0)
        low = seq.low.float() if seq is not None else terms.low.float()
        high = seq.high.float() if seq is not None else terms.high.float()
        return FusedResult(loss, logp, entropy, terms.kl, low, high), None, None, None

    out = {k: torch.zeros(n, **f32) for k in ("logp", "entropy", "loss", "low", "high")}
    out["kl"] = torch.zeros(n, **f32) if inputs.ref_logps is not None else None
    d_hidden = torch.empty_like(hidden) if need_dh else None
    d_weight = torch.zeros(V, H, **f32) if need_dw else None
    d_bias = torch.zeros(V, **f32) if need_db else None

    # the torch path holds fp32 temporaries of the chunk (z/p and the cast back): budget 3 copies
    bytes_per_logit = hidden.element_size() if backend == "triton" else 12
    chunk = chunk_tokens(n, V, bytes_per_logit, cfg, chunk_size)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h = hidden[start:end]
        logits = h @ weight.T
        if bias is not None:
            logits += bias
        part = slice_inputs(inputs, start, end)
        part_out = {k: (v[start:end] if v is not None else None) for k, v in out.items()}
        seq_grad = None if seq is None else seq.token_grad[start:end]
        seq_ratio = None if seq is None else seq.token_ratio[start:end]
        if backend == "triton":
            d_logits = _rows_triton(logits, part, spec, seq_grad, seq_ratio, part_out, cfg)
        else:
            d_logits = _rows_torch(logits, part, spec, seq_grad, seq_ratio, part_out)
        del logits
        if need_dh:
            torch.matmul(d_logits, weight, out=d_hidden[start:end])
        if need_dw:
            if d_logits.dtype == torch.float32:
                d_weight.addmm_(d_logits.T, h)
            else:
                d_weight.add_(d_logits.T @ h)
        if need_db:
            d_bias.add_(d_logits.sum(0, dtype=torch.float32))
        del d_logits

    loss = out["loss"].sum() + (seq.loss if seq is not None else 0.0)
    low = seq.low.float() if seq is not None else out["low"]
    high = seq.high.float() if seq is not None else out["high"]
    result = FusedResult(loss, out["logp"], out["entropy"], out["kl"], low, high)
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
        extras = [result.logp, result.entropy, result.clip_low, result.clip_high]
        kl = result.kl if result.kl is not None else torch.zeros(0, device=hidden.device)
        ctx.mark_non_differentiable(*extras, kl)
        return (result.loss, *extras, kl)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("the fused GRPO loss does not support backward twice (retain_graph)")
        d_hidden, d_weight, d_bias = ctx.grads
        ctx.grads = None
        grads = []
        for g, dtype in zip((d_hidden, d_weight, d_bias), ctx.dtypes):
            grads.append(None if g is None else g.mul_(grad_loss.to(g.dtype)).to(dtype))
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
        loss, logp, entropy, low, high, kl = _FusedGRPOFunction.apply(
            hidden, weight, bias, inputs, spec, backend, cfg, chunk_size
        )
        return FusedResult(loss, logp, entropy, kl if inputs.ref_logps is not None else None, low, high)
    result, _, _, _ = _run(hidden, weight, bias, inputs, spec, backend, cfg, chunk_size, False, False, False)
    return result
