"""Fused GRPO row kernel: one pass per token over a chunk of logits, gradient written in place.

For token n with logits z = (h W^T + b) / T (the chunk was produced by a tensor-core matmul), one
program streams the row twice:

pass 1  online log-sum-exp, entropy and target logit:  lse, logp = z[y] - lse, H = lse - sum p z
then    the GRPO terms of kernels/token_math.py in registers: ratio exp(logp - old), the clip to
        [1 - eps_low, 1 + eps_high], the optional delta cap, the advantage of the token's sequence,
        the k3 KL against ref (times the ratio with KL_CORRECTION), the loss-normalisation weight w, giving the token's loss
        contribution and g = d loss / d logp
pass 2  d loss / d (raw logit j) = g * (1[j == y] - p_j) / T, written over the logits in place, so
        the caller's d_hidden = d_logits @ W (and d_W = d_logits^T @ h) reuse the chunk's buffer.

At sequence-level importance sampling the policy part of g depends on every token of the
sequence; it is computed beforehand (forward-only pre-pass) and passed in as `seq_grad`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import KernelConfig


@triton.jit
def _grpo_row_kernel(
    logits_ptr,  # [n, V] chunk logits incl. bias (bf16/fp16/fp32); overwritten with d_logits
    stride_row,
    targets_ptr,  # [n] int64
    weight_ptr,  # [n] fp32 loss-normalisation weight of each token
    adv_ptr,  # [n] fp32 advantage of the token's sequence
    old_ptr,  # [n] fp32 old log-probs (HAS_OLD)
    ref_ptr,  # [n] fp32 reference log-probs (HAS_REF)
    seq_grad_ptr,  # [n] fp32 policy gradient coefficient (SEQUENCE_LEVEL)
    seq_ratio_ptr,  # [n] fp32 the sequence's importance ratio (SEQUENCE_LEVEL and KL_CORRECTION)
    logp_ptr,  # [n] fp32 out: log-prob of the target
    entropy_ptr,  # [n] fp32 out
    loss_ptr,  # [n] fp32 out: weighted loss contribution
    kl_ptr,  # [n] fp32 out (HAS_REF)
    low_ptr,  # [n] fp32 out: 1.0 where the low clip is active (token level)
    high_ptr,  # [n] fp32 out: 1.0 where the high clip is active (token level)
    V,
    inv_temperature,
    beta,
    clip_low,  # 1 - epsilon_low
    clip_high,  # 1 + epsilon_high
    delta,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    SEQUENCE_LEVEL: tl.constexpr,
    KL_CORRECTION: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)

    # ---- pass 1: online log-sum-exp, entropy, target ----
    m = float("-inf")
    s = 0.0
    a = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = tl.load(base + cols, mask=col_mask, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, 0))
        rescale = tl.exp(m - m_new)
        e = tl.where(col_mask, tl.exp(z - m_new), 0.0)
        s = s * rescale + tl.sum(e, 0)
        a = a * rescale + tl.sum(e * tl.where(col_mask, z, 0.0), 0)  # no 0 * -inf
        m = m_new
    lse = m + tl.log(s)
    z_target = tl.load(base + target).to(tl.float32) * inv_temperature
    logp = z_target - lse
    entropy = lse - a / s

    # ---- GRPO terms (see kernels/token_math.py) ----
    w = tl.load(weight_ptr + row)
    loss = 0.0
    grad = 0.0
    ratio = 1.0  # the importance ratio that multiplies the KL (KL_CORRECTION)
    if SEQUENCE_LEVEL:
        grad = tl.load(seq_grad_ptr + row)
        if KL_CORRECTION:
            ratio = tl.load(seq_ratio_ptr + row)
    else:
        adv = tl.load(adv_ptr + row)
        log_ratio = 0.0
        if HAS_OLD:
            log_ratio = logp - tl.load(old_ptr + row)
        c1 = tl.exp(log_ratio)
        ratio = c1
        c2 = tl.minimum(tl.maximum(c1, clip_low), clip_high)
        c1_used = c1
        d1 = adv * c1
        if HAS_DELTA:
            c1_used = tl.minimum(c1, delta)
            d1 = tl.where(c1 <= delta, d1, 0.0)
        l1 = c1_used * adv
        l2 = c2 * adv
        d2 = tl.where((c1 >= clip_low) & (c1 <= clip_high), adv * c1, 0.0)
        d_min = tl.where(l1 < l2, d1, tl.where(l1 > l2, d2, 0.5 * (d1 + d2)))
        loss = -tl.minimum(l1, l2) * w
        grad = -d_min * w
        low = (c1_used < clip_low) & (adv < 0.0)
        high = (c1_used > clip_high) & (adv > 0.0)
        tl.store(low_ptr + row, tl.where(low, 1.0, 0.0))
        tl.store(high_ptr + row, tl.where(high, 1.0, 0.0))
    if HAS_REF:
        diff = tl.load(ref_ptr + row) - logp
        e_diff = tl.exp(diff)
        kl = e_diff - diff - 1.0
        d_kl = 1.0 - e_diff
        if KL_CORRECTION:
            # token level: d(kl r)/d logp = r (d_kl + kl); sequence level: the ratio's share is in seq_grad
            if SEQUENCE_LEVEL:
                d_kl = ratio * d_kl
            else:
                d_kl = ratio * (d_kl + kl)
            kl = kl * ratio
        tl.store(kl_ptr + row, kl)
        loss = loss + w * beta * kl
        grad = grad + w * beta * d_kl
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(loss_ptr + row, loss)

    # ---- pass 2: d_logits in place ----
    coef = grad * inv_temperature
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        raw = tl.load(base + cols, mask=col_mask, other=0.0)
        p = tl.exp(raw.to(tl.float32) * inv_temperature - lse)
        d = coef * (tl.where(cols == target, 1.0, 0.0) - p)
        tl.store(base + cols, d.to(raw.dtype), mask=col_mask)


def grpo_rows_triton(
    logits: Tensor,
    targets: Tensor,
    token_weight: Tensor,
    advantages: Tensor,
    old_logps: Optional[Tensor],
    ref_logps: Optional[Tensor],
    seq_grad: Optional[Tensor],
    seq_ratio: Optional[Tensor],
    out: dict,
    *,
    beta: float,
    kl_bias_correction: bool,
    epsilon_low: float,
    epsilon_high: float,
    delta: Optional[float],
    temperature: float,
    cfg: KernelConfig,
) -> None:
    """Launcher. `logits` [n, V] (row-contiguous) becomes d_logits; per-token results go to the
    fp32 [n] tensors in `out` ("logp", "entropy", "loss", "kl", "low", "high")."""
    n, V = logits.shape
    if n == 0:
        return
    assert logits.stride(1) == 1
    dummy = out["logp"]
    _grpo_row_kernel[(n,)](
        logits,
        logits.stride(0),
        targets,
        token_weight,
        advantages,
        old_logps if old_logps is not None else dummy,
        ref_logps if ref_logps is not None else dummy,
        seq_grad if seq_grad is not None else dummy,
        seq_ratio if seq_ratio is not None else dummy,
        out["logp"],
        out["entropy"],
        out["loss"],
        out["kl"] if ref_logps is not None else dummy,
        out["low"],
        out["high"],
        V,
        1.0 / temperature,
        float(beta),
        1.0 - epsilon_low,
        1.0 + epsilon_high,
        float(delta) if delta is not None else 0.0,
        HAS_OLD=old_logps is not None,
        HAS_REF=ref_logps is not None,
        HAS_DELTA=delta is not None,
        SEQUENCE_LEVEL=seq_grad is not None,
        KL_CORRECTION=bool(kl_bias_correction) and ref_logps is not None,
        BLOCK_V=min(cfg.row_block_v, triton.next_power_of_2(V)),
        num_warps=cfg.row_num_warps,
    )
