"""Truncated sampling as one threshold per drawn token, and its replay on the trainer's side.

Top-k, top-p and min-p each keep exactly the tokens whose temperature-scaled logit is at least some
value, so what a truncating sampler drew from is one number per token: the loss's ``logit_threshold``
(log-probs over the kept set). The rollout engine records it at each draw
(``truncation_threshold``); a trainer whose sampler does not report it (TRL's generation paths)
recomputes it from its own logits (``replayed_thresholds``), as prime-rl's trainer replays top-k / top-p.
"""

from __future__ import annotations

import math

import torch


def truncation_threshold(scores: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor | None:
    """Per row of ``scores`` [B, V] (temperature-scaled logits), a threshold that top-k, then top-p, then
    min-p (Hugging Face's order) keep exactly the scores at or above; None when none of them truncates.
    Each of the three keeps every token whose score is at least some value (ties with the last kept score
    stay; the most likely token always stays), so the kept set is ``scores >= threshold``, one number per
    row: what the trainer needs to score the same truncated distribution (the loss's ``logit_threshold``).
    The threshold is the midpoint between the least kept score and the greatest dropped one, so that the
    trainer's recomputation of the logits, a rounding error away from the sampler's, keeps the same set
    (at the least kept score itself, the boundary token would drop out of it half the time)."""
    if not truncates(top_k, top_p, min_p, scores.shape[-1]):
        return None
    bound = torch.full(scores.shape[:-1], -math.inf, dtype=scores.dtype, device=scores.device)
    if 0 < top_k < scores.shape[-1]:
        bound = torch.topk(scores, top_k, dim=-1).values[..., -1]
    if top_p < 1.0:
        kept = scores.masked_fill(scores < bound[..., None], -math.inf)
        sorted_scores = torch.sort(kept, dim=-1).values  # ascending: the tail comes first
        tail_mass = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        removed = (tail_mass <= 1.0 - top_p).sum(dim=-1, keepdim=True)  # a prefix of the sorted scores
        removed = removed.clamp(max=scores.shape[-1] - 1)  # the most likely token always stays
        bound = torch.maximum(bound, sorted_scores.gather(-1, removed)[..., 0])
    if min_p > 0.0:  # p_i >= min_p * p_max  <=>  s_i >= s_max + log(min_p), whatever the normaliser
        bound = torch.maximum(bound, scores.amax(dim=-1) + math.log(min_p))
    dropped = scores < bound[..., None]
    least_kept = scores.masked_fill(dropped, math.inf).amin(dim=-1)
    greatest_dropped = scores.masked_fill(~dropped, -math.inf).amax(dim=-1)
    # nothing dropped (top-p kept everything): -inf; a midpoint that rounds down onto a dropped score
    # (adjacent floats) falls back to the least kept score itself
    middle = (least_kept + greatest_dropped) / 2
    return torch.where(torch.isinf(greatest_dropped), greatest_dropped,
                       torch.where(middle > greatest_dropped, middle, least_kept))


def truncates(top_k: int, top_p: float, min_p: float, vocab: int | None = None) -> bool:
    """Whether top-k / top-p / min-p drop any token (top-k of 1 is greedy decoding: it does)."""
    return (0 < top_k and (vocab is None or top_k < vocab)) or top_p < 1.0 or min_p > 0.0


@torch.no_grad()
def replayed_thresholds(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform,
                        temperature: float, top_k: int, top_p: float, min_p: float,
                        max_chunk_bytes: int = 1 << 28) -> torch.Tensor | None:
    """[B, T] ``truncation_threshold`` of the policy's own temperature-scaled logits at every position of
    ``hidden`` [B, T, H] (the lm_head ``weight`` [V, H], ``bias``, the model's logit ``transform``), a
    chunk of positions' fp32 logits at a time (at most ``max_chunk_bytes``): the loss's own product
    (``kernels.matmul.Head``: an fp32-result GEMM of the stored dtype, no fp32 copy of the head where
    cuBLAS has one), so the thresholds sit on the logits the loss compares them with; None when nothing
    truncates."""
    from .kernels.matmul import Head

    if not truncates(top_k, top_p, min_p, weight.shape[0]):
        return None
    head = Head(weight, bias)
    flat = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    rows = max(1, max_chunk_bytes // (4 * weight.shape[0]))
    thresholds = []
    for start in range(0, flat.shape[0], rows):
        scaled = transform.apply(head.logits(flat[start:start + rows])) / temperature
        thresholds.append(truncation_threshold(scaled, top_k, top_p, min_p))
    return torch.cat(thresholds).reshape(hidden.shape[:-1])
