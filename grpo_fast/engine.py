"""The rollout engine: batched sampling from the policy being trained, with its KV cache preallocated.

``RolloutEngine()`` is a ``Generate`` (``engine(model, prompt_ids, params)`` -> completion ids, as
``rollout.hf_generate``), and ``engine.generate(...)`` also returns each sampled token's log-prob
``log_softmax(logits / temperature)[token]`` over the full vocabulary (before EOS suppression and
top-k / top-p / min-p filtering): the quantity the loss uses as ``old_logps``. The logits are the
model's own: the lm_head's output with the model's logit transform (``grpo_fast.logits``: Gemma's
soft cap, Cohere's or Granite's scale) applied, as its forward does; a model whose config sets a
transform grpo-fast does not know is refused.

It samples from the very model it is given (any Hugging Face causal LM; peft LoRA stays unmerged,
NF4 bitsandbytes weights stay packed; no weight copy):

1. **Prefill once per prompt, its KV stored once.** The step's distinct prompts run as one
   left-padded batch; each prompt's keys and values go to one prompt slot, shared by the
   ``num_generations`` rows of its group (the prompt's compute and its memory are paid once per
   group, not once per row).
2. **Static KV cache in two segments.** Per layer a prompt segment ``[slots, kv_heads, P, head_dim]``
   (a prompt right-aligned in its slot, P the longest prompt rounded up to 64) and a completion
   segment ``[rows, kv_heads, C, head_dim]`` (C = ``max_completion_length``); per row,
   on the device, its prompt slot (``row_prompt``), its prompt's first column and its completion
   column, compacted with the row (``memory.ModelShape.rollout_kv_bytes`` is its size, the same
   formula the memory estimate and the budget below use). A row's ``t``-th decode step writes its
   completion column ``t`` (rows need not be at the same step: slot refill, below); a row attends to
   its slot's prompt columns, then to its own completion.
   With the decode attention kernel (below) both segments are read in place; so they are without it
   (CPU, sdpa) while the rows are slot-major (until the first compaction): a slot's rows'
   queries are the rows of one product with its prompt keys (``_split_attention``). Otherwise
   (after a compaction, eager attention, models without the attention interface) each layer gathers
   its rows' prompt KV and joins it to their completions for the mask, a transient of
   ``[rows, kv_heads, P + C, head_dim]`` keys and values per layer and step. With CUDA graphs the
   cache is kept and reused across calls while its segments are long enough (the graphs read it at
   fixed addresses, so it stays allocated between steps, and prompt widths that vary do not make new
   shapes); otherwise it is freed after each call.
3. **Batched decode without per-token host syncs.** A done-mask and each row's step live on the
   device; the host reads them only every ``sync_every`` steps (and at the step by which a group
   must have finished, known on the host). There, a prompt slot whose rows are all done takes the
   next waiting prompt (below); once no prompt waits, rows that finished drop out: when the live rows
   fit in half the batch, they move to the front of the cache (in place) and decoding continues on
   that prefix, a power of two of at least 8 rows, so that few shapes (and CUDA graphs) exist.
   Compaction waits until no prompt waits, so rows stay slot-major (row ``s * group + j`` of slot s)
   while slots are refilled.
4. **Sampling on the device** (``sample_tokens``): EOS suppressed before
   ``min_completion_length``, temperature, top-k, top-p, min-p (Hugging Face's order and
   semantics, except that a token tied with the last one top-p keeps stays too: each truncation then
   keeps every token whose scaled logit is at least one threshold per draw, which the engine records
   with the draw's log-prob under the truncated distribution, ``EngineOutput.logit_thresholds`` and
   ``kept_logprobs``, for the trainer to score the same distribution), then an exponential-race draw (``argmax(p / Exp(1))``, a categorical sample with no
   host sync) from a seeded ``torch.Generator``. ``top_k=1`` is greedy decoding. On CUDA without
   top-k (other than 1), top-p or min-p, one Triton pass over the logits does all of it instead
   (``kernels/sampling.py``: a Gumbel-max draw from Philox uniforms keyed by a seed the generator
   gives once per call, the row's output row, its own step and the token, so a draw does not depend
   on where the row sits in the batch). EOS suppression is per row (its own step).
5. **Stop strings** are matched on the host, on each live row's decoded completion, at the
   ``sync_every`` checks; a matched row stops and every completion is finally cut right after the
   token that completes its first stop string (``rollout.cut_at_stop_strings``), so the result is
   as if it had stopped there; the tokens sampled in between are discarded.
6. **Within a KV budget, slots refilled** (``max_kv_bytes``): when the cache for all of a call's
   rows would not fit, it holds as many whole groups as the budget does (``prompts_per_wave`` prompt
   slots: each group costs its prompt's KV once plus its rows' completions; a group never splits).
   The first prompts fill the slots; at a sync point a slot whose rows are all done takes the next
   waiting prompt (prefilled into the slot, its rows restarted at step 0 in the same cache rows: no
   new decode shapes) while the other groups decode on, so a long completion does not hold the
   prompts behind it back. Greedy tokens equal one big batch's; sampled ones are deterministic for a seed (with the
   one-pass kernel, the same as one big batch's: draws are keyed by output row and step).
7. **On CUDA**: the one-token decode step is compiled with ``torch.compile(mode="reduce-overhead")``
   (CUDA graphs; falls back to eager with a warning when compiling fails), and the decode loop runs
   inside ``grpo_fast.nf4.fused_nf4_decode`` when that module is present: NF4 layers (with their
   plain LoRA adapters, q/k/v and gate/up grouped) run through the NF4 decode kernel on a repacked
   copy of the weights (0.5625 bytes per weight). With CUDA graphs the copy is kept between calls
   (the graphs read it at fixed addresses; ``keep_nf4_repack``), else it is freed after each call.
   Both are off on CPU.

8. **Multi-turn rollouts** (``generate(..., turns=handler)``, a ``rollout.TurnHandler``; the
   bookkeeping is ``grpo_fast.turns``): a row that ends a turn with EOS is offered to the handler at
   the next host check; the future it returns pauses the row (it decodes no more, but keeps its slot
   and its place in the cache) while the other rows decode on; once the future is done, its tokens
   (a tool turn) are fed to the row one per decode step through the same step (no new shapes), then
   the row samples again. Appended tokens count against ``max_completion_length`` and carry
   ``tool_mask`` 0 and log-prob 0.0. When every live row waits on a tool, the host waits for the
   first one instead of decoding. Sampled draws are keyed by output row and step (as the one-pass
   kernel's are), so a rollout does not depend on when its tools finish. Without a handler the loop
   is the single-turn one above.

Attention runs through ``decode_attention`` (on CUDA, for models on transformers' attention
interface, the decode attention kernel ``kernels/decode_attention.py``: a row's shared prompt slot
and its own completion, read in place; else transformers' sdpa, with grouped-query decode on the KV
heads) or, for a model loaded with ``eager``, eager attention, with masks built here; the model's
own implementation (e.g. flash_attention_2) is restored after the call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import fallback
from .kernels.config import triton_usable_on
from .kernels.decode_attention import attention_supported
from .kernels.decode_attention import decode_attention as fused_decode_attention
from .kernels.sampling import MAX_EOS, STREAM_ROWS, sample_fused
from .logits import LogitTransform, logit_transform
from .memory import ModelShape, cache_length
from .rollout import (SamplingParams, TurnHandler, check_sampling_params, cut_at_eos, cut_at_stop_strings, pad,
                      stop_strings_tokenizer)
from .truncation import truncates, truncation_threshold
from .turns import TurnState, keyed_exponentials

try:  # the fused NF4 decode matmul (CUDA); absent or inapplicable means the bitsandbytes path
    from .nf4 import NF4DecodeCache, fused_nf4_decode
    from .nf4 import kernel_works as nf4_kernel_works
except ImportError:
    NF4DecodeCache = fused_nf4_decode = nf4_kernel_works = None

# Graphs of the decode step: one per (batch size, cache length). Batch sizes halve down to 8 and the
# cache only grows, so a run makes a few dozen at most; past dynamo's default limit of 8 it would
# silently decode without graphs.
RECOMPILE_LIMIT = 64


def _recompile_limit(limit: int):
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    return config.patch(**{name: max(limit, getattr(config, name))})
# Finished rows are compacted out down to this many rows at the least: a decode step of a few rows
# costs about what one of 8 does (it reads the same weights), and each batch size is one more CUDA graph.
MIN_COMPACT_ROWS = 8


@dataclass
class EngineOutput:
    completion_ids: list[list[int]]  # [B] as a Generate returns them (EOS kept, cut at stop strings)
    logprobs: list[list[float]]  # [B] per completion token: log_softmax(logits / temperature)[token]
    slots_per_step: list[int] = field(default_factory=list)  # cache rows computed at each decode step
    # [B] per completion token with a TurnHandler: 1 sampled by the model, 0 appended by the handler; else None
    tool_mask: list[list[int]] | None = None
    # With top-k / top-p / min-p (``records_truncation``), per completion token: the threshold of the
    # truncation it was drawn under (the kept set is every temperature-scaled logit at or above it: the
    # loss's ``logit_threshold``) and its log-prob under that truncated distribution; else None.
    logit_thresholds: list[list[float]] | None = None
    kept_logprobs: list[list[float]] | None = None


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def filter_logits(scores: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """``scores`` [B, V] with the tokens that top-k, then top-p, then min-p drop set to -inf
    (``truncation_threshold``: Hugging Face's warpers, except that a token tied with the last one top-p
    keeps is kept too)."""
    threshold = truncation_threshold(scores, top_k, top_p, min_p)
    return scores if threshold is None else scores.masked_fill(scores < threshold[..., None], -math.inf)


def race_argmax(probs: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
    """argmax(p / E) over the last dimension: with E ~ Exp(1) i.i.d. it picks token i with
    probability p_i (an exponential race), a categorical draw with no host sync. A draw of E = 0
    happens (float32 uniforms reach their end point) and would turn a filtered-out token's 0 / 0
    into NaN, which argmax returns: E is kept above 0, so p = 0 never wins."""
    return (probs / race.clamp_min(torch.finfo(race.dtype).tiny)).argmax(dim=-1)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, step: int | torch.Tensor, eos_ids: torch.Tensor,
                  generator: torch.Generator | None, keyed: tuple[int, torch.Tensor] | None = None, *,
                  truncation: bool = False):
    """(tokens [B], log-probs [B]) for one decode step from float32 ``logits`` [B, V], on their device.
    ``step``: the tokens sampled so far, one for all rows or per row ([B]: EOS suppressed per row).
    ``keyed``: (seed, output rows [B]): draws keyed by seed, row, ``step`` and token
    (``turns.keyed_exponentials``) instead of taken from ``generator`` in batch order.
    ``truncation``: also return (thresholds [B], kept log-probs [B]): the threshold of top-k / top-p /
    min-p (``truncation_threshold``; -inf where nothing was dropped) and the sampled token's log-prob
    under the truncated distribution it was drawn from. Both are of the logits after EOS suppression
    (``min_completion_length``, a benchmark setting the trainer never uses): a replay of the threshold on
    unsuppressed logits would count EOS in the kept set where it was held back."""
    scaled = logits / params.temperature
    # The log-prob is the loss's: the full, unfiltered distribution at this temperature.
    log_normaliser = torch.logsumexp(scaled, dim=-1)
    if isinstance(step, torch.Tensor):
        if params.min_completion_length > 0:  # only the EOS columns of the rows still short (scaled is ours)
            early = (step < params.min_completion_length)[:, None]
            scaled[:, eos_ids] = scaled[:, eos_ids].masked_fill(early, -math.inf)
    elif step < params.min_completion_length:
        scaled = scaled.index_fill(-1, eos_ids, -math.inf)
    greedy = params.top_k == 1  # its argmax needs no threshold unless one is recorded
    threshold = (None if greedy and not truncation
                 else truncation_threshold(scaled, params.top_k, params.top_p, params.min_p))
    kept = scaled if threshold is None else scaled.masked_fill(scaled < threshold[:, None], -math.inf)
    if greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        probs = kept.softmax(dim=-1)
        race = (torch.empty_like(probs).exponential_(generator=generator) if keyed is None
                else keyed_exponentials(keyed[0], keyed[1], step, probs.shape[-1]))
        tokens = race_argmax(probs, race)
    # EOS suppression only touched EOS entries, never sampled then: `scaled` holds the sampled token's value.
    chosen = scaled.gather(-1, tokens[:, None])[:, 0]
    logprobs = chosen - log_normaliser
    if not truncation:
        return tokens, logprobs
    if threshold is None:
        return tokens, logprobs, torch.full_like(logprobs, -math.inf), logprobs
    return tokens, logprobs, threshold, chosen - torch.logsumexp(kept, dim=-1)


# --------------------------------------------------------------------------------------------
# The KV cache: a preallocated buffer per layer, written in lockstep
# --------------------------------------------------------------------------------------------


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values: a prompt segment ``[slots, kv_heads, P, head_dim]`` (each prompt's
    KV once, right-aligned: its last token in column P - 1) and a completion segment
    ``[capacity, kv_heads, C, head_dim]`` (each row's own tokens, from column 0).

    Prefill (``cache.prefill_slots`` set): the prompts' KV go to their slots, and the prompt attends
    only to itself. Decode without the attention kernel: each row's new key and value go to its
    completion column ``cache.row_position[b]``, and the attention gets, per row, its prompt slot's
    columns (gathered by ``cache.row_prompt``: a transient ``[rows, kv_heads, P, head_dim]`` copy per
    layer and step, as the masked attention needs one tensor per row) followed by its completion
    columns, for the mask to select from; except while the rows are slot-major with the engine's sdpa
    (``cache.split_attention``), when ``_split_attention`` reads both segments in place. Views of the completion buffers are made per batch size
    outside the decode step (never while it is traced, which would change its guards) and kept, so
    their tensors stay the same objects. With the attention kernel (``cache.fused_attention``) this
    layer does nothing at decode: the kernel reads both segments in place and writes the new token.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: "SlotCache"):
        super().__init__()
        self.cache = cache
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cache, heads, head_dim = self.cache, key_states.shape[1], key_states.shape[-1]
        prompt_shape = (cache.slots, heads, cache.prompt_length, head_dim)
        if (self.is_initialized and self.prompt_keys.shape == prompt_shape
                and self.keys.dtype == key_states.dtype):
            return
        self.prompt_keys = key_states.new_zeros(prompt_shape)
        self.prompt_values = value_states.new_zeros(prompt_shape)
        self.keys = key_states.new_zeros(cache.capacity, heads, cache.completion_length, head_dim)
        self.values = value_states.new_zeros(cache.capacity, heads, cache.completion_length, head_dim)
        if self.keys.is_cuda:  # the decode attention kernel reads and writes them in place: static for CUDA graphs
            for tensor in (self.prompt_keys, self.prompt_values, self.keys, self.values):
                torch._dynamo.mark_static_address(tensor)
        self.views = {}
        self.is_initialized = True

    def view(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch not in self.views:
            self.views[batch] = (self.keys[:batch], self.values[:batch])
            if self.keys.is_cuda:  # fixed addresses: CUDA graphs read them in place instead of copying
                for tensor in self.views[batch]:
                    torch._dynamo.mark_static_address(tensor)
        return self.views[batch]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cache = self.cache
        if cache.prefill_slots is not None:
            self.lazy_initialization(key_states, value_states)
            width = key_states.shape[2]
            for buffer, states in ((self.prompt_keys, key_states), (self.prompt_values, value_states)):
                buffer[cache.prefill_slots, :, cache.prompt_length - width:] = states
            return key_states, value_states
        if cache.fused_attention:
            return key_states, value_states  # the decode attention kernel writes them as it reads the cache
        keys, values = self.views[cache.batch]
        rows, columns = cache.row_index[: cache.batch], cache.row_position[: cache.batch]
        keys[rows, :, columns] = key_states[:, :, 0]
        values[rows, :, columns] = value_states[:, :, 0]
        if cache.split_attention and cache.slot_major:
            return key_states, value_states  # decode_attention reads both segments in place (_split_attention)
        slots = cache.row_prompt[: cache.batch]
        return (torch.cat([self.prompt_keys.index_select(0, slots), keys], dim=2),
                torch.cat([self.prompt_values.index_select(0, slots), values], dim=2))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.prompt_length + self.cache.completion_length, 0

    def get_seq_length(self) -> int:
        return 0  # unused: the engine always passes position ids and 4D masks

    def get_max_length(self) -> int:
        return self.cache.prompt_length + self.cache.completion_length


class SlotCache(Cache):
    """The engine's KV cache, in every layer: ``slots`` prompt slots of ``prompt_length`` columns (a
    group's prompt KV once, shared by its rows) and ``capacity`` rows of ``completion_length`` columns.

    Per row, on the device (static tensors, compacted with the rows): ``row_prompt`` its prompt slot,
    ``row_start`` its prompt's first column in the slot (the slot's columns before it are unused),
    ``row_position`` its completion column that the next decode step writes (its tokens so far)."""

    def __init__(self, num_layers: int, slots: int, capacity: int, prompt_length: int, completion_length: int,
                 device: torch.device):
        self.slots, self.capacity = slots, capacity
        self.prompt_length, self.completion_length = prompt_length, completion_length
        self.prefill_slots: torch.Tensor | None = None  # set during prefill: the prompts' slots
        self.batch = capacity  # rows decoded now (a prefix of the buffers)
        self.row_index = torch.arange(capacity, device=device)
        self.row_prompt = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.row_start = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.row_position = torch.zeros(capacity, dtype=torch.int32, device=device)
        # With the decode attention kernel: its split tickets; the kernel writes the new keys and values
        # (update() does not).
        self.fused_attention = False
        # Without the kernel, for models on the attention interface with sdpa: decode_attention attends
        # to the two segments in place while the rows are slot-major (row b of prompt slot b // group,
        # until a compaction); else update() gathers each row's prompt KV.
        self.split_attention = False
        self.slot_major = False
        self.group = 1
        self.tickets = torch.zeros(0, dtype=torch.int32, device=device)
        if device.type == "cuda":  # graph replays read them in place
            for tensor in (self.row_index, self.row_prompt, self.row_start, self.row_position):
                torch._dynamo.mark_static_address(tensor)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    @property
    def device(self) -> torch.device:
        return self.row_index.device

    def fits(self, num_layers: int, slots: int, capacity: int, prompt_length: int, completion_length: int,
             device: torch.device) -> bool:
        """Reusable for a call needing these lengths: longer segments serve too (their extra columns are
        never attended to), so prompts that vary from step to step do not change the shapes."""
        return ((len(self.layers), self.slots, self.capacity, self.device) == (num_layers, slots, capacity, device)
                and self.prompt_length >= prompt_length and self.completion_length >= completion_length)

    def set_batch(self, size: int) -> None:
        """Decode the first ``size`` rows from now on (after the prefill allocated the buffers)."""
        for layer in self.layers:
            layer.view(size)
        self.batch = size

    def start_rows(self, row_prompt: torch.Tensor, row_start: torch.Tensor, group: int) -> None:
        """Rows ``0 .. len(row_prompt)-1`` begin their completions: prompt slot and first column each;
        ``row_prompt`` is slot-major (``group`` rows of slot 0, then of slot 1, ...)."""
        self.start_rows_at(torch.arange(len(row_prompt), device=self.device), row_prompt, row_start)
        self.begin(len(row_prompt), group)

    def start_rows_at(self, rows: torch.Tensor, row_prompt: torch.Tensor, row_start: torch.Tensor) -> None:
        """Rows ``rows`` (re)start their completions: prompt slot and first prompt column each."""
        self.row_prompt[rows] = row_prompt
        self.row_start[rows] = row_start
        self.row_position[rows] = 0

    def begin(self, batch: int, group: int) -> None:
        """Decode the first ``batch`` rows, slot-major (row ``s * group + j`` of prompt slot s)."""
        self.group, self.slot_major = group, True
        self.set_batch(batch)

    def compact(self, order: torch.Tensor) -> None:
        """Rows ``order`` (on the device) become rows ``0 .. len(order)-1`` and the batch shrinks to them
        (their completion KV and per-row state move; the prompt slots stay where they are)."""
        size = len(order)
        for layer in self.layers:
            for buffer in (layer.keys, layer.values):
                buffer[:size] = buffer[: self.batch].index_select(0, order)
        for state in (self.row_prompt, self.row_start, self.row_position):
            state[:size] = state[: self.batch].index_select(0, order)
        self.slot_major = False
        self.set_batch(size)

    def attention_mask(self) -> torch.Tensor:
        """[batch, P + C] booleans: each row's prompt columns and its completion columns up to and
        including the one the next decode step writes."""
        batch, device = self.batch, self.device
        prompt = torch.arange(self.prompt_length, device=device)[None, :] >= self.row_start[:batch, None]
        completion = (torch.arange(self.completion_length, device=device)[None, :]
                      <= self.row_position[:batch, None])
        return torch.cat([prompt, completion], dim=1)

    def use_fused_attention(self, kv_heads: int) -> None:
        """Decode through the attention kernel from now on."""
        if self.tickets.numel() < self.capacity * kv_heads:
            self.tickets = torch.zeros(self.capacity * kv_heads, dtype=torch.int32, device=self.device)
            if self.tickets.is_cuda:  # graph replays read them in place
                torch._dynamo.mark_static_address(self.tickets)
        self.fused_attention = True


# --------------------------------------------------------------------------------------------
# The model: decoder, head, attention, masks
# --------------------------------------------------------------------------------------------


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


DECODE_ATTENTION = "grpo_fast_decode"  # sdpa, with grouped-query decode on the KV heads (registered on first use)
SLOT_CACHE_KEYWORD = "grpo_slot_cache"  # the model keyword argument that brings the cache to decode_attention


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, except for one query token with grouped-query attention: the
    query heads of a group attend as rows of their KV head, so the cache is read once per KV head.
    (With a mask, transformers expands K and V to every query head under torch.compile: for
    Qwen2.5-7B seven extra copies of the whole cache per decode step.) Given the engine's cache
    (``slot_cache``, passed through the model's keyword arguments) in fused mode, one token per row
    runs ``kernels.decode_attention`` instead: only each row's prompt columns (in its group's shared
    slot) and its written completion columns are read, and the new token's key and value (``key``,
    ``value`` here) are written into the cache by the same kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = kwargs.pop(SLOT_CACHE_KEYWORD, None)
    batch, heads, query_length, head_dim = query.shape
    kv_heads = key.shape[1]
    if cache is not None and cache.split_attention and cache.slot_major and query_length == 1:
        return _split_attention(cache, cache.layers[module.layer_idx], query, attention_mask, scaling), None
    if cache is not None and cache.fused_attention and query_length == 1:
        layer = cache.layers[module.layer_idx]
        scale = scaling if scaling is not None else head_dim ** -0.5
        out = fused_decode_attention(query[:, :, 0], key[:, :, 0], value[:, :, 0], layer.prompt_keys,
                                     layer.prompt_values, layer.keys, layer.values, cache.row_prompt,
                                     cache.row_start, cache.row_position, cache.tickets, scale)
        return out[:, None], None
    if query_length != 1 or heads == kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query head h uses KV head h // group (repeat_kv's order): [B, H, 1, D] -> [B, KV, group, D]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None


def _split_attention(cache: SlotCache, layer: _SlotLayer, query: torch.Tensor, allowed: torch.Tensor,
                     scaling: float | None) -> torch.Tensor:
    """One query token per row over the two cache segments in place, no gathered copy: rows are
    slot-major, so the queries of a prompt slot's rows (and their query heads) are the rows of one
    product with the slot's prompt keys; each row's completion is its own product. One softmax (fp32)
    over both parts' scores, which are the only tensors joined. ``allowed``: [B, 1, 1, P + C]. -> [B, 1, H, D]."""
    batch, heads, _, head_dim = query.shape
    kv_heads, group = layer.keys.shape[1], cache.group
    per_kv, slots, prompt = heads // kv_heads, batch // group, cache.prompt_length
    keys, values = layer.views[batch]
    scale = scaling if scaling is not None else head_dim ** -0.5
    q = query.reshape(batch, kv_heads, per_kv, head_dim)  # query head h uses KV head h // per_kv

    def by_slot(tensor):  # [B, KV, g, X] -> [slots, KV, group * g, X]
        return tensor.reshape(slots, group, kv_heads, per_kv, -1).transpose(1, 2).reshape(slots, kv_heads,
                                                                                          group * per_kv, -1)

    def by_row(tensor):  # the inverse
        return tensor.reshape(slots, kv_heads, group, per_kv, -1).transpose(1, 2).reshape(batch, kv_heads, per_kv, -1)

    prompt_scores = by_row(by_slot(q) @ layer.prompt_keys[:slots].transpose(-1, -2))
    scores = torch.cat([prompt_scores, q @ keys.transpose(-1, -2)], dim=-1).float() * scale
    probs = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1).to(values.dtype)
    out = by_row(by_slot(probs[..., :prompt]) @ layer.prompt_values[:slots]) + probs[..., prompt:] @ values
    return out.reshape(batch, 1, heads, head_dim)


