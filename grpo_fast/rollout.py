"""Rollouts: ``num_generations`` sampled completions per prompt, as typed, padded tensors.

The sampler is any callable with the ``Generate`` signature; ``hf_generate`` (Hugging Face
``generate``) is the default and a faster engine can replace it::

    completions = generate(model, prompt_ids, SamplingParams(...))  # list of token-id lists

It returns ``len(prompt_ids) * num_generations`` completions, the ``num_generations`` of one
prompt contiguous, each ending with its EOS token (kept: the policy is trained to stop) or cut at
``max_completion_length`` (truncated). ``build_rollout`` pads them into a ``Rollout``: prompts
padded on the left, completions on the right, so every row's completion starts at the same
column ``P`` and position ``P - 1`` predicts its first token.
"""

from __future__ import annotations

import concurrent.futures  # noqa: F401 - named in TurnHandler's annotation
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    num_generations: int  # completions per prompt
    max_completion_length: int  # new tokens at most
    eos_token_ids: tuple[int, ...]  # sampling stops after any of these
    pad_token_id: int  # fills prompts on the left and finished completions on the right
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off
    min_completion_length: int = 0  # EOS is suppressed before this many tokens (benchmarks force lengths)
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0.0: off
    stop_strings: tuple[str, ...] = ()  # completions end after the token that completes one of these (needs a tokenizer)


