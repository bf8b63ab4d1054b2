"""Token sampling in one pass over the logits: temperature, EOS suppression, greedy or a categorical draw,
and the sampled token's log-prob, for logits [B, V] in fp32.

The rollout engine's torch path makes ~10 passes over [B, V] per decode step (scale, logsumexp,
EOS fill, softmax, an [B, V] tensor of exponential draws, division, argmax, gather). Without top-k,
top-p or min-p (GRPO's default) one pass suffices: per row and slice of the vocabulary a program
keeps the online log-sum-exp of s = logit / temperature (the loss's normaliser, EOS included) and
the running argmax of s + Gumbel noise (of s alone when greedy), EOS excluded while it is
suppressed. argmax(s + G) with G = -log(-log U) draws token i with probability softmax(s)_i: the
engine's exponential race argmax(p / E), E = -log U, written in logs. The uniforms come from
Triton's counter-based generator (Philox) keyed by (seed, step, row, token), so a seed reproduces
a run (the engine draws the seed from its generator once per call; it passes each row's output row
and own step, so rows at different steps after a slot refill, or moved by compaction, draw what
they would in one big batch). The last slice of a row to
finish merges the slices' states in slice order (a fixed order); ties go to the lowest token id,
as torch.argmax's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import interpreting
from .launch import launch
from .logprob_kernel import _num_sms

MAX_EOS = 8  # EOS ids the kernel masks (SamplingParams.eos_token_ids)
STREAM_ROWS = 1 << 16  # rows per step in the random stream's numbering (a call takes at most this many)


@triton.jit
def _sample_kernel(
    logits_ptr, stride_b,  # [B, V] fp32
    eos_ptr,  # [NUM_EOS] int64
    state_ptr,  # [B, SPLITS, 4] fp32: max, sum of exp, best key, best token (dummy when SPLITS == 1)
    count_ptr,  # [B] int32 tickets, zero between calls
    tokens_ptr, logprobs_ptr,  # [B] int64, [B] fp32
    V, v_per_split, inv_temperature, seed,
    stream,  # step * STREAM_ROWS: this step's first row in the random stream (an int64 from step 32768)
    suppress_eos,
    rows_ptr, steps_ptr,  # PER_ROW: [B] int64 each row's stream row and its step (dummies otherwise)
    NUM_EOS: tl.constexpr, EOS_PAD: tl.constexpr, GREEDY: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_V: tl.constexpr, PER_ROW: tl.constexpr, STREAM_ROWS_: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    if PER_ROW:  # rows at different steps: each its own stream row and step, EOS suppressed below step `suppress_eos`
        row_step = tl.load(steps_ptr + row)
        stream_row = row_step * STREAM_ROWS_ + tl.load(rows_ptr + row)
        suppress = row_step < suppress_eos
    else:
        stream_row = (stream + row).to(tl.int64)
        suppress = suppress_eos != 0
    lo = split * v_per_split
    hi = tl.minimum(lo + v_per_split, V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane: running max and sum of exp(s - max)
    total = tl.zeros([BLOCK_V], tl.float32)
    best_key = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_token = tl.full([BLOCK_V], 2147483647, tl.int32)
    eos = tl.load(eos_ptr + tl.arange(0, EOS_PAD), mask=tl.arange(0, EOS_PAD) < NUM_EOS, other=-1)
    for start in range(lo, hi, BLOCK_V):
        tokens = start + tl.arange(0, BLOCK_V)
        valid = tokens < hi
        s = tl.load(logits_ptr + row * stride_b + tokens, mask=valid, other=float("-inf")) * inv_temperature
        m_new = tl.maximum(m, s)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # -inf logits (so far) add exp(-inf) = 0, not NaN
        total = total * tl.exp(m - shift) + tl.where(valid, tl.exp(s - shift), 0.0)
        m = m_new
        key = s
        if not GREEDY:
            # one uniform per (step, row, token) (rows of a step below STREAM_ROWS: streams never overlap),
            # kept inside (0, 1): u = 0 or 1 (fp32 rounding of Philox's integers) would give an infinite key
            uniform = tl.rand(seed, stream_row * V + tokens)
            uniform = tl.minimum(tl.maximum(uniform, 1.1754944e-38), 0.99999994)
            key = s - tl.log(-tl.log(uniform))
        is_eos = tl.max((tokens[:, None] == eos[None, :]).to(tl.int32), 1) > 0
        key = tl.where(valid & ~(is_eos & suppress), key, float("-inf"))
        better = key > best_key  # lanes keep their first (lowest) token on ties
        best_key = tl.where(better, key, best_key)
        best_token = tl.where(better, tokens, best_token)
    # reduce the lanes: log-sum-exp, and the best key with the lowest token among equals
    row_max = tl.max(m, 0)
    row_total = tl.sum(tl.where(m == float("-inf"), 0.0, total * tl.exp(m - row_max)), 0)
    top = tl.max(best_key, 0)
    top_token = tl.min(tl.where(best_key == top, best_token, 2147483647), 0)
    if SPLITS == 1:
        top_token = tl.where(top_token == 2147483647, 0, top_token)  # every key -inf: token 0, never out of range
        s_top = tl.load(logits_ptr + row * stride_b + top_token) * inv_temperature
        tl.store(tokens_ptr + row, top_token.to(tl.int64))
        tl.store(logprobs_ptr + row, s_top - row_max - tl.log(row_total))
    else:
        state = state_ptr + (row * SPLITS + split) * 4
        tl.store(state, row_max)
        tl.store(state + 1, row_total)
        tl.store(state + 2, top)
        tl.store(state + 3, top_token.to(tl.float32, bitcast=True))
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
        if ticket == SPLITS - 1:  # the last slice of the row merges all of them in slice order
            merged_max = float("-inf")
            merged_total = 0.0
            merged_key = float("-inf")
            merged_token = 0
            for s_index in tl.static_range(SPLITS):
                part = state_ptr + (row * SPLITS + s_index) * 4
                part_max = tl.load(part, cache_modifier=".cg")
                part_total = tl.load(part + 1, cache_modifier=".cg")
                part_key = tl.load(part + 2, cache_modifier=".cg")
                part_token = tl.load(part + 3, cache_modifier=".cg").to(tl.int32, bitcast=True)
                new_max = tl.maximum(merged_max, part_max)
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                merged_total = (merged_total * tl.exp(merged_max - shift)
                                + tl.where(part_max == float("-inf"), 0.0, part_total * tl.exp(part_max - shift)))
                merged_max = new_max
                take = part_key > merged_key  # slices come in token order: ties keep the earlier one
                merged_token = tl.where(take, part_token, merged_token)
                merged_key = tl.where(take, part_key, merged_key)
            tl.atomic_xchg(count_ptr + row, 0)
            s_top = tl.load(logits_ptr + row * stride_b + merged_token) * inv_temperature
            tl.store(tokens_ptr + row, merged_token.to(tl.int64))
            tl.store(logprobs_ptr + row, s_top - merged_max - tl.log(merged_total))


def sample_fused(logits: Tensor, temperature: float, eos_ids: Tensor, suppress_eos: bool, greedy: bool,
                 seed: int, step: int, tickets: Tensor, splits: int | None = None, *, rows: Tensor | None = None,
                 steps: Tensor | None = None, min_steps: int = 0) -> tuple[Tensor, Tensor]:
    """(tokens [B] int64, log-probs [B] fp32) for fp32 ``logits`` [B, V] (see the module docstring).
    ``tickets``: [>= B] int32 zeros, left at zero. ``seed``, ``step``: the draw's random stream, row b
    of the logits its row ``step * STREAM_ROWS + b``. Rows at different steps: ``rows`` and ``steps``
    ([B] int64) give row b its stream row ``steps[b] * STREAM_ROWS + rows[b]`` (``rows``: e.g. the
    output row, so a draw does not depend on where the row sits in the batch) and EOS is suppressed
    where ``steps[b] < min_steps`` (``step`` and ``suppress_eos`` are then unused)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits: expected a [B, V] float32 tensor with unit stride along V, received "
                         f"{list(logits.shape)} {logits.dtype} strides {logits.stride()}")
    if logits.shape[0] > STREAM_ROWS:
        raise ValueError(f"logits: expected at most {STREAM_ROWS} rows, received {logits.shape[0]}")
    if not 1 <= eos_ids.numel() <= MAX_EOS:
        raise ValueError(f"eos_ids: expected 1 to {MAX_EOS} token ids, received {eos_ids.numel()}")
    per_row = steps is not None
    if per_row:
        for name, tensor in (("rows", rows), ("steps", steps)):
            if tensor is None or tensor.dtype != torch.int64 or tensor.shape != logits.shape[:1]:
                raise ValueError(f"{name}: expected an int64 tensor of {logits.shape[0]} rows with steps, received "
                                 f"{None if tensor is None else (tensor.dtype, list(tensor.shape))}")
    rows_index = rows
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return tokens, logprobs
    block = sample_block()
    if splits is None:
        splits = sample_splits(rows, vocab, block, _num_sms(logits.device))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), block) * block
    splits = triton.cdiv(vocab, per_split)
    state = torch.empty(rows, splits, 4, dtype=torch.float32, device=logits.device) if splits > 1 else logprobs
    launch(
        _sample_kernel, (rows, splits),
        logits, logits.stride(0), eos_ids, state, tickets, tokens, logprobs,
        vocab, per_split, 1.0 / temperature, seed, step * STREAM_ROWS, min_steps if per_row else int(suppress_eos),
        rows_index if per_row else tokens, steps if per_row else tokens,
        NUM_EOS=eos_ids.numel(), EOS_PAD=triton.next_power_of_2(eos_ids.numel()), GREEDY=greedy, SPLITS=splits,
        BLOCK_V=block, PER_ROW=per_row, STREAM_ROWS_=STREAM_ROWS,
        num_warps=1 if interpreting() else 8,
    )
    return tokens, logprobs


def sample_block() -> int:
    """Logits per program per loop iteration."""
    return 32 if interpreting() else 2048


def sample_splits(rows: int, vocab: int, block: int, num_sms: int) -> int:
    """Slices of the vocabulary per row: about two programs per SM, each at least four blocks."""
    return max(1, min(triton.cdiv(2 * num_sms, rows), vocab // (4 * block), 32))