@contextlib.contextmanager
def _mask_friendly_attention(model):
    """Inside: the model attends with the engine's sdpa (``decode_attention``) or eager, which take
    the 4D masks built here; yields the mask format, "sdpa" or "eager"."""
    from transformers import AttentionInterface

    base = _base_model(model)
    current = base.config._attn_implementation
    if current == "eager":
        yield current
        return
    if DECODE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    base.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield "sdpa"
    finally:
        base.set_attn_implementation(current)


def _attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """sdpa takes a boolean mask (True attends); eager adds a float mask to its scores."""
    if implementation == "sdpa":
        return allowed
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _prefill_mask(prompt_mask: torch.Tensor) -> torch.Tensor:
    """[N, 1, P, P]: causal and not padding; every position also sees itself, so a padding row is
    never fully masked (sdpa would give NaN there, which would reach the cached values)."""
    width = prompt_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=prompt_mask.device).tril()
    allowed = causal[None] & prompt_mask.bool()[:, None, :]
    return (allowed | torch.eye(width, dtype=torch.bool, device=prompt_mask.device))[:, None]


def _check_full_attention(config, positions: int) -> None:
    """The masks built here are full causal: refuse layers that attend otherwise over ``positions``."""
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if other:
        raise ValueError(f"model: expected attention layers (full or sliding-window), received {other}; "
                         f"sample with Hugging Face generate (rollout_engine: hf)")
    window = getattr(config, "sliding_window", None)
    sliding = ("sliding_attention" in layer_types if layer_types
               else getattr(config, "use_sliding_window", True))
    if sliding and window is not None and window < positions:
        raise ValueError(f"model: expected full attention over the {positions} prompt + completion positions, "
                         f"received sliding-window layers of {window}; sample with Hugging Face generate "
                         f"(rollout_engine: hf)")


