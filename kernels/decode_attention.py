"""Decode attention over the engine's two-segment KV cache: one query token per row, reading only its columns.

The rollout engine's cache stores each prompt's keys and values once, in a prompt segment
``[prompt slots, kv_heads, P, head_dim]`` shared by the rows of its group, and each row's own
completion in a completion segment ``[rows, kv_heads, C, head_dim]``. Row b attends to prompt slot
``row_prompt[b]``, columns ``[start[b], P)`` (prompts are right-aligned in their slot: ``start[b]``
skips the slot's unused left columns), then to its own completion columns ``[0, position[b])``, then
to the new token, whose key and value come from the kernel's inputs and are written to completion
column ``position[b]`` as it goes (the cache write of the step is this kernel, not a separate
scatter). Positions are per row: rows need not be at the same step.

Per program (row b, KV head, split): the query heads that share the KV head (7 for Qwen2.5-7B) are
the rows of one tensor-core product with each block of keys (the cache is read once per KV head,
not once per query head); softmax is computed online in fp32, the probabilities are rounded to the
values' dtype for the product with them (as FlashAttention does). A row's columns (prompt part,
then completion part, as one sequence) are split over programs for long contexts; the last of a
(row, KV head)'s splits to finish merges their partial softmax states in split order 0, 1, ... (a
fixed order), as the NF4 decode kernel merges its K splits.

Shared prompt reads: the grid's fastest axis is the row, so the rows of a group (neighbours in the
cache, as the engine keeps them) run as neighbouring programs at the same KV head and split and
read the same prompt blocks at about the same time: the second and later reads of a block come
from L2, not DRAM. That is locality, not construction: a program still issues its own loads of the
prompt, and when rows of a group are far apart (after compaction, with many rows) or L2 is
evicted in between, the prompt is read from DRAM again. The prompt is stored once per group either way.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import interpreting
from .launch import launch
from .logprob_kernel import _num_sms

MIN_DOT = 16  # tl.dot's smallest side: query heads of a KV head are padded to it


@triton.jit
def _attend(q, m, l, acc, k_ptr, v_ptr, base, lo, hi, d, scale,
            D: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """The online softmax state (m, l, acc) after columns [lo, hi) of the [L, D] keys / values at ``base``."""
    for c in range(lo, hi, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        col_mask = cols < hi
        offsets = base + cols[:, None] * D + d[None, :]
        k = tl.load(k_ptr + offsets, mask=col_mask[:, None], other=0.0)
        v = tl.load(v_ptr + offsets, mask=col_mask[:, None], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        scores = tl.where(col_mask[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        probs = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
        m = m_new
    return m, l, acc


@triton.jit
def _decode_attention_kernel(
    q_ptr, sq_b, sq_h,  # [B, H, D] queries (unit stride along D)
    kn_ptr, skn_b, skn_h,  # [B, KV, D] the new token's keys
    vn_ptr, svn_b, svn_h,  # [B, KV, D] ... and values
    pk_ptr, pv_ptr,  # [slots, KV, P, D] the prompt segment (contiguous)
    k_ptr, v_ptr,  # [capacity, KV, C, D] the completion segment (contiguous)
    prompt_ptr,  # [capacity] int32: each row's prompt slot
    start_ptr,  # [capacity] int32: each row's first prompt column
    pos_ptr,  # [capacity] int32: each row's new-token completion column (its completion tokens so far)
    out_ptr, so_b, so_h,  # [B, H, D]
    part_ptr,  # [B, KV, SPLITS, GQ_PAD, D + 2] fp32 partial states (dummy when SPLITS == 1)
    count_ptr,  # [B * KV] int32 tickets, zero between calls
    KV, P, C, scale,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: bf16 dots are wrong there, fp32 ones exact
):
    b = tl.program_id(0)  # fastest: a group's rows are neighbouring programs (shared prompt blocks from L2)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    heads = tl.arange(0, GQ_PAD)
    head_mask = heads < GQ
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + (kvh * GQ + heads)[:, None] * sq_h + d[None, :], mask=head_mask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    slot = tl.load(prompt_ptr + b)
    start = tl.load(start_ptr + b)
    position = tl.load(pos_ptr + b)
    prompt_columns = P - start
    # the row's columns as one sequence: prompt [start, P), then completion [0, position)
    per_split = tl.cdiv(tl.cdiv(prompt_columns + position, SPLITS), BLOCK_C) * BLOCK_C
    lo = split * per_split
    hi = tl.minimum(lo + per_split, prompt_columns + position)
    prompt_base = (slot * KV + kvh).to(tl.int64) * P * D
    base = (b * KV + kvh).to(tl.int64) * C * D

    m = tl.full([GQ_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GQ_PAD], tl.float32)
    acc = tl.zeros([GQ_PAD, D], tl.float32)
    m, l, acc = _attend(q, m, l, acc, pk_ptr, pv_ptr, prompt_base, start + lo,
                        start + tl.minimum(hi, prompt_columns), d, scale, D, BLOCK_C, UPCAST)
    m, l, acc = _attend(q, m, l, acc, k_ptr, v_ptr, base, tl.maximum(lo, prompt_columns) - prompt_columns,
                        hi - prompt_columns, d, scale, D, BLOCK_C, UPCAST)
    if split == SPLITS - 1:  # the new token: from the inputs, then written to the cache
        k_new = tl.load(kn_ptr + b * skn_b + kvh * skn_h + d)
        v_new = tl.load(vn_ptr + b * svn_b + kvh * svn_h + d)
        tl.store(k_ptr + base + position * D + d, k_new)
        tl.store(v_ptr + base + position * D + d, v_new)
        score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m, score)
        alpha = tl.exp(m - m_new)
        p_new = tl.exp(score - m_new)
        l = l * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m = m_new

    out_offsets = b * so_b + (kvh * GQ + heads)[:, None] * so_h + d[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + out_offsets, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        state = part_ptr + ((b * KV + kvh) * SPLITS * GQ_PAD + heads) * (D + 2)
        tl.store(state + split * GQ_PAD * (D + 2), m)
        tl.store(state + split * GQ_PAD * (D + 2) + 1, l)
        tl.store(state[:, None] + split * GQ_PAD * (D + 2) + 2 + d[None, :], acc)
        tl.debug_barrier()  # every thread's partial is written before the ticket (release) is taken
        ticket = tl.atomic_add(count_ptr + b * KV + kvh, 1, sem="acq_rel")
        if ticket == SPLITS - 1:  # the last split to finish merges all of them, in split order
            m_all = tl.full([GQ_PAD], float("-inf"), tl.float32)
            for s in tl.static_range(SPLITS):
                m_all = tl.maximum(m_all, tl.load(state + s * GQ_PAD * (D + 2), cache_modifier=".cg"))
            l_all = tl.zeros([GQ_PAD], tl.float32)
            acc_all = tl.zeros([GQ_PAD, D], tl.float32)
            for s in tl.static_range(SPLITS):
                # a split with no columns (m = -inf) weighs exp(-inf) = 0; the last split always has the new token
                weight = tl.exp(tl.load(state + s * GQ_PAD * (D + 2), cache_modifier=".cg") - m_all)
                l_all += weight * tl.load(state + s * GQ_PAD * (D + 2) + 1, cache_modifier=".cg")
                acc_all += weight[:, None] * tl.load(state[:, None] + s * GQ_PAD * (D + 2) + 2 + d[None, :],
                                                     cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + b * KV + kvh, 0)
            tl.store(out_ptr + out_offsets, (acc_all / l_all[:, None]).to(out_ptr.dtype.element_ty),
                     mask=head_mask[:, None])


def attention_supported(head_dim: int, heads: int, kv_heads: int) -> bool:
    """Shapes the kernel takes: a power-of-two head_dim of at least 16, query heads a multiple of KV heads."""
    return head_dim >= MIN_DOT and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0


def attention_splits(rows: int, kv_heads: int, length: int, block: int, num_sms: int) -> int:
    """Splits of a row's columns (``length``: prompt + completion): about two programs per SM, each
    with at least two blocks of columns."""
    want = triton.cdiv(2 * num_sms, max(1, rows * kv_heads))
    return max(1, min(want, 16, length // (2 * block)))


def decode_attention(q: Tensor, k_new: Tensor, v_new: Tensor, prompt_keys: Tensor, prompt_values: Tensor,
                     keys: Tensor, values: Tensor, row_prompt: Tensor, start: Tensor, position: Tensor,
                     counters: Tensor, scale: float) -> Tensor:
    """Attention of q [B, H, D] (row b: prompt slot ``row_prompt[b]`` of ``prompt_keys`` / ``prompt_values``
    [slots, KV, P, D], columns start[b] .. P-1; completion row b of ``keys`` / ``values`` [capacity, KV, C, D],
    columns 0 .. position[b]-1) and the new token (k_new, v_new [B, KV, D], written to completion column
    ``position[b]``); [B, H, D]. ``row_prompt``, ``start``, ``position``: int32 [>= B]."""
    return torch.ops.grpo_fast.decode_attention(q, k_new, v_new, prompt_keys, prompt_values, keys, values,
                                                row_prompt, start, position, counters, scale)


@torch.library.custom_op("grpo_fast::decode_attention", mutates_args=("keys", "values"))
def _decode_attention_op(q: Tensor, k_new: Tensor, v_new: Tensor, prompt_keys: Tensor, prompt_values: Tensor,
                         keys: Tensor, values: Tensor, row_prompt: Tensor, start: Tensor, position: Tensor,
                         counters: Tensor, scale: float) -> Tensor:
    # The tickets end every call at zero (the last program resets them): declared unmutated.
    return _launch(q, k_new, v_new, prompt_keys, prompt_values, keys, values, row_prompt, start, position,
                   counters, scale)


@_decode_attention_op.register_fake
def _decode_attention_shape(q, k_new, v_new, prompt_keys, prompt_values, keys, values, row_prompt, start, position,
                            counters, scale):
    return torch.empty_like(q)


def _launch(q: Tensor, k_new: Tensor, v_new: Tensor, prompt_keys: Tensor, prompt_values: Tensor, keys: Tensor,
            values: Tensor, row_prompt: Tensor, start: Tensor, position: Tensor, counters: Tensor, scale: float,
            splits: Optional[int] = None) -> Tensor:
    rows, heads, head_dim = q.shape
    _, kv_heads, prompt_length, _ = prompt_keys.shape
    completion_length = keys.shape[2]
    for name, tensor in (("prompt_keys", prompt_keys), ("prompt_values", prompt_values), ("keys", keys),
                         ("values", values)):
        if not tensor.is_contiguous() or tensor.shape[1] != kv_heads or tensor.shape[3] != head_dim:
            raise ValueError(f"{name}: expected a contiguous [*, {kv_heads}, *, {head_dim}] tensor, received "
                             f"{list(tensor.shape)} with strides {tensor.stride()}")
    for name, tensor in (("row_prompt", row_prompt), ("start", start), ("position", position)):
        if tensor.dtype != torch.int32 or tensor.numel() < rows:
            raise ValueError(f"{name}: expected an int32 tensor of at least {rows} rows, received "
                             f"{tensor.dtype} {list(tensor.shape)}")
    out = torch.empty(rows, heads, head_dim, device=q.device, dtype=q.dtype)
    group = heads // kv_heads
    block = 16 if interpreting() else 64
    if splits is None:
        splits = attention_splits(rows, kv_heads, prompt_length + completion_length, block, _num_sms(q.device))
    part = (torch.empty(rows, kv_heads, splits, max(MIN_DOT, triton.next_power_of_2(group)), head_dim + 2,
                        device=q.device, dtype=torch.float32) if splits > 1 else out)
    launch(
        _decode_attention_kernel, (rows, kv_heads, splits),
        q, q.stride(0), q.stride(1), k_new, k_new.stride(0), k_new.stride(1), v_new, v_new.stride(0), v_new.stride(1),
        prompt_keys, prompt_values, keys, values, row_prompt, start, position, out, out.stride(0), out.stride(1), part,
        counters, kv_heads, prompt_length, completion_length, scale,
        GQ=group, GQ_PAD=max(MIN_DOT, triton.next_power_of_2(group)), D=head_dim, BLOCK_C=block, SPLITS=splits,
        UPCAST=interpreting(), num_warps=4 if not interpreting() else 1, num_stages=3 if not interpreting() else 1,
    )
    return out
