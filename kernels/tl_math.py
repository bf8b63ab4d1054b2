"""Triton helpers shared by the kernels: the model's logit transform and its derivative, the
log-sum-exp over a truncated sampler's kept set, and round-to-nearest bf16 under the interpreter.

Some models change the logits after the lm_head (transformers' CausalLM forwards):

    z = softcap * tanh(logit_scale * x / softcap)     (Gemma 2/3: final_logit_softcapping)
    z = logit_scale * x                               (Cohere: logit_scale; Granite: 1 / logits_scaling)

with x = h @ W.T + b the raw logit. The sampled distribution is softmax(z / temperature), so the
loss must use the same z; dz/dx = logit_scale * (1 - tanh^2) with the cap, logit_scale without.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(y):
    # exp of a non-positive argument never overflows; |error| stays at a few fp32 ulps of 1
    # (libdevice's tanh is not available under the CPU interpreter, where the tests run)
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0.0, -t, t)


@triton.jit
def transform_logits(x, logit_scale, softcap, SOFTCAP: tl.constexpr):
    """(z, dz/dx) for finite raw fp32 logits x (any shape); logit_scale > 0."""
    u = x * logit_scale
    if SOFTCAP:
        t = tanh(u / softcap)
        return softcap * t, logit_scale * (1.0 - t * t)
    else:
        return u, logit_scale


@triton.jit
def round_to_bf16_bits(value):
    """fp32 -> nearest-even bf16, kept in fp32, by integer arithmetic. The interpreter truncates
    its fp32 -> bf16 casts, while compiled kernels (and torch) round to nearest even."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def kept_log_sum_exp(m, s_kept, z_target, threshold):
    """log sum exp(z) over the kept set {z >= threshold} + {target} (a truncating sampler's support,
    the sampled token always in it), from the running max m of the whole row and
    s_kept = sum exp(z - m) over {z >= threshold}. That set, when not empty, holds the row's max, so
    s_kept >= 1 and nothing underflows; when it is empty the target is alone: z_target. The torch
    twin is kernels.token_math.kept_log_sum_exp."""
    extra = tl.where(z_target < threshold, tl.exp(z_target - m), 0.0)
    return tl.where(s_kept > 0.0, m + tl.log(s_kept + extra), z_target)
