"""Fused GRPO row kernel: one program per token streams its row of fp32 logits.

For token n with raw logits x = h W^T + b (fp32, from a tensor-core matmul with an fp32 result) and
z = f(x) / T (f: the model's logit transform, kernels/tl_math.py; identity for most models):

pass 1  online log-sum-exp, entropy and target logit:  lse, logp = z[y] - lse, H = lse - sum p z
        (THRESHOLD, truncated sampling: logp = z[y] - lse' with lse' the log-sum-exp over the kept
        set K = {j : z_j >= threshold} + {y}, summed beside lse from the same exps; H stays the full
        distribution's)
then    the GRPO terms of kernels/token_math.py in registers: the ratio c1 = exp(logp - old), the
        policy surrogate (POLICY: the clipped one with its optional delta cap, CISPO's capped
        detached ratio, or SAPO's soft gate; or a coefficient precomputed from the whole batch),
        weighted by wp (the loss weight times the sampler IS ratio), the k3 KL against ref (times the
        ratio with KL_CORRECTION; added only when beta != 0, so an overflowing exp(ref - logp) cannot
        turn the loss into 0 * inf), weighted by w, and the entropy bonus e * H, giving the token's
        loss contribution, g = d loss / d logp and e = d loss / d H
pass 2  d loss / d x_j = S [g (1[j == y] - p_j) - e p_j (log p_j + H)] f'(x_j) / T (d H / d z_j =
        -p_j (log p_j + H); THRESHOLD: the first p_j is p'_j = 1[j in K] exp(z_j - lse')), written
        in the input dtype over the first half of the token's own fp32 row (d_logits, row stride 2V
        in elements of 2 bytes), so the caller's d_hidden = d_logits @ W (and d_W += d_logits^T @ h)
        reuse the chunk's buffer.

Writing over the row being read: tile k (B columns) reads the row's bytes [4 k B, 4 (k+1) B) and, in
bf16 / fp16, stores [2 k B, 2 (k+1) B), i.e. fp32 columns [k B / 2, (k+1) B / 2) that tiles k / 2
and k read in other threads and other warps (in tile 0 of the sm_90a code, warp w stores over what
warps w / 2 and 4 + w / 2 read). Nothing orders one warp's stores after another warp's loads, so a
barrier separates each tile's loads from its stores (bar.sync: every thread's earlier loads are
performed before any thread passes it): when tile k stores, every warp has read tiles 0..k, which
hold every byte tile k writes. A row's stores stay within its own 4V bytes, so programs never meet.
The fp32 gradient overwrites the very elements it reads; the barrier orders that too, whatever
layout the compiler gives the store. Cost: one BAR.SYNC per tile (38 per 152k-vocab row; the sm_90a
loop grows from 282 to 283 instructions) and no memory. Rejected: a separate d_logits buffer (+2
bytes a logit, half again the chunk's 4-byte budget, or a third fewer tokens per chunk); keeping
each thread's stores within its own loads (in a blocked layout thread t's bf16 columns are fp32
columns of thread t / 2). tests/test_row_kernel_race.py reads the compiled SASS for the barrier.

S is a power of two (1 unless the input is fp16): fp16 cannot hold the off-target terms w * p_j
(~1e-9 for a batch of thousands of tokens), so they are written scaled to fill fp16's range and
the caller divides the fp32 products by S. S depends on the largest g of the whole chunk, so for
fp16 the passes run as two launches (PASS1, then PASS2 with S); otherwise as one.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import KernelConfig
from .launch import launch
from .tl_math import kept_log_sum_exp, transform_logits

# POLICY values (constexpr): the policy term's coefficient read from memory, or one of the surrogates
PRECOMPUTED, CLIP, CISPO, SAPO = 0, 1, 2, 3
INLINE_POLICIES = {"clip": CLIP, "cispo": CISPO, "sapo": SAPO}


@triton.jit
def _grpo_row_kernel(
    logits_ptr,  # [n, V] fp32 raw chunk logits (bias included)
    stride_row,
    dlogits_ptr,  # [n, V] out: d_logits in the input dtype (may alias logits_ptr's rows, see above)
    stride_drow,
    targets_ptr,  # [n] int64
    weight_ptr,  # [n] fp32 loss-normalisation weight w of each token (the KL's)
    policy_weight_ptr,  # [n] fp32 weight wp of the policy term (w times the sampler IS ratio)
    adv_ptr,  # [n] fp32 advantage of the token's sequence
    old_ptr,  # [n] fp32 old log-probs (HAS_OLD)
    ref_ptr,  # [n] fp32 reference log-probs (HAS_REF)
    policy_grad_ptr,  # [n] fp32 precomputed d policy / d logp (POLICY == PRECOMPUTED)
    seq_ratio_ptr,  # [n] fp32 the sequence's importance ratio (SEQ_RATIO: the KL correction's)
    entropy_grad_ptr,  # [n] fp32 e = d loss / d H (ENTROPY_BONUS)
    logp_ptr,  # [n] fp32 out: log-prob of the target
    entropy_ptr,  # [n] fp32 out (read back by a separate pass 2 with ENTROPY_BONUS)
    loss_ptr,  # [n] fp32 out: loss contribution
    kl_ptr,  # [n] fp32 out (HAS_REF)
    low_ptr,  # [n] fp32 out: 1.0 where the low clip is active (CLIP)
    high_ptr,  # [n] fp32 out: 1.0 where the high clip (CLIP) or CISPO's cap is active
    lse_ptr,  # [n] fp32: written by pass 1, read by pass 2 when they are separate launches
    grad_ptr,  # [n] fp32 g = d loss / d logp: likewise
    scale_ptr,  # [1] fp32 gradient scale S (SCALED)
    V,
    inv_temperature,
    logit_scale,
    softcap,
    beta,
    clip_low,  # 1 - epsilon_low
    clip_high,  # 1 + epsilon_high
    delta,
    cispo_max,  # CISPO's cap on the ratio (epsilon_high)
    tau_pos,  # SAPO's temperature for A > 0
    tau_neg,  # and for A <= 0
    threshold_ptr,  # [n] fp32 the sampler's threshold on z / T (THRESHOLD; None otherwise)
    lse_kept_ptr,  # [n] fp32 the kept set's log-sum-exp, pass 1 to a separate pass 2 (THRESHOLD)
    TERMS: tl.constexpr,  # False: log-probs and entropies only (the no-grad passes)
    POLICY: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    USE_KL: tl.constexpr,  # beta != 0: the KL enters the loss
    HAS_DELTA: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
    KL_CORRECTION: tl.constexpr,
    ENTROPY_BONUS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PASS1: tl.constexpr,
    PASS2: tl.constexpr,
    SCALED: tl.constexpr,
    THRESHOLD: tl.constexpr,  # truncated sampling: logp over the kept set {z / T >= threshold} + {target}
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    e_bonus = 0.0

    if PASS1:
        # ---- online log-sum-exp, entropy, target ----
        m = float("-inf")
        s = 0.0
        a = 0.0
        if THRESHOLD:
            threshold = tl.load(threshold_ptr + row)
            s_kept = 0.0  # sum exp(z - m) over z >= threshold: it shares the row's max and exps
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            x = tl.load(base + cols, mask=col_mask, other=0.0)
            z, _ = transform_logits(x, logit_scale, softcap, SOFTCAP)
            z = tl.where(col_mask, z * inv_temperature, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            rescale = tl.exp(m - m_new)
            e = tl.where(col_mask, tl.exp(z - m_new), 0.0)
            s = s * rescale + tl.sum(e, 0)
            a = a * rescale + tl.sum(e * tl.where(col_mask, z, 0.0), 0)  # no 0 * -inf
            if THRESHOLD:
                s_kept = s_kept * rescale + tl.sum(tl.where(z >= threshold, e, 0.0), 0)
            m = m_new
        lse = m + tl.log(s)
        z_target, _ = transform_logits(tl.load(base + target), logit_scale, softcap, SOFTCAP)
        if THRESHOLD:
            z_target = z_target * inv_temperature
            lse_kept = kept_log_sum_exp(m, s_kept, z_target, threshold)
            logp = z_target - lse_kept
        else:
            logp = z_target * inv_temperature - lse
        entropy = lse - a / s

        if TERMS:
            # ---- GRPO terms (see kernels/token_math.py) ----
            w = tl.load(weight_ptr + row)
            loss = 0.0
            grad = 0.0
            # on-policy: logp - sg(logp), 0 unless logp is NaN / inf, which must reach the loss
            log_ratio = logp - logp
            if HAS_OLD:
                log_ratio = logp - tl.load(old_ptr + row)
            if POLICY == 0:
                grad = tl.load(policy_grad_ptr + row)
            else:
                wp = tl.load(policy_weight_ptr + row)
                adv = tl.load(adv_ptr + row)
                c1 = tl.exp(log_ratio)
                if POLICY == 1:
                    c2 = tl.minimum(tl.maximum(c1, clip_low), clip_high)
                    c1_used = c1
                    d1 = adv * c1
                    if HAS_DELTA:
                        c1_used = tl.minimum(c1, delta, propagate_nan=tl.PropagateNan.ALL)
                        d1 = tl.where(c1 <= delta, d1, 0.0)
                    l1 = c1_used * adv
                    l2 = c2 * adv
                    d2 = tl.where((c1 >= clip_low) & (c1 <= clip_high), adv * c1, 0.0)
                    d_min = tl.where(l1 < l2, d1, tl.where(l1 > l2, d2, 0.5 * (d1 + d2)))
                    # min / max drop a NaN operand unless told otherwise: a NaN ratio must make the loss NaN
                    loss = -tl.minimum(l1, l2, propagate_nan=tl.PropagateNan.ALL) * wp
                    grad = -d_min * wp
                    low = (c1_used < clip_low) & (adv < 0.0)
                    high = (c1_used > clip_high) & (adv > 0.0)
                    tl.store(low_ptr + row, tl.where(low, 1.0, 0.0))
                    tl.store(high_ptr + row, tl.where(high, 1.0, 0.0))
                elif POLICY == 2:
                    # the ratio carries no gradient
                    coefficient = -tl.minimum(c1, cispo_max, propagate_nan=tl.PropagateNan.ALL) * adv * wp
                    loss = coefficient * logp
                    grad = coefficient
                    tl.store(high_ptr + row, tl.where((c1 > cispo_max) & (adv > 0.0), 1.0, 0.0))
                else:
                    tau = tl.where(adv > 0.0, tau_pos, tau_neg)
                    gate = 1.0 / (1.0 + tl.exp(-tau * (c1 - 1.0)))
                    loss = -gate * 4.0 / tau * adv * wp
                    grad = -4.0 * adv * gate * (1.0 - gate) * c1 * wp
            if HAS_REF:
                diff = tl.load(ref_ptr + row) - logp
                e_diff = tl.exp(diff)
                kl = e_diff - diff - 1.0
                d_kl = 1.0 - e_diff
                if KL_CORRECTION:
                    if SEQ_RATIO:  # the ratio's share of the gradient is in the precomputed policy coefficient
                        ratio = tl.load(seq_ratio_ptr + row)
                        d_kl = ratio * d_kl
                    else:  # d(kl r)/d logp = r (d_kl + kl)
                        ratio = tl.exp(log_ratio)
                        d_kl = ratio * (d_kl + kl)
                    kl = kl * ratio
                tl.store(kl_ptr + row, kl)
                if USE_KL:
                    loss = loss + w * beta * kl
                    grad = grad + w * beta * d_kl
            if ENTROPY_BONUS:
                e_bonus = tl.load(entropy_grad_ptr + row)
                loss = loss + e_bonus * entropy
        tl.store(logp_ptr + row, logp)
        tl.store(entropy_ptr + row, entropy)
        if TERMS:
            tl.store(loss_ptr + row, loss)
        if TERMS and not PASS2:
            tl.store(lse_ptr + row, lse)
            tl.store(grad_ptr + row, grad)
            if THRESHOLD:
                tl.store(lse_kept_ptr + row, lse_kept)
    else:
        lse = tl.load(lse_ptr + row)
        grad = tl.load(grad_ptr + row)
        if THRESHOLD:
            threshold = tl.load(threshold_ptr + row)
            lse_kept = tl.load(lse_kept_ptr + row)
        if ENTROPY_BONUS:
            entropy = tl.load(entropy_ptr + row)
            e_bonus = tl.load(entropy_grad_ptr + row)

    if PASS2:
        # ---- d_logits ----
        coef = grad * inv_temperature
        e_coef = e_bonus * inv_temperature
        if SCALED:
            coef = coef * tl.load(scale_ptr)
            e_coef = e_coef * tl.load(scale_ptr)
        d_base = dlogits_ptr + row * stride_drow
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            x = tl.load(base + cols, mask=col_mask, other=0.0)
            z, dz = transform_logits(x, logit_scale, softcap, SOFTCAP)
            if THRESHOLD:
                # d logp / d z_j = 1[j == y] - p'_j, p' the kept set's softmax (0 outside it, where
                # exp may overflow); the entropy bonus's term stays on the full distribution
                z = z * inv_temperature
                kept = (z >= threshold) | (cols == target)
                p_kept = tl.where(kept, tl.exp(z - lse_kept), 0.0)
                d = coef * (tl.where(cols == target, 1.0, 0.0) - p_kept)
                if ENTROPY_BONUS:
                    log_p = z - lse
                    d = d - e_coef * tl.exp(log_p) * (log_p + entropy)
            else:
                log_p = z * inv_temperature - lse
                p = tl.exp(log_p)
                d = coef * (tl.where(cols == target, 1.0, 0.0) - p)
                if ENTROPY_BONUS:
                    d = d - e_coef * p * (log_p + entropy)
            d = d * dz
            # WAR: every warp has read the bytes this tile's stores overwrite (see the module docstring)
            tl.debug_barrier()
            tl.store(d_base + cols, d.to(dlogits_ptr.dtype.element_ty), mask=col_mask)


def grpo_rows_triton(
    logits: Tensor,
    d_logits: Tensor,
    out: dict,
    tensors: dict,
    spec,
    *,
    grad_scale=None,
    cfg: KernelConfig,
) -> None:
    """Launcher. `logits` [n, V] fp32 (row-contiguous); `d_logits` [n, V] receives the gradient (in its
    own dtype; it may be `logits` itself, or the first half of each of its rows); per-token results go
    to the fp32 [n] tensors in `out` ("logp", "entropy", "loss", "kl", "low", "high").

    `tensors`: the chunk's [n] inputs: "targets", "weight", "policy_weight", "advantages", and, each
    optional (None), "old", "ref", "policy_grad" (the whole batch's precomputed policy coefficient),
    "seq_ratio" (the sequence ratio for the KL correction), "entropy_grad" (the entropy bonus's
    d loss / d H), "threshold" (truncated sampling's per-token threshold on z / T).
    `spec`: the kernels.token_math.LossSpec.

    `grad_scale`: None, or a callable (g [n] fp32 -> S [1] fp32) that picks the gradient scale S from
    the chunk's gradient coefficients; the passes then run as two launches."""
    n, V = logits.shape
    if n == 0:
        return
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and d_logits.stride(1) == 1
    dummy = out["logp"]
    split = grad_scale is not None
    lse = torch.empty(n, device=logits.device, dtype=torch.float32) if split else dummy
    grad = torch.empty(n, device=logits.device, dtype=torch.float32) if split else dummy

    def given(name):
        value = tensors.get(name)
        return dummy if value is None else value

    args = [
        logits, logits.stride(0), d_logits, d_logits.stride(0),
        tensors["targets"], tensors["weight"], tensors["policy_weight"], tensors["advantages"],
        given("old"), given("ref"), given("policy_grad"), given("seq_ratio"), given("entropy_grad"),
        out["logp"], out["entropy"], out["loss"], out["kl"] if tensors.get("ref") is not None else dummy,
        out["low"], out["high"], lse, grad,
    ]
    scalars = [
        V, 1.0 / spec.temperature, float(spec.logit_scale),
        float(spec.logit_softcap) if spec.logit_softcap is not None else 1.0,
        float(spec.beta), 1.0 - spec.epsilon_low, 1.0 + spec.epsilon_high,
        float(spec.delta) if spec.delta is not None else 0.0,
        float(spec.epsilon_high), float(spec.sapo_temperature_pos), float(spec.sapo_temperature_neg),
    ]
    has_ref = tensors.get("ref") is not None
    threshold = tensors.get("threshold")
    lse_kept = None
    if threshold is not None:
        lse_kept = torch.empty(n, device=logits.device, dtype=torch.float32) if split else dummy
    # None (no threshold) is a constexpr: the kernel then compiles without these two arguments
    truncation = [threshold, lse_kept]
    flags = dict(
        TERMS=True,
        POLICY=PRECOMPUTED if tensors.get("policy_grad") is not None else INLINE_POLICIES[spec.policy],
        HAS_OLD=tensors.get("old") is not None,
        HAS_REF=has_ref,
        USE_KL=has_ref and spec.beta != 0.0,
        HAS_DELTA=spec.delta is not None,
        SEQ_RATIO=tensors.get("seq_ratio") is not None,
        KL_CORRECTION=bool(spec.kl_bias_correction) and has_ref,
        ENTROPY_BONUS=tensors.get("entropy_grad") is not None,
        SOFTCAP=spec.logit_softcap is not None,
        THRESHOLD=threshold is not None,
        BLOCK_V=min(cfg.row_block_v, triton.next_power_of_2(V)),
        num_warps=cfg.row_num_warps,
    )
    if not split:
        launch(_grpo_row_kernel, (n,), *args, dummy, *scalars, *truncation, PASS1=True, PASS2=True, SCALED=False, **flags)
        return
    launch(_grpo_row_kernel, (n,), *args, dummy, *scalars, *truncation, PASS1=True, PASS2=False, SCALED=False, **flags)
    scale = grad_scale(grad)
    launch(_grpo_row_kernel, (n,), *args, scale, *scalars, *truncation, PASS1=False, PASS2=True, SCALED=True, **flags)


def logprob_rows_triton(
    logits: Tensor,
    targets: Tensor,
    logp: Tensor,
    entropy: Tensor,
    *,
    temperature: float,
    logit_scale: float,
    logit_softcap: Optional[float],
    cfg: KernelConfig,
    logit_threshold: Optional[Tensor] = None,
) -> None:
    """Pass 1 alone (no GRPO terms, no gradient): per-token log-probs and entropies of fp32 `logits`
    [n, V] into the fp32 [n] `logp` and `entropy` (`logit_threshold` [n] fp32: the log-probs over
    each row's kept set, the entropies still of the full distribution). The training pass runs the
    same code on the same logits, so its log-probs equal these."""
    n, V = logits.shape
    if n == 0:
        return
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    launch(
        _grpo_row_kernel, (n,), logits, logits.stride(0), logits, logits.stride(0), targets,
        *([logp] * 8), logp, entropy, *([logp] * 7),
        V, 1.0 / temperature, float(logit_scale), float(logit_softcap) if logit_softcap is not None else 1.0,
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, logit_threshold, None,
        TERMS=False, POLICY=CLIP, HAS_OLD=False, HAS_REF=False, USE_KL=False, HAS_DELTA=False, SEQ_RATIO=False,
        KL_CORRECTION=False, ENTROPY_BONUS=False, SOFTCAP=logit_softcap is not None, PASS1=True, PASS2=False,
        SCALED=False, THRESHOLD=logit_threshold is not None, BLOCK_V=min(cfg.row_block_v, triton.next_power_of_2(V)), num_warps=cfg.row_num_warps,
    )