def _cache_keyword(decoder) -> str:
    """transformers 5.x names the decoder's cache argument ``cache`` (``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


class RolloutEngine:
    """A ``Generate`` that samples with a preallocated KV cache, shared prompt prefill and batched decode.

    ``sync_every``: decode steps between host checks of the done-mask (finished rows leave, stop
    strings are matched); ``compact``: move live rows to the front when they fit in half the batch;
    ``cuda_graphs``: compile the decode step on CUDA; ``fused_nf4``: decode NF4 layers with the fused
    matmul on CUDA; ``keep_nf4_repack``: keep the repacked NF4 copy (``nf4_repack_bytes``) between
    calls (None: with CUDA graphs, whose replays read it in place); ``seed``: seeds the engine's
    generator once (None: each call draws a seed from torch's global RNG, so ``torch.manual_seed``
    and a restored RNG state reproduce runs); ``tokenizer``: needed for stop strings;
    ``max_kv_bytes``: the KV cache's budget in bytes (None: all of a call's rows at once): as many
    whole groups decode together as fit it, a finished group's slot taking the next waiting prompt.
    """

    def __init__(self, *, sync_every: int = 8, compact: bool = True, cuda_graphs: bool = True,
                 fused_nf4: bool = True, keep_nf4_repack: bool | None = None, seed: int | None = None,
                 tokenizer=None, max_kv_bytes: int | None = None):
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every: expected an integer >= 1, received {sync_every!r}")
        if max_kv_bytes is not None and not (isinstance(max_kv_bytes, (int, float)) and max_kv_bytes > 0):
            raise ValueError(f"max_kv_bytes: expected a positive number of bytes or None, received {max_kv_bytes!r}")
        self.max_kv_bytes = max_kv_bytes
        self.sync_every, self.compact = sync_every, compact
        self.cuda_graphs, self.fused_nf4 = cuda_graphs, fused_nf4
        self.seed, self.tokenizer = seed, tokenizer
        self.keep_nf4_repack = keep_nf4_repack
        self._generator: torch.Generator | None = None
        self._cache: SlotCache | None = None
        self._compiled_step = None
        self._nf4_cache = NF4DecodeCache() if NF4DecodeCache is not None else None

    def __call__(self, model, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        return self.generate(model, prompt_ids, params).completion_ids

    def release(self) -> None:
        """Free a KV cache and repacked NF4 weights kept for CUDA graphs and the compiled decode step
        (the next call allocates and compiles anew; ``torch._dynamo.reset()`` also frees the graphs'
        memory pools)."""
        self._cache = None
        self._compiled_step = None
        if self._nf4_cache is not None:
            self._nf4_cache.clear()

    @property
    def nf4_repack_bytes(self) -> int:
        """Bytes of the repacked NF4 weights (and LoRA snapshot) kept between calls."""
        return self._nf4_cache.nbytes if self._nf4_cache is not None else 0

    # ---- set-up -------------------------------------------------------------------------------

    def _generator_for(self, device: torch.device, seed: int | None) -> torch.Generator:
        """A call's seed restarts the stream; an engine seed starts one stream that calls continue;
        with neither, each call draws its seed from torch's global RNG, so the global state alone
        decides the samples (what a trainer checkpoint saves and a resumed run restores)."""
        continuing = self._generator is not None and self._generator.device == device
        if seed is None and self.seed is not None and continuing:
            return self._generator
        if seed is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        return self._generator

    def _cache_for(self, num_layers: int, slots: int, capacity: int, prompt_length: int, completion_length: int,
                   device: torch.device) -> SlotCache:
        if self._cache is None or not self._cache.fits(num_layers, slots, capacity, prompt_length, completion_length,
                                                       device):
            self._cache = None  # release the old buffers before allocating the new ones
            self._cache = SlotCache(num_layers, slots, capacity, prompt_length, completion_length, device)
        return self._cache

    def _uses_cuda_graphs(self, device: torch.device) -> bool:
        return self.cuda_graphs and device.type == "cuda"

    def _compile_step(self):
        # One graph per batch size (the compaction buckets) and cache length; the cache buffers are
        # static addresses, so a replay reads and writes them in place.
        return torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)

    def _step_function(self, device: torch.device):
        """The one-token forward: compiled with CUDA graphs on CUDA when asked, else eager; a step
        that fails to compile warns once and the engine decodes eagerly from then on."""
        if not self._uses_cuda_graphs(device):
            return _decode_step
        if self._compiled_step is None:
            self._compiled_step = self._compile_step()

        def step(*args):
            if self._compiled_step is None:
                return _decode_step(*args)
            try:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
                with _recompile_limit(RECOMPILE_LIMIT):
                    return self._compiled_step(*args)
            except Exception as error:  # noqa: BLE001 - any compile failure: eager is correct, only slower
                warnings.warn(f"RolloutEngine: compiling the decode step failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200] if str(error) else ''}); decoding eagerly")
                self._compiled_step, self.cuda_graphs = None, False
                return _decode_step(*args)

        return step

    def _nf4_decode(self, decoder, device: torch.device):
        """The fused NF4 decode matmul around the decode loop (CUDA; the one call site), when its kernel
        works here (decided before the decode step is compiled: see nf4.kernel_works)."""
        if self.fused_nf4 and fused_nf4_decode is not None and device.type == "cuda" and nf4_kernel_works(decoder):
            return fused_nf4_decode(decoder, cache=self._kept_nf4(device))
        return contextlib.nullcontext()

    def _fused_attention(self, config, implementation: str, device: torch.device,
                         dtype: torch.dtype | None = None) -> bool:
        """Decode attention through the kernel (CUDA of an architecture it supports for the cache's
        ``dtype``, the engine's sdpa path, a head size it takes)."""
        shape = ModelShape.from_config(config)
        return (device.type == "cuda" and triton_usable_on(device, dtype) and implementation == "sdpa"
                and attention_supported(shape.q_dim // shape.heads, shape.heads, shape.kv_heads))

    def _fused_sampling(self, params: SamplingParams, device: torch.device) -> bool:
        """Sample with the one-pass kernel (CUDA; no top-k other than 1, no top-p, no min-p)."""
        return (device.type == "cuda" and triton_usable_on(device, torch.float32) and fused_sampling_supported(params)
                and fallback.usable(SAMPLING_KERNEL, device))

    def _kept_nf4(self, device: torch.device):
        """The cache of repacked NF4 weights when they are kept between calls, else None (freed on exit)."""
        keep = self._uses_cuda_graphs(device) if self.keep_nf4_repack is None else self.keep_nf4_repack
        if not keep and self._nf4_cache is not None:
            self._nf4_cache.clear()
        return self._nf4_cache if keep else None

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, model, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
                 seed: int | None = None, tokenizer=None, turns: TurnHandler | None = None) -> EngineOutput:
        """``params.num_generations`` completions per prompt (a group's rows contiguous) and their log-probs.

        ``turns``: multi-turn rollouts (``grpo_fast.turns``): a row that ends a turn with EOS is offered
        to ``turns.turn_ended``; the tokens of the future it returns are appended (log-prob 0.0,
        ``tool_mask`` 0, counted against ``max_completion_length``) and the row decodes on, while the
        other rows keep decoding. A completion is cut at its own end, not at its first EOS."""
        check_sampling_params(params)
        tokenizer = stop_strings_tokenizer(params, tokenizer if tokenizer is not None else self.tokenizer)
        for index, prompt in enumerate(prompt_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt_ids: expected non-empty prompts, received an empty prompt at index {index}")
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        transform = logit_transform(model)  # read once per call, outside the compiled step
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        prompts_per_wave = self.prompts_per_wave(decoder.config, prompt_ids, params,
                                                 decoder.get_input_embeddings().weight.dtype)
        generator = self._generator_for(device, seed)
        try:
            with _mask_friendly_attention(model) as implementation, self._nf4_decode(decoder, device):
                tokens, logprobs, slots, state = self._decode(decoder, head, transform, prompt_ids, params,
                                                              implementation, device, generator, tokenizer,
                                                              slots=prompts_per_wave, turns=turns)
        finally:
            model.train(was_training)
            if not self._uses_cuda_graphs(device):
                # Without CUDA graphs nothing needs the KV buffers' addresses to stay: free them for the
                # training pass. With graphs they stay (a replay reads and writes them in place).
                self._cache = None
        thresholds = kept_logprobs = None
        if logprobs.dim() == 3:  # truncated sampling: (full log-prob, threshold, kept log-prob) per token
            logprobs, thresholds, kept_logprobs = logprobs.unbind(-1)
        completions = []
        for index, row in enumerate(tokens.tolist()):
            if state is not None:  # its own end (appended tool turns hold EOS ids; stop strings applied per turn)
                ids = row[: state.ends[index]]
            else:
                ids = cut_at_eos(row, params.eos_token_ids, params.max_completion_length)
                if params.stop_strings:
                    ids = cut_at_stop_strings(ids, params.stop_strings, tokenizer)
            completions.append(ids)

        def per_completion(values):
            return None if values is None else [row[: len(ids)] for row, ids in zip(values.tolist(), completions)]

        tool_mask = state.tool_masks([len(ids) for ids in completions]) if state is not None else None
        return EngineOutput(completions, per_completion(logprobs), slots, tool_mask,
                            logit_thresholds=per_completion(thresholds), kept_logprobs=per_completion(kept_logprobs))

    def prompts_per_wave(self, config, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
                         dtype: torch.dtype) -> int:
        """How many prompts (with their groups) decode together: all, or as many as ``max_kv_bytes``
        holds (``ModelShape.rollout_kv_bytes``: each prompt's KV once at the longest prompt's length,
        each row's completion at ``max_completion_length``)."""
        if self.max_kv_bytes is None:
            return max(1, len(prompt_ids))
        width = max(len(prompt) for prompt in prompt_ids)
        group = params.num_generations
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
        group_bytes = ModelShape.from_config(config).rollout_kv_bytes(1, group, width, params.max_completion_length,
                                                                      dtype_bytes)
        prompts = int(self.max_kv_bytes // group_bytes)
        if prompts < 1:  # e.g. a prompt longer than the ones the trainer sized the budget from
            warnings.warn(f"RolloutEngine: one group's KV cache (a {cache_length(width)}-token prompt and {group} rows "
                          f"x {params.max_completion_length} completion tokens: {group_bytes:,} bytes) "
                          f"exceeds max_kv_bytes ({int(self.max_kv_bytes):,}); decoding one group at a time over "
                          "the budget")
            return 1
        return min(prompts, len(prompt_ids))

    def _decode(self, decoder, head, transform: LogitTransform, prompt_ids, params: SamplingParams,
                implementation: str, device: torch.device, generator: torch.Generator,
                tokenizer, slots: int, turns: TurnHandler | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[int], TurnState | None]:
        """All of ``prompt_ids`` through a cache of ``slots`` prompt slots (and their groups' rows): the
        first prompts are prefilled into every slot; at a sync point, a slot whose rows are all done takes
        the next waiting prompt (prefilled into it, its rows restarted at step 0) while the other rows go
        on. Rows stay slot-major (row ``s * group + j`` of slot s) while prompts wait: compaction only
        once none does. With ``turns``, rows pause and resume (``TurnState``): a paused row is done on
        the device but not finished (its slot is kept, it is not compacted out), and when every live
        row is paused the host waits for a tool instead of decoding.
        -> (tokens, log-probs [prompts x group, max_new] on the CPU, rows per decode step, the turns' state)."""
        group, max_new = params.num_generations, params.max_completion_length
        total = len(prompt_ids)
        slots = min(slots, total)
        width = max(len(prompt) for prompt in prompt_ids)  # the prompt slots hold the longest prompt
        _check_full_attention(decoder.config, width + max_new)
        rows = slots * group
        cache = self._cache_for(decoder.config.num_hidden_layers, slots, rows, cache_length(width), max_new, device)
        cache_keyword = _cache_keyword(decoder)
        dtype = decoder.get_input_embeddings().weight.dtype
        eos_ids = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
        cache.fused_attention = cache.split_attention = False
        # only for models whose attention goes through the attention interface (decode_attention gets
        # the cache there); one with its own attention would attend to the new token alone
        if (getattr(decoder, "_supports_attention_backend", False)
                and self._fused_attention(decoder.config, implementation, device, dtype)
                and _attention_kernel_works(decoder.config, dtype, device)):
            cache.use_fused_attention(ModelShape.from_config(decoder.config).kv_heads)
        elif getattr(decoder, "_supports_attention_backend", False) and implementation == "sdpa":
            cache.split_attention = True

        # Outputs per output row (prompt p's rows p * group ...); column max_new takes finished rows' draws.
        out_tokens = torch.full((total * group, max_new + 1), params.pad_token_id, dtype=torch.long, device=device)
        # Truncated sampling: each draw's (full log-prob, threshold, kept log-prob) in the last dimension.
        record = records_truncation(params)
        out_logprobs = torch.zeros(total * group, max_new + 1, *((3,) if record else ()), dtype=torch.float32,
                                   device=device)
        if turns is not None:
            turns = TurnState(turns, out_tokens, out_logprobs, params, eos_ids, tokenizer)
        # Per cache row, on the device: its output row, tokens sampled so far, done, prompt length, last token.
        row_ids = torch.zeros(rows, dtype=torch.long, device=device)
        steps = torch.zeros(rows, dtype=torch.long, device=device)
        done = torch.ones(rows, dtype=torch.bool, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        tokens = torch.full((rows,), params.pad_token_id, dtype=torch.long, device=device)
        # with turns a row's draws must not depend on when its tools finished: keyed by seed, output row,
        # step and token; else from the generator, in batch order
        keyed_seed = None
        if turns is not None and params.top_k != 1:
            keyed_seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device))

        def sample(logits, steps, rows):
            keys = None if keyed_seed is None else (keyed_seed, rows)
            if not record:
                return sample_tokens(logits, params, steps, eos_ids, generator, keys)
            tokens, *figures = sample_tokens(logits, params, steps, eos_ids, generator, keys, truncation=True)
            return tokens, torch.stack(figures, dim=-1)

        if self._fused_sampling(params, device) and total * group <= STREAM_ROWS:  # rows key the kernel's draws
            greedy = params.top_k == 1
            # greedy draws nothing; else one seed from the generator per call (its only host read)
            seed = 0 if greedy else int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device))
            sample = functools.partial(_sample_one_pass, params=params, eos_ids=eos_ids, greedy=greedy, seed=seed,
                                       tickets=torch.zeros(rows, dtype=torch.int32, device=device), torch_path=sample)
        waiting = 0  # the next prompt to start
        deadline: dict[int, int] = {}  # slot -> the decode step by which its rows are certainly done

        def start(free: list[int], iteration: int) -> None:
            """The next waiting prompts into slots ``free``: prefilled, their rows' first tokens sampled."""
            nonlocal waiting, row_ids, steps, done, lengths, tokens
            free = free[: total - waiting]
            first, waiting = waiting, waiting + len(free)
            ids, prompt_mask = (tensor.to(device) for tensor in
                                pad(prompt_ids[first:waiting], params.pad_token_id, left=True))
            cache.prefill_slots = torch.tensor(free, device=device)
            try:  # each prompt once, its KV into its slot (shared by the group's rows)
                mask = _attention_mask(_prefill_mask(prompt_mask), implementation, dtype)
                hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
                                 use_cache=True, **{cache_keyword: cache}).last_hidden_state
            finally:
                cache.prefill_slots = None
            logits = transform.apply(head(hidden[:, -1])).repeat_interleave(group, dim=0)
            slot_rows = (torch.tensor(free, device=device)[:, None] * group
                         + torch.arange(group, device=device)).flatten()  # the slots' rows (slot-major)
            new_rows = torch.arange(first * group, waiting * group, device=device)
            new_lengths = prompt_mask.sum(-1).repeat_interleave(group)
            cache.start_rows_at(slot_rows, torch.tensor(free, dtype=torch.int32, device=device).repeat_interleave(group),
                                (cache.prompt_length - new_lengths).to(torch.int32))
            first_steps = torch.zeros(len(new_rows), dtype=torch.long, device=device)
            new_tokens, new_logprobs = sample(logits, steps=first_steps, rows=new_rows)
            out_tokens[new_rows, 0], out_logprobs[new_rows, 0] = new_tokens, new_logprobs
            row_ids, steps, lengths, tokens = (state.index_put((slot_rows,), value) for state, value in (
                (row_ids, new_rows), (steps, first_steps + 1), (lengths, new_lengths), (tokens, new_tokens)))
            done = done.index_put((slot_rows,), torch.isin(new_tokens, eos_ids) | (max_new == 1))
            for slot in free:
                deadline[slot] = iteration + max_new - 1

        start(list(range(slots)), 0)
        cache.begin(rows, group)
        step_function = self._step_function(device)
        slots_per_step = []
        iteration = 0  # decode steps so far
        while True:
            if (iteration + 1) % self.sync_every == 0 or iteration >= min(deadline.values(), default=0):
                # the only host syncs of the loop
                if turns is not None:  # turns ended since the last sync, stop strings, tools done
                    done, tokens = turns.sync(row_ids, done, steps, tokens, iteration, deadline)
                elif params.stop_strings:
                    done = self._stop_at_strings(out_tokens, row_ids, done, steps, params.stop_strings, tokenizer)
                for slot in [slot for slot, last in deadline.items() if last <= iteration]:
                    del deadline[slot]  # certainly done (or paused: a resumed row gets a deadline of its own)
                while True:
                    finished = done if turns is None else turns.finished(done, row_ids)
                    while waiting < total:  # slots whose rows are all finished take the next prompts (slot-major)
                        free = torch.nonzero(finished.view(-1, group).all(dim=1))[:, 0].tolist()
                        if not free:
                            break
                        start(free, iteration)
                        if turns is not None:  # a first token may end a turn already
                            done, tokens = turns.sync(row_ids, done, steps, tokens, iteration, deadline)
                        finished = done if turns is None else turns.finished(done, row_ids)
                    live = int((~finished).sum())
                    if turns is None or not turns.pending or not bool(done.all()):
                        break
                    turns.wait()  # every live row is paused: nothing to decode until a tool is done
                    done, tokens = turns.sync(row_ids, done, steps, tokens, iteration, deadline)
                if live == 0:
                    break
                size = max(MIN_COMPACT_ROWS, 1 << (live - 1).bit_length())  # a power of two: few shapes
                if self.compact and waiting == total and size <= cache.batch // 2:
                    order = torch.argsort(finished.to(torch.int8), stable=True)[:size]  # live rows first
                    cache.compact(order)
                    row_ids, steps, lengths, done, tokens = (
                        tensor[order] for tensor in (row_ids, steps, lengths, done, tokens))
            # Decode: each row's last token at its completion column (finished rows: clamped, never read)
            cache.row_position[: cache.batch] = (steps - 1).clamp(0, max_new - 1).to(torch.int32)
            mask = _attention_mask(cache.attention_mask()[:, None, None, :], implementation, dtype)
            positions = torch.where(done, 0, lengths + steps - 1)
            logits = step_function(decoder, head, transform, cache, cache_keyword, tokens[:, None],
                                   positions[:, None], mask)
            slots_per_step.append(cache.batch)
            iteration += 1
            tokens, logprobs = sample(logits, steps=steps, rows=row_ids)
            column = torch.where(done, max_new, steps)  # finished rows' draws go to the discarded column
            if turns is None:
                out_tokens[row_ids, column] = tokens
                out_logprobs[row_ids, column] = logprobs
                done = done | torch.isin(tokens, eos_ids) | (steps + 1 >= max_new)
                steps = steps + 1
            else:  # forced (appended) ids in place of draws; done rows' steps stay their lengths
                tokens, done, steps = turns.step(tokens, logprobs, row_ids, column, done, steps)
        cache.batch = cache.capacity
        return out_tokens[:, :max_new].cpu(), out_logprobs[:, :max_new].cpu(), slots_per_step, turns

    @staticmethod
    def _stop_at_strings(out_tokens, row_ids, done, steps, stop_strings, tokenizer) -> torch.Tensor:
        """``done`` with the live rows whose completion text so far (``steps`` tokens each) contains a stop
        string marked done."""
        live_rows = row_ids[~done].tolist()
        if not live_rows:
            return done
        counts = steps[~done].tolist()
        sampled = [ids[:count] for ids, count in zip(out_tokens[live_rows].tolist(), counts)]
        stopped = [row for row, ids in zip(live_rows, sampled)
                   if any(text in tokenizer.decode(ids) for text in stop_strings)]
        if not stopped:
            return done
        return done | torch.isin(row_ids, torch.tensor(stopped, device=row_ids.device))


