"""Forward-only log-prob kernel: log_softmax(f(h @ W.T + b) / T)[target] without writing any logits
(f: the model's logit transform, kernels/tl_math.py). Tiles accumulate and stay in fp32, as the
training pass's logits do (kernels/matmul.py), so both passes give the same log-probs.

For a block of BLOCK_N tokens and one slice of the vocabulary, the kernel walks the slice in
BLOCK_V-wide tiles; each tile of logits is produced by tl.dot over H in BLOCK_H steps and never
leaves registers. An online log-sum-exp keeps, per token,

    m = running max,   s = sum exp(z - m),   a = sum exp(z - m) * z,   t = z[target]

rescaling s and a by exp(m_old - m_new) when the max grows. The vocabulary is split across
programs so that short batches still fill the GPU; the partial (m, s, a, t) of the splits are
merged in PyTorch (O(tokens) memory):

    lse = M + log(sum_k s_k exp(m_k - M)),  logp = t - lse,  entropy = lse - sum_k a_k exp(m_k - M) / S

With a per-token threshold (truncated sampling) a fifth partial, k = sum exp(z - m) over the logits
z >= threshold, gives the log-sum-exp over the kept set {z >= threshold} + {target} and the log-prob
t - lse' (kernels/token_math.kept_log_sum_exp); the entropy stays the full distribution's.

H is large (3584 for a 7B model), so neither operand stays on chip across vocabulary tiles: each
program re-streams its hidden block for every tile. Programs are therefore launched in groups of
GROUP_N token blocks x all vocabulary splits (the grouped ordering of Triton's matmul tutorial):
the programs running together share GROUP_N hidden blocks and num_splits weight tiles, both small
enough to be served from L2 instead of HBM.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import KernelConfig, interpreting
from .launch import launch
from .tl_math import transform_logits
from .token_math import kept_log_sum_exp


@triton.jit
def _logprob_fwd_kernel(
    hidden_ptr,  # [N, H] hidden states (bf16 / fp16 / fp32)
    stride_hn,
    stride_hh,
    weight_ptr,  # [V, H] lm_head weight, same dtype
    stride_wv,
    stride_wh,
    bias_ptr,  # [V] bias or a dummy pointer when HAS_BIAS is false
    targets_ptr,  # [N] int64 target ids
    part_m_ptr,  # [num_splits, N] fp32 partial running max (output)
    part_s_ptr,  # [num_splits, N] fp32 partial sum of exp (output)
    part_a_ptr,  # [num_splits, N] fp32 partial sum of exp * logit (output)
    part_t_ptr,  # [num_splits, N] fp32 target logit if it falls in this split, else 0 (output)
    threshold_ptr,  # [N] fp32 the sampler's threshold on z (THRESHOLD; None otherwise)
    part_k_ptr,  # [num_splits, N] fp32 sum exp(z - m) over z >= threshold (output, THRESHOLD)
    N,
    V,
    H,
    v_per_split,
    num_splits,
    inv_temperature,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,  # the model's logit transform (kernels/tl_math.py)
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter: bf16 dots are wrong)
    IEEE_FP32: tl.constexpr,  # fp32 inputs: full-precision dot instead of tf32
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
    THRESHOLD: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * num_splits
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(n_blocks - first_n, GROUP_N)
    within = pid % per_group
    pid_n = first_n + within % group_n
    pid_s = within // group_n
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    rows64 = rows.to(tl.int64)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    if THRESHOLD:
        thresholds = tl.load(threshold_ptr + rows, mask=row_mask, other=float("-inf"))
        k = tl.zeros([BLOCK_N], tl.float32)

    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + tl.arange(0, BLOCK_H)
            h_mask = hk < H
            x = tl.load(
                hidden_ptr + rows64[:, None] * stride_hn + hk[None, :] * stride_hh,
                mask=row_mask[:, None] & h_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                weight_ptr + cols64[None, :] * stride_wv + hk[:, None] * stride_wh,
                mask=col_mask[None, :] & h_mask[:, None],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE_FP32:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc = acc + b[None, :]
        z_model, _ = transform_logits(acc, logit_scale, softcap, SOFTCAP)
        z_finite = z_model * inv_temperature
        z = tl.where(col_mask[None, :], z_finite, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        rescale = tl.exp(m - m_new)
        e = tl.where(col_mask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s = s * rescale + tl.sum(e, 1)
        a = a * rescale + tl.sum(e * z_finite, 1)  # e is 0 outside the vocabulary
        t = t + tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), 1)
        if THRESHOLD:
            k = k * rescale + tl.sum(tl.where(z >= thresholds[:, None], e, 0.0), 1)
        m = m_new

    out = pid_s * N + rows
    tl.store(part_m_ptr + out, m, mask=row_mask)
    tl.store(part_s_ptr + out, s, mask=row_mask)
    tl.store(part_a_ptr + out, a, mask=row_mask)
    tl.store(part_t_ptr + out, t, mask=row_mask)
    if THRESHOLD:
        tl.store(part_k_ptr + out, k, mask=row_mask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def logprobs_triton(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    cfg: KernelConfig,
    *,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    logit_threshold: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Launcher: per-token (logp, entropy) in fp32 for hidden [N, H], weight [V, H], targets [N];
    logits z = softcap(logit_scale * (h W^T + b)) / temperature (kernels/tl_math.py).
    `logit_threshold` [N] fp32: log-probs over each token's kept set {z >= threshold} + {target}."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    logp = torch.empty(N, device=device, dtype=torch.float32)
    entropy = torch.empty(N, device=device, dtype=torch.float32)
    if N == 0:
        return logp, entropy
    n_blocks = triton.cdiv(N, cfg.fwd_block_n)
    # Split the vocabulary into cfg.fwd_splits slices (more when needed for >= 2 programs per SM),
    # each slice a whole number of tiles.
    want_splits = max(cfg.fwd_splits, triton.cdiv(2 * _num_sms(device), n_blocks))
    v_tiles = triton.cdiv(V, cfg.fwd_block_v)
    tiles_per_split = triton.cdiv(v_tiles, min(want_splits, v_tiles))
    v_per_split = tiles_per_split * cfg.fwd_block_v
    num_splits = triton.cdiv(V, v_per_split)
    truncated = logit_threshold is not None
    parts = torch.empty(5 if truncated else 4, num_splits, N, device=device, dtype=torch.float32)
    grid = (n_blocks * num_splits,)
    launch(
        _logprob_fwd_kernel,
        grid,
        hidden,
        hidden.stride(0),
        hidden.stride(1),
        weight,
        weight.stride(0),
        weight.stride(1),
        bias if bias is not None else hidden,
        targets,
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        logit_threshold,  # None (no threshold): a constexpr, so the kernel compiles without it
        parts[4] if truncated else None,
        N,
        V,
        H,
        v_per_split,
        num_splits,
        1.0 / temperature,
        float(logit_scale),
        float(logit_softcap) if logit_softcap is not None else 1.0,
        HAS_BIAS=bias is not None,
        SOFTCAP=logit_softcap is not None,
        UPCAST=interpreting() or hidden.dtype == torch.float32,
        IEEE_FP32=hidden.dtype == torch.float32 and not interpreting(),
        BLOCK_N=cfg.fwd_block_n,
        BLOCK_V=cfg.fwd_block_v,
        BLOCK_H=cfg.fwd_block_h,
        GROUP_N=cfg.fwd_group_n,
        THRESHOLD=truncated,
        num_warps=cfg.fwd_num_warps,
        num_stages=cfg.fwd_num_stages,
    )
    part_m, part_s, part_a, part_t = parts[:4]
    big_m = part_m.max(0).values
    scale = torch.exp(part_m - big_m)
    total_s = (part_s * scale).sum(0)
    total_a = (part_a * scale).sum(0)
    lse = big_m + torch.log(total_s)
    z_target = part_t.sum(0)
    if truncated:  # the split holding the row's max holds the kept set's max: no underflow (see kept_log_sum_exp)
        kept_lse = kept_log_sum_exp(big_m, (parts[4] * scale).sum(0), z_target, logit_threshold)
        torch.sub(z_target, kept_lse, out=logp)
    else:
        torch.sub(z_target, lse, out=logp)
    torch.sub(lse, total_a / total_s, out=entropy)
    return logp, entropy