def check_sampling_params(params: SamplingParams) -> None:
    """Range checks shared by every sampler; each error names the field, the expected and the received value."""
    checks = [
        ("num_generations", params.num_generations >= 1, "an integer >= 1"),
        ("max_completion_length", params.max_completion_length >= 1, "an integer >= 1"),
        ("temperature", params.temperature > 0, "a positive number"),
        ("top_p", 0.0 < params.top_p <= 1.0, "a value in (0, 1]"),
        ("top_k", params.top_k >= 0, "an integer >= 0 (0 disables)"),
        ("min_p", 0.0 <= params.min_p <= 1.0, "a value in [0, 1] (0 disables)"),
        ("min_completion_length", 0 <= params.min_completion_length <= params.max_completion_length,
         f"an integer in [0, max_completion_length={params.max_completion_length}]"),
        ("eos_token_ids", len(params.eos_token_ids) > 0, "at least one token id"),
        ("stop_strings", all(isinstance(text, str) and text for text in params.stop_strings),
         "a tuple of non-empty strings"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{name}: expected {expected}, received {getattr(params, name)!r}")


class Generate(Protocol):
    def __call__(self, model, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]: ...


class TurnHandler(Protocol):
    """Multi-turn rollouts (``RolloutEngine.generate(..., turns=...)``): what happens when a row ends a turn."""

    def turn_ended(self, row: int, completion_ids: list[int]) -> "concurrent.futures.Future[list[int]] | None":
        """Called on the host (at a sync point) when output row ``row`` (prompt row // group, in the
        engine's output order) has sampled an EOS token that ends a turn. ``completion_ids``: the row's
        whole completion so far (model and appended tokens), ending with that EOS. None: the row is
        finished. Else a future whose result is the token ids to append (tool turn(s) + next assistant
        header) before the row samples again; the engine does not block on it while other rows decode.
        An empty result finishes the row where it is (TRL drops a tool result that does not fit). Not called for an EOS that is the row's ``max_completion_length``-th token (no room is left for
        a tool turn: the row is finished) nor for a turn whose text met a stop string."""
        ...


@dataclass
class Rollout:
    """One generation batch: B = prompts x group_size rows, a group's rows contiguous."""

    prompt_ids: torch.Tensor  # [B, P] int64, left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 on prompt tokens
    completion_ids: torch.Tensor  # [B, C] int64, right-padded
    completion_mask: torch.Tensor  # [B, C] 1 on tokens the loss counts (truncated rows zeroed when masked)
    completion_lengths: torch.Tensor  # [B] tokens generated (EOS included)
    truncated: torch.Tensor  # [B] bool: hit max_completion_length without EOS or a stop string
    prompts: list[Any]  # [B] the dataset's prompt (string or chat messages), repeated per completion
    completions: list[Any]  # [B] completion text (as chat messages when the prompt is chat messages)
    completion_token_ids: list[list[int]]  # [B] unpadded completion ids
    columns: dict[str, list]  # the dataset's other columns, repeated per completion
    group_size: int
    sampling_logps: torch.Tensor | None = None  # [B, C] the sampler's log-probs of its tokens (the engine's), 0 padding
    tool_mask: torch.Tensor | None = None  # [B, C] with tools: 1 on tokens the model sampled, 0 on appended tool results (completion_mask already holds it)
    tool_figures: dict[str, float] = field(default_factory=dict)  # with tools: tools/call_frequency, tools/failure_frequency
    # [B, C] with truncated sampling replayed (replay_truncation): each token's truncation threshold on the
    # temperature-scaled logits (the loss's logit_threshold), -inf padding; None: log-probs over the full vocabulary
    logit_thresholds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """Every real token, truncated completions included (masking them only removes them from the loss)."""
        positions = torch.arange(self.completion_ids.shape[1], device=self.completion_ids.device)
        present = positions[None, :] < self.completion_lengths[:, None]
        return torch.cat([self.prompt_mask, present.to(self.prompt_mask.dtype)], dim=1)


def pad(sequences: Sequence[Sequence[int]], pad_value: int, *, left: bool, min_length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, L], mask [N, L]) with ``sequences`` padded on the left or the right."""
    length = max(min_length, max((len(sequence) for sequence in sequences), default=0))
    ids = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if not sequence:
            continue
        span = slice(length - len(sequence), length) if left else slice(0, len(sequence))
        ids[row, span] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def cut_at_eos(tokens: Sequence[int], eos_token_ids: Sequence[int], max_length: int) -> list[int]:
    """Tokens up to and including the first EOS, at most ``max_length``."""
    tokens = list(tokens)[:max_length]
    for index, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: index + 1]
    return tokens


def cut_at_stop_strings(tokens: Sequence[int], stop_strings: Sequence[str], tokenizer) -> list[int]:
    """The shortest prefix of ``tokens`` whose decoded text contains one of ``stop_strings`` (the
    whole list when none occurs). Only the completion's own text is searched, never the prompt."""
    tokens = list(tokens)
    contains = lambda count: any(text in tokenizer.decode(tokens[:count]) for text in stop_strings)  # noqa: E731
    if not stop_strings or not contains(len(tokens)):
        return tokens
    low, high = 1, len(tokens)  # containment only grows with the prefix: binary search for the first
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if contains(middle) else (middle + 1, high)
    return tokens[:low]


def stop_strings_tokenizer(params: SamplingParams, tokenizer):
    if params.stop_strings and tokenizer is None:
        raise ValueError(f"tokenizer: expected a tokenizer to match stop_strings={params.stop_strings!r}, received None")
    return tokenizer


class CompletionStopStrings:
    """A ``generate`` stopping criterion: a row stops once its completion's text (never the prompt's:
    transformers' own stop_strings also match across the prompt's end) contains a stop string.
    Only the newest tokens are decoded: a string completed by this step's token ends in them."""

    def __init__(self, stop_strings: Sequence[str], tokenizer, prompt_width: int):
        self.stop_strings, self.tokenizer, self.prompt_width = tuple(stop_strings), tokenizer, prompt_width
        self.tail = 4 * max(len(text) for text in self.stop_strings) + 8  # tokens: > 1/4 character each

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        rows = input_ids[:, self.prompt_width:][:, -self.tail:].tolist()
        stopped = [any(text in self.tokenizer.decode(row) for text in self.stop_strings) for row in rows]
        return torch.tensor(stopped, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def hf_generate(model, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, tokenizer=None) -> list[list[int]]:
    """Sample with ``model.generate`` (KV cache, left-padded prompts); the model is put in eval mode meanwhile.
    ``tokenizer`` is needed only with ``params.stop_strings``."""
    check_sampling_params(params)
    stop_strings_tokenizer(params, tokenizer)
    device = next(model.parameters()).device
    ids, mask = pad(prompt_ids, params.pad_token_id, left=True)
    ids = ids.repeat_interleave(params.num_generations, dim=0).to(device)
    mask = mask.repeat_interleave(params.num_generations, dim=0).to(device)
    # generate() takes every setting not passed here from the model's own generation config (a hub
    # model's repetition_penalty, no_repeat_ngram_size, min_p, ...), which would sample from another
    # distribution than the one the loss scores: sample under a neutral config instead.
    from transformers import GenerationConfig, StoppingCriteriaList

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved_config = inner.generation_config
    inner.generation_config = GenerationConfig(
        pad_token_id=params.pad_token_id, eos_token_id=list(params.eos_token_ids),
        bos_token_id=getattr(saved_config, "bos_token_id", None),
    )
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p or None,
            stopping_criteria=StoppingCriteriaList(
                [CompletionStopStrings(params.stop_strings, tokenizer, ids.shape[1])] if params.stop_strings else []),
            max_new_tokens=params.max_completion_length,
            min_new_tokens=params.min_completion_length,
            eos_token_id=list(params.eos_token_ids),
            pad_token_id=params.pad_token_id,
            use_cache=True,
        )
    finally:
        model.train(was_training)
        inner.generation_config = saved_config
    generated = output[:, ids.shape[1]:].tolist()
    completions = [cut_at_eos(row, params.eos_token_ids, params.max_completion_length) for row in generated]
    # generate() pads a row that met a stop string; the same cut as the engine's drops the padding.
    return [cut_at_stop_strings(row, params.stop_strings, tokenizer) for row in completions] if params.stop_strings else completions


def build_rollout(
    rows: Sequence[dict[str, Any]],
    prompt_column: str,
    prompt_ids: Sequence[Sequence[int]],
    completion_token_ids: Sequence[Sequence[int]],
    tokenizer,
    params: SamplingParams,
    *,
    mask_truncated: bool = False,
) -> Rollout:
    """Pad and label one batch; ``completion_token_ids`` holds ``num_generations`` rows per prompt."""
    group_size = params.num_generations
    if len(completion_token_ids) != len(rows) * group_size:
        raise ValueError(
            f"completion_token_ids: expected {len(rows)} prompts x {group_size} generations = "
            f"{len(rows) * group_size} completions, received {len(completion_token_ids)}"
        )
    repeated_ids = [ids for ids in prompt_ids for _ in range(group_size)]
    prompt_tensor, prompt_mask = pad(repeated_ids, params.pad_token_id, left=True)
    completion_tensor, present = pad(completion_token_ids, params.pad_token_id, left=False)
    lengths = present.sum(dim=1)
    texts = tokenizer.batch_decode([list(ids) for ids in completion_token_ids], skip_special_tokens=True)
    # Truncated: cut by max_completion_length, with neither EOS nor a stop string (samplers cut a
    # completion right after its first stop string, so containing one means it ended there).
    truncated = torch.tensor(
        [len(ids) >= params.max_completion_length and (not ids or ids[-1] not in params.eos_token_ids)
         and not (params.stop_strings and any(stop in tokenizer.decode(list(ids)) for stop in params.stop_strings))
         for ids in completion_token_ids], dtype=torch.bool
    )
    completion_mask = present.clone()
    if mask_truncated:
        completion_mask[truncated] = 0
    prompts = [row[prompt_column] for row in rows for _ in range(group_size)]
    completions = [
        [{"role": "assistant", "content": text}] if not isinstance(prompt, str) else text
        for prompt, text in zip(prompts, texts)
    ]
    columns = {
        name: [row[name] for row in rows for _ in range(group_size)] for name in rows[0] if name != prompt_column
    }
    return Rollout(
        prompt_ids=prompt_tensor,
        prompt_mask=prompt_mask,
        completion_ids=completion_tensor,
        completion_mask=completion_mask,
        completion_lengths=lengths,
        truncated=truncated,
        prompts=prompts,
        completions=completions,
        completion_token_ids=[list(ids) for ids in completion_token_ids],
        columns=columns,
        group_size=group_size,
    )