def records_truncation(params: SamplingParams) -> bool:
    """Whether the engine records each draw's truncation threshold: sampling (not greedy) with top-k,
    top-p or min-p (the one-pass sampling kernel never runs then: it does not truncate)."""
    return params.top_k != 1 and truncates(params.top_k, params.top_p, params.min_p)


def fused_sampling_supported(params: SamplingParams) -> bool:
    """Whether kernels/sampling.py draws what ``sample_tokens`` does for ``params``: no filtering
    (top-k off or 1, top-p 1, min-p 0), at most MAX_EOS EOS ids."""
    return (params.top_k in (0, 1) and params.top_p >= 1.0 and params.min_p == 0.0
            and 1 <= len(params.eos_token_ids) <= MAX_EOS)


def _sample_one_pass(logits: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor, params: SamplingParams,
                     eos_ids: torch.Tensor, greedy: bool, seed: int, tickets: torch.Tensor,
                     torch_path) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_tokens`` as one kernel pass over fp32 ``logits`` (see fused_sampling_supported), each row
    at its own step: its draw keyed by (seed, its output row ``rows[b]``, its step ``steps[b]``), so it
    does not depend on where the row sits in the batch (slot refill, compaction). Other logits: the
    torch path."""
    if logits.dtype != torch.float32:
        return torch_path(logits, steps, rows)
    # Sampling runs outside the compiled decode step, so it can fall back at any call.
    return fallback.run(SAMPLING_KERNEL, logits.device,
                        lambda: sample_fused(logits.contiguous(), params.temperature, eos_ids, False, greedy, seed, 0,
                                             tickets, rows=rows, steps=steps, min_steps=params.min_completion_length),
                        lambda: torch_path(logits, steps, rows))


SAMPLING_KERNEL, ATTENTION_KERNEL = "sampling", "decode_attention"  # their names for grpo_fast.fallback


def _attention_kernel_works(config, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the decode attention kernel compiles and launches for this model's heads and dtype,
    decided once per process (``fallback.probe``) by two eager launches on a one-row cache before the
    decode step is compiled: inside a CUDA-graph capture a failure could not fall back, so the choice
    is made here (else the engine's sdpa paths attend). The launches cover the kernel's one-split and
    split-merging variants; a failure at another split count fails the compiled step, and the engine
    decodes eagerly (``_step_function``)."""
    shape = ModelShape.from_config(config)
    heads, kv_heads, head_dim = shape.heads, shape.kv_heads, shape.q_dim // shape.heads

    def launch():
        for prompt_length in (1, 256):  # one split; several (for blocks of 64 columns or fewer)
            def zeros(*size, kind=dtype):
                return torch.zeros(*size, device=device, dtype=kind)

            index = [zeros(1, kind=torch.int32) for _ in range(3)]
            fused_decode_attention(zeros(1, heads, head_dim), zeros(1, kv_heads, head_dim),
                                   zeros(1, kv_heads, head_dim), zeros(1, kv_heads, prompt_length, head_dim),
                                   zeros(1, kv_heads, prompt_length, head_dim), zeros(1, kv_heads, 2, head_dim),
                                   zeros(1, kv_heads, 2, head_dim), *index, zeros(kv_heads, kind=torch.int32),
                                   head_dim ** -0.5)

    return fallback.probe(ATTENTION_KERNEL, device, launch)


def _decode_step(decoder, head, transform: LogitTransform, cache: SlotCache, cache_keyword: str,
                 input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, V] of the next token (the model's, ``transform`` applied), the new token's
    KV written into ``cache``."""
    kwargs = {cache_keyword: cache,
              **({SLOT_CACHE_KEYWORD: cache} if cache.fused_attention or cache.split_attention else {})}
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=True, **kwargs).last_hidden_state
    return transform.apply(head(hidden[:, -1]))
