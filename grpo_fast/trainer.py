"""The GRPO training loop on one device.

Every step, for a batch of ``prompts_per_step`` prompts:

1. **rollout**: sample ``num_generations`` completions per prompt (``rollout_engine``: the
   ``engine.RolloutEngine`` on CUDA, ``rollout.hf_generate`` elsewhere, or any ``Generate``),
   stopping at EOS or ``max_completion_length``;
2. **rewards**: score each completion with the reward functions, weighted and summed;
3. **advantages**: ``(r - group mean) / (group std + 1e-4)`` per group of ``num_generations``;
4. **old / reference log-probs** under no_grad through the fused forward-only path
   (``token_logprobs``): the sampling policy's when ``num_iterations > 1`` (the ratio then moves
   off 1 and the clip bites), the reference's (adapter off) when ``beta > 0``;
5. **optimise**: ``num_iterations`` passes over the batch in micro-batches of
   ``micro_batch_size``, each pass accumulating gradients of ``grpo_loss`` (computed from the
   decoder's hidden states and the lm_head weight, never from logits) into one AdamW step with
   gradient clipping and a warm-up + cosine schedule (``dtype: float16``: with loss scaling).

Then log the step, show samples, evaluate on held-out prompts every ``eval_every`` steps (greedy
completions scored by the same reward functions, logged as ``eval/...`` in the step's record and
per example in ``eval.jsonl``), and checkpoint every ``save_every`` steps and at the end.

Before anything loads, every input is resolved (``grpo_fast.runs`` for the run directory, the
datasets, the reward functions, the model's source). A run stops early only in ways it can be
resumed from (``RunLoop``): SIGINT / SIGTERM save the last finished step (``grpo_fast.interrupts``);
a NaN / inf loss or gradient norm stops before that update, the last checkpoint intact
(``on_nonfinite: skip`` skips the update instead).

    from grpo_fast.trainer import train
    from grpo_fast.config import GRPOConfig
    result = train(GRPOConfig(max_steps=40))      # the embedded demo; result.run_dir holds the log

or ``grpo-fast train --config run.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint, rng_state, save_checkpoint
from .config import DEMO_DATASET, DEMO_REWARD_FUNCTIONS, LOSS_OPTIONS, GRPOConfig, uses_tools
from .data import (check_prompt_column, load_prompts, load_rows, prompt_indices, render_prompts, take_rows,
                   tokenize_prompts)
from .agent import AgentRollouts
from .errors import NonFiniteError, TrainingInterrupted
from .evaluation import generate_greedy
from .interrupts import InterruptGuard, StepAbandoned, UpdateCounter
from .logits import IDENTITY, LogitTransform, logit_transform
from .loss import (TOKEN_NORMALISED_LOSS_TYPES, GRPOLossConfig, compute_advantages, grpo_loss, sampler_correction,
                   token_logprobs)
from .memory import GIB, ModelShape, kv_budget_bytes, memory_budget, rollout_rows, size_to_budget
from .metrics import MetricsLogger, step_figures
from .model import (check_model_logits, check_model_source, completion_hidden_states, is_peft_model,
                    keep_nf4_layout_for_training, load_model, output_weight, reference_policy, trainable_parameters)
from .rollout import Generate, Rollout, SamplingParams, build_rollout, cut_at_stop_strings, hf_generate
from .runs import plan_run, start_run
from .scoring import RewardFunction, Scores, load_reward_functions, score


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]  # one record per step trained in this call
    model: Any
    tokenizer: Any


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(config: GRPOConfig, model) -> torch.optim.Optimizer:
    parameters = list(trainable_parameters(model).values())
    if not parameters:
        raise ValueError("model: expected trainable parameters, received a model with none")
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **kwargs)
    import bitsandbytes as bnb

    optimizer_class = bnb.optim.AdamW8bit if config.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return optimizer_class(parameters, **kwargs)


def build_grad_scaler(config: GRPOConfig, model, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for ``dtype: float16`` (fp16 activation gradients underflow without it); disabled,
    every call a no-op, for other dtypes. It unscales fp32 gradients only: the trainable weights must
    not be fp16 (peft keeps LoRA adapters of an fp16 model in fp32; full fine-tuning is refused by
    the config)."""
    enabled = config.dtype == "float16"
    if enabled:
        fp16 = [name for name, parameter in trainable_parameters(model).items() if parameter.dtype == torch.float16]
        if fp16:
            raise ValueError(f"model: expected fp32 trainable parameters with dtype float16 (loss scaling cannot "
                             f"unscale fp16 gradients), received {len(fp16)} in fp16 ({fp16[0]!r}, ...); train "
                             "LoRA adapters in fp32 or use dtype bfloat16 / float32")
    return torch.amp.GradScaler(device.type, enabled=enabled)


def build_scheduler(config: GRPOConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    total = config.max_steps * config.num_iterations
    warmup = math.ceil(config.warmup_ratio * total)
    if config.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def loss_config(config: GRPOConfig, num_items_in_batch: float | None,
                transform: LogitTransform = IDENTITY, entropy_coef: float | None = None) -> GRPOLossConfig:
    """The loss's options; ``transform``: the policy's logit transform (``grpo_fast.logits``);
    ``entropy_coef``: the bonus's coefficient for this call (default: the config's)."""
    options = {name: getattr(config, name) for name in LOSS_OPTIONS}
    if entropy_coef is not None:
        options["entropy_coef"] = entropy_coef
    if config.loss_type == "bnpo" and num_items_in_batch is not None:
        options["loss_type"] = "dapo"  # bnpo over the whole batch's tokens: dapo's normaliser (see optimise)
    return GRPOLossConfig(**options, max_completion_length=config.max_completion_length,
                          num_items_in_batch=num_items_in_batch, chunk_size=config.loss_chunk_size,
                          **transform.loss_keywords())


@dataclass
class EntropyControl:
    """The entropy bonus's coefficient: the config's, or with ``use_adaptive_entropy`` Skywork-OR1's
    control as TRL implements it: the bonus applies while the last step's mean token entropy is at or
    below ``entropy_target``, and the coefficient moves by ``entropy_coef_delta`` after each optimiser
    step (up while at or below the target, down above it), within [entropy_coef_min, entropy_coef_max]."""

    coef: float
    last_entropy: float = math.inf

    def applied(self, config: GRPOConfig) -> float:
        if config.use_adaptive_entropy:
            return self.coef if self.last_entropy <= config.entropy_target else 0.0
        return self.coef

    def update(self, entropy: float, config: GRPOConfig) -> None:
        if not config.use_adaptive_entropy:
            return
        if entropy <= config.entropy_target:
            self.coef = min(self.coef + config.entropy_coef_delta, config.entropy_coef_max)
        else:
            self.coef = max(self.coef - config.entropy_coef_delta, config.entropy_coef_min)
        self.last_entropy = entropy

    def state(self) -> dict[str, float]:
        return {"entropy_coef": self.coef, "last_entropy": self.last_entropy}


def samples_with_engine(config: GRPOConfig, device: torch.device) -> bool:
    """``rollout_engine: engine``, or ``auto`` on CUDA (where it pays) or with tools (only the engine runs
    them between turns); else Hugging Face generate."""
    return config.rollout_engine == "engine" or (config.rollout_engine == "auto"
                                                 and (device.type == "cuda" or uses_tools(config)))


def rollout_sampler(config: GRPOConfig, device: torch.device, tokenizer=None,
                    max_kv_bytes: float | None = None) -> Generate:
    """``rollout_engine``: the engine (auto: on CUDA, where it pays) or Hugging Face ``generate``;
    ``tokenizer`` matches stop strings; ``max_kv_bytes``: the engine's KV budget (it decodes in waves). The engine samples from global-RNG-drawn seeds, so resumed
    runs sample as uninterrupted ones."""
    if (config.importance_sampling_correction != "none" and config.rollout_engine == "auto"
            and not samples_with_engine(config, device)):
        raise ValueError("importance_sampling_correction: expected none when rollout_engine auto samples with "
                         f"Hugging Face generate (on {device.type}), received {config.importance_sampling_correction!r};"
                         " the correction uses the engine's sampled-token log-probs: set rollout_engine: engine")
    if samples_with_engine(config, device):
        from .engine import RolloutEngine  # imports transformers: only when sampling with it

        # rollout_memory free: no CUDA graphs, so the KV cache and the repacked NF4 weights are freed
        # after each rollout (the graphs would read them in place); keep / auto (as sized): graphs
        return RolloutEngine(tokenizer=tokenizer, max_kv_bytes=max_kv_bytes,
                             cuda_graphs=config.rollout_memory != "free")
    return functools.partial(hf_generate, tokenizer=tokenizer)


def sampling_params(config: GRPOConfig, tokenizer) -> SamplingParams:
    return SamplingParams(
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        min_p=config.min_p,
        stop_strings=tuple(config.stop_strings or ()),
    )


# --------------------------------------------------------------------------------------------
# One step, stage by stage
# --------------------------------------------------------------------------------------------


def wants_sampler_logprobs(config: GRPOConfig) -> bool:
    """The sampler's log-probs are used: the importance-sampling correction, the off-policy mask."""
    return config.importance_sampling_correction != "none" or config.off_policy_mask_threshold is not None


def generate_rollout(model, tokenizer, rows: list[dict], config: GRPOConfig, generate: Generate,
                     agent: AgentRollouts | None = None) -> Rollout:
    """The completions, with the sampler's log-probs of its tokens when the loss uses them and the
    sampler gives them (the engine's ``generate``); with ``agent``, multi-turn with tool calls."""
    params = sampling_params(config, tokenizer)
    if agent is not None:
        rollout, output = agent.rollout(model, tokenizer, rows, params, generate, prompt_column=config.prompt_column,
                                        mask_truncated=config.mask_truncated_completions)
        return with_sampler_records(rollout, output, config)
    prompt_ids = tokenize_prompts(render_prompts([row[config.prompt_column] for row in rows], tokenizer), tokenizer)
    if hasattr(generate, "generate"):  # the engine: its log-probs (and truncation thresholds) come free
        output = generate.generate(model, prompt_ids, params)
        completions = output.completion_ids
    elif config.importance_sampling_correction != "none":
        raise ValueError("importance_sampling_correction: expected a sampler that returns its log-probs (the "
                         f"rollout engine), received {type(generate).__name__}")
    else:
        output, completions = None, generate(model, prompt_ids, params)
    rollout = build_rollout(rows, config.prompt_column, prompt_ids, completions, tokenizer, params,
                            mask_truncated=config.mask_truncated_completions)
    return with_sampler_records(rollout, output, config)


def with_sampler_records(rollout: Rollout, output, config: GRPOConfig) -> Rollout:
    """``rollout`` with the sampler's log-probs of its tokens when the loss uses them (under top-k / top-p /
    min-p, the truncated distribution's: what the tokens were drawn from) and, with ``replay_truncation``,
    each token's truncation threshold; ``output``: the engine's ``EngineOutput`` (None: a sampler without)."""
    if output is None:
        return rollout
    truncated = output.logit_thresholds is not None
    sampled_logprobs = (output.kept_logprobs if truncated else output.logprobs) if wants_sampler_logprobs(config) else None
    thresholds = output.logit_thresholds if truncated and config.replay_truncation else None
    width = rollout.completion_ids.shape[1]
    if sampled_logprobs is not None:
        rollout.sampling_logps = torch.tensor([row + [0.0] * (width - len(row)) for row in sampled_logprobs],
                                              dtype=torch.float32).reshape(len(rollout), width)
    if thresholds is not None:
        rollout.logit_thresholds = torch.tensor([row + [-math.inf] * (width - len(row)) for row in thresholds],
                                                dtype=torch.float32).reshape(len(rollout), width)
    return rollout


def _thresholds(rollout: Rollout, rows: torch.Tensor, width: int, device: torch.device) -> dict:
    """The loss's ``logit_threshold`` keyword for these rows when truncated sampling is replayed."""
    if rollout.logit_thresholds is None:
        return {}
    return {"logit_threshold": rollout.logit_thresholds[rows, :width].to(device)}


def score_rollout(functions: Sequence[RewardFunction], config: GRPOConfig, rollout: Rollout) -> Scores:
    weights = config.reward_weights
    if weights is not None and len(functions) > len(weights):  # environments' get_reward follow, weight 1 (TRL)
        weights = list(weights) + [1.0] * (len(functions) - len(weights))
    return score(functions, weights, rollout.prompts, rollout.completions, rollout.completion_token_ids,
                 rollout.columns)


def micro_batch_rows(rollout: Rollout, config: GRPOConfig) -> list[torch.Tensor]:
    """The rows of each micro-batch: ``micro_batch_size`` consecutive rows, or with ``micro_batch_tokens``
    rows packed by their padded token count (prompt + completion): rows sorted by length, each
    micro-batch as many as fit (a longer row alone). Every loss type's update is the same either way
    (its normalisation does not depend on the grouping; bnpo uses the whole batch's tokens)."""
    count = len(rollout)
    if config.micro_batch_tokens is None:
        return [torch.arange(start, min(start + config.micro_batch_size, count))
                for start in range(0, count, config.micro_batch_size)]
    prompt_lengths = rollout.prompt_mask.sum(dim=1)
    lengths = prompt_lengths + rollout.completion_lengths
    order = sorted(range(count), key=lambda row: (int(lengths[row]), row))  # similar lengths pad little
    groups: list[list[int]] = []
    for row in order:
        if groups:
            group = groups[-1] + [row]
            width = int(prompt_lengths[group].max()) + int(rollout.completion_lengths[group].max())
            if len(group) * width <= config.micro_batch_tokens:
                groups[-1] = group
                continue
        groups.append([row])
    return [torch.tensor(group) for group in groups]


def _row_list(rows: torch.Tensor) -> str:
    """Row indices for a message: "4, 5, 9" (the first eight, then "...")."""
    shown = ", ".join(str(int(row)) for row in rows[:8])
    return shown + (", ..." if len(rows) > 8 else "")


def micro_batches(rollout: Rollout, config: GRPOConfig, device: torch.device):
    """The rollout's micro-batches (``micro_batch_rows``), each trimmed to its own prompt padding and
    completion length; yields (row indices, tensors on ``device``)."""
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    prompt_width = rollout.prompt_ids.shape[1]
    for rows in micro_batch_rows(rollout, config):
        used = rollout.prompt_mask[rows].any(dim=0).nonzero()  # prompt columns that are not all padding
        first = int(used.min()) if used.numel() else prompt_width - 1
        width = max(1, int(rollout.completion_lengths[rows].max()))
        columns = slice(min(first, prompt_width - 1), prompt_width + width)
        yield rows, {
            "input_ids": input_ids[rows, columns].to(device),
            "attention_mask": attention_mask[rows, columns].to(device),
            "prompt_length": prompt_width - columns.start,
            "completion_ids": rollout.completion_ids[rows, :width].to(device),
            "completion_mask": rollout.completion_mask[rows, :width].to(device),
        }


@torch.no_grad()
def batch_logprobs(model, rollout: Rollout, config: GRPOConfig, device: torch.device) -> torch.Tensor:
    """[B, C] per-token log-probs of ``model`` as it is now (fused forward-only pass, no logits)."""
    weight, bias = output_weight(model)
    logps = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32)
    was_training = model.training
    model.eval()  # no dropout in the sampling / reference policy
    try:
        for rows, batch in micro_batches(rollout, config, device):
            hidden = completion_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["prompt_length"])
            values = token_logprobs(hidden, weight.to(hidden.dtype), batch["completion_ids"], bias=bias,
                                    temperature=config.temperature, backend=config.loss_backend,
                                    completion_mask=batch["completion_mask"], chunk_size=config.loss_chunk_size,
                                    **_thresholds(rollout, rows, batch["completion_ids"].shape[1], device),
                                    **logit_transform(model).loss_keywords())
            logps[rows, : values.shape[1]] = values.float().cpu()
    finally:
        model.train(was_training)
    return logps


def reference_logprobs(model, reference_model, rollout: Rollout, config: GRPOConfig, device: torch.device) -> torch.Tensor:
    """The reference policy's log-probs, over the full vocabulary even when truncated sampling is replayed (the
    KL is the truncated policy's, which drew the tokens, to the reference; the policy's thresholds say nothing
    about the reference's logits)."""
    rollout = dataclasses.replace(rollout, logit_thresholds=None)
    if reference_model is None:  # LoRA: the same weights with the adapter off
        with reference_policy(model):
            return batch_logprobs(model, rollout, config, device)
    return batch_logprobs(reference_model, rollout, config, device)


def optimiser_step(optimizer, scheduler, scaler: torch.amp.GradScaler, parameters, max_grad_norm: float) -> float | None:
    """Clip, step and advance the schedule; returns the gradient norm, or None for a step the scaler
    skipped (fp16 gradients overflowed: the loss scale halves, and the schedule waits for an update).
    Without loss scaling a NaN / inf norm raises ``NonFiniteError`` before the weights change."""
    scaler.unscale_(optimizer)  # clipping and the logged norm see the real gradients
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    if not scaler.is_enabled() and not math.isfinite(norm):  # with loss scaling an overflow is the scaler's
        raise NonFiniteError(f"grad_norm is {norm}")
    scale = scaler.get_scale()
    scaler.step(optimizer)  # no update when a gradient is inf / nan
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scaler.get_scale() < scale:  # update() lowers the scale only after an overflow
        return None
    scheduler.step()
    return norm


def loss_scale_figures(scaler: torch.amp.GradScaler, skipped: int) -> dict[str, float]:
    """fp16 runs: the loss scale after the step and the optimiser steps it skipped; nothing otherwise."""
    if not scaler.is_enabled():
        return {}
    return {"grad_scale": scaler.get_scale(), "skipped_steps": skipped}


def saved_activations(config: GRPOConfig, device: torch.device):
    """Where autograd keeps what the forward saves: with ``activation_offload``, in (pinned) host memory
    until backward; with gradient checkpointing that is each block's input, the rest is recomputed."""
    if config.activation_offload:
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
    return contextlib.nullcontext()


def fit_to_memory(config: GRPOConfig, model, tokenizer, dataset, device: torch.device,
                  agent: AgentRollouts | None = None) -> tuple[GRPOConfig, float | None]:
    """Within the memory budget (``max_memory_gb``, or the CUDA memory this process may use): ``config``
    with micro-batches packed by tokens when the estimated step would not fit as configured, and the
    engine's KV budget in bytes (its rollout decodes in waves of the groups that fit; None: no budget).
    A clear error before the first step when nothing fits (``grpo_fast.memory``). The longest prompt
    of the dataset's first 4096 rows sizes it (the engine decodes one group at a time, with a warning,
    when a later prompt does not fit)."""
    budget = memory_budget(config, device)
    if budget is None:
        return config, None
    sample = take_rows(dataset, range(min(len(dataset), 4096)))  # the longest prompt sizes the budget
    if agent is not None:  # the prompts carry the tools' schemas
        prompt_length = agent.longest_prompt(sample, tokenizer, config.prompt_column)
    else:
        texts = render_prompts([row[config.prompt_column] for row in sample], tokenizer)
        prompt_length = max(len(ids) for ids in tokenize_prompts(texts, tokenizer))
    try:
        shape = ModelShape.from_config(model.config.get_text_config() if hasattr(model.config, "get_text_config")
                                       else model.config)
    except ValueError as error:
        if config.max_memory_gb is not None:
            raise
        warnings.warn(f"grpo-fast: not sizing the run to the free memory ({error})")
        return config, None
    sized = size_to_budget(config, shape, budget, prompt_length)
    if sized.rollout_memory != config.rollout_memory and samples_with_engine(sized, device):
        print(f"grpo-fast: the rollout's KV cache and repacked NF4 weights are freed for training after each "
              f"rollout (rollout_memory: free; decoding without CUDA graphs) to fit the memory budget of "
              f"{budget / GIB:.1f} GiB (estimated)", flush=True)
    if sized.micro_batch_tokens != config.micro_batch_tokens:
        print(f"grpo-fast: micro-batches of up to {sized.micro_batch_tokens} tokens fit the memory budget of "
              f"{budget / GIB:.1f} GiB (estimated)", flush=True)
    if not samples_with_engine(sized, device):  # Hugging Face generate decodes every row at once: no waves
        return sized, None
    wave = rollout_rows(sized, shape, budget, prompt_length)
    if wave < sized.generation_batch_size:
        print(f"grpo-fast: the rollout decodes {wave} of a step's {sized.generation_batch_size} completions at a "
              f"time within the memory budget of {budget / GIB:.1f} GiB (estimated)", flush=True)
    return sized, kv_budget_bytes(sized, shape, budget, prompt_length)


def sampler_inputs(rollout: Rollout, old_logps: torch.Tensor | None, config: GRPOConfig):
    """(importance-sampling ratio [B, C] or [B, 1] or None, the step's sampler figures)."""
    if config.importance_sampling_correction == "none" or rollout.sampling_logps is None:
        return None, {}
    mask = rollout.completion_mask.float()
    ratio = sampler_correction(old_logps, rollout.sampling_logps, mask, config.importance_sampling_correction,
                               config.importance_sampling_clip_min, config.importance_sampling_clip_max)
    gap = (old_logps - rollout.sampling_logps).abs()[mask.bool()]
    values = ratio.expand_as(mask)[mask.bool()] if ratio.shape[1] > 1 else ratio.flatten()
    figures = {}
    if values.numel():
        figures = {"sampling/importance_sampling_ratio/min": float(values.min()),
                   "sampling/importance_sampling_ratio/mean": float(values.mean()),
                   "sampling/importance_sampling_ratio/max": float(values.max()),
                   "sampling/sampling_logp_difference/mean": float(gap.mean()),
                   "sampling/sampling_logp_difference/max": float(gap.max())}
    return ratio, figures


def optimise(model, optimizer, scheduler, scaler: torch.amp.GradScaler, rollout: Rollout, advantages: torch.Tensor,
             old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None, config: GRPOConfig,
             device: torch.device, importance_sampling_ratio: torch.Tensor | None = None,
             entropy_control: EntropyControl | None = None) -> dict[str, float]:
    """``num_iterations`` optimiser steps on one rollout; returns the averaged loss figures. A NaN / inf
    loss or gradient norm raises ``NonFiniteError`` before the weights change (``on_nonfinite: stop``)
    or skips that optimiser step (``skip``: counted as ``nonfinite_skipped``)."""
    active_tokens = float(rollout.completion_mask.sum())
    if active_tokens == 0:  # every completion masked out (all truncated): nothing to learn from
        skipped = {"nonfinite_skipped": 0} if config.on_nonfinite == "skip" else {}
        return {"loss": 0.0, "grad_norm": 0.0, **loss_scale_figures(scaler, 0), **skipped}
    entropy_control = entropy_control or EntropyControl(config.entropy_coef)
    # dapo, cispo, vespo: normalised by the whole batch's tokens, so that micro-batches add up to TRL's
    # loss; so is bnpo (TRL's normalises each micro-batch by its own tokens, which makes the update
    # depend on how rows are grouped); the other types normalise per sequence or per call, so each
    # micro-batch is weighted by its share of rows.
    token_normalised = config.loss_type in TOKEN_NORMALISED_LOSS_TYPES or config.loss_type == "bnpo"
    transform = logit_transform(model)
    weight, bias = output_weight(model)
    parameters = list(trainable_parameters(model).values())
    model.train()
    sums: dict[str, float] = {}
    extremes: dict[str, float] = {}
    grad_norms = []
    nonfinite_skipped = 0
    sampling_logps = rollout.sampling_logps
    for iteration in range(config.num_iterations):
        coef = entropy_control.applied(config)
        entropy_sum = entropy_count = 0.0
        pass_sums: dict[str, float] = {}  # merged into sums only if the pass's update is taken
        pass_extremes: dict[str, float] = {}
        try:
            for rows, batch in micro_batches(rollout, config, device):
                tokens = float(batch["completion_mask"].sum())
                if tokens == 0:
                    continue
                width = batch["completion_ids"].shape[1]
                share = 1.0 if token_normalised else batch["completion_ids"].shape[0] / len(rollout)
                # the bonus is the mean entropy over the whole batch's tokens: this micro-batch's share
                settings = loss_config(config, active_tokens if token_normalised else None, transform,
                                       entropy_coef=coef * tokens / (active_tokens * share))
                with saved_activations(config, device):
                    hidden = completion_hidden_states(model, batch["input_ids"], batch["attention_mask"],
                                                      batch["prompt_length"])
                ratio = None if importance_sampling_ratio is None else importance_sampling_ratio[rows]
                out = grpo_loss(
                    hidden, weight.to(hidden.dtype),
                    batch["completion_ids"], batch["completion_mask"],
                    advantages=advantages[rows].to(device),
                    old_logps=None if old_logps is None else old_logps[rows, :width].to(device),
                    ref_logps=None if ref_logps is None else ref_logps[rows, :width].to(device),
                    bias=bias, config=settings, backend=config.loss_backend,
                    importance_sampling_ratio=None if ratio is None else ratio[:, :width].to(device),
                    sampling_logps=None if sampling_logps is None else sampling_logps[rows, :width].to(device),
                    **_thresholds(rollout, rows, width, device),
                )
                scaler.scale(out.loss * share).backward()
                loss_value = float(out.loss.detach())  # the host reads it after queuing the backward
                if not math.isfinite(loss_value):
                    raise NonFiniteError(f"loss is {loss_value} (completions {_row_list(rows)})")
                pass_sums["loss"] = pass_sums.get("loss", 0.0) + loss_value * share
                for name, value in out.metrics.items():
                    if name.endswith("_min") or name.endswith("_max"):
                        _keep_extreme(pass_extremes, name, float(value))
                    else:
                        pass_sums[name] = pass_sums.get(name, 0.0) + float(value) * tokens
                pass_sums["_tokens"] = pass_sums.get("_tokens", 0.0) + tokens
                entropy_sum += float(out.entropy.sum())
                entropy_count += tokens
            norm = optimiser_step(optimizer, scheduler, scaler, parameters, config.max_grad_norm)
        except NonFiniteError as error:
            optimizer.zero_grad(set_to_none=True)  # the weights are as the last update left them
            if config.on_nonfinite == "stop":
                raise NonFiniteError(f"{error} in optimisation pass {iteration + 1} of {config.num_iterations}") from None
            nonfinite_skipped += 1
            continue
        grad_norms.append(norm)
        for name, value in pass_sums.items():
            sums[name] = sums.get(name, 0.0) + value
        for name, value in pass_extremes.items():
            _keep_extreme(extremes, name, value)
        entropy_control.update(entropy_sum / max(entropy_count, 1.0), config)
    tokens = sums.pop("_tokens", 1.0)
    figures = {name: value / tokens for name, value in sums.items() if name != "loss"}
    figures.update(extremes)
    figures["loss"] = sums["loss"] / len(grad_norms) if grad_norms else math.nan
    taken = [norm for norm in grad_norms if norm is not None]  # a skipped step's norm is inf / nan
    figures["grad_norm"] = sum(taken) / len(taken) if taken else math.nan
    figures.update(loss_scale_figures(scaler, len(grad_norms) - len(taken)))
    if config.on_nonfinite == "skip":
        figures["nonfinite_skipped"] = nonfinite_skipped
    if config.entropy_coef != 0.0 or config.use_adaptive_entropy:
        figures["entropy_coef"] = entropy_control.coef
    return figures


def _keep_extreme(extremes: dict[str, float], name: str, value: float) -> None:
    """The smallest ``*_min`` / largest ``*_max`` metric over micro-batches and passes (NaN: none)."""
    if not math.isnan(value):
        pick = min if name.endswith("_min") else max
        extremes[name] = pick(extremes.get(name, value), value)


def train_step(model, reference_model, tokenizer, optimizer, scheduler, scaler, functions, rows: list[dict],
               config: GRPOConfig, generate: Generate, device: torch.device,
               entropy_control: EntropyControl | None = None,
               agent: AgentRollouts | None = None) -> tuple[dict[str, Any], Rollout, Scores]:
    """One generation batch: rollout -> rewards -> advantages -> old/ref log-probs -> optimise."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    rollout = generate_rollout(model, tokenizer, rows, config, generate, agent)
    generated = time.perf_counter()
    scores = score_rollout(functions, config, rollout)
    scored = time.perf_counter()
    advantages = compute_advantages(scores.total, config.num_generations, config.scale_rewards)
    # the sampler correction compares the sampler's log-probs with the policy's at sampling time
    need_old = config.num_iterations > 1 or config.importance_sampling_correction != "none"
    old_logps = batch_logprobs(model, rollout, config, device) if need_old else None
    ratio, sampler_figures = sampler_inputs(rollout, old_logps, config)
    ref_logps = reference_logprobs(model, reference_model, rollout, config, device) if config.beta > 0 else None
    figures = optimise(model, optimizer, scheduler, scaler, rollout, advantages, old_logps, ref_logps, config, device,
                       importance_sampling_ratio=ratio, entropy_control=entropy_control)
    figures.update(sampler_figures)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the optimiser step's queued kernels are this step's time
    finished = time.perf_counter()
    timings = {"generation": generated - started, "scoring": scored - generated, "training": finished - scored}
    record = step_figures(rollout, scores, figures, timings, lr=scheduler.get_last_lr()[0], device=device)
    return record, rollout, scores


# --------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------


def load_eval_rows(config: GRPOConfig, rows=None) -> list[dict[str, Any]]:
    """The first ``eval_limit`` of ``rows`` (default: ``eval_dataset`` loaded), checked to hold ``prompt_column``."""
    source = "eval_dataset argument"
    if rows is None:
        source = config.eval_dataset
        rows = load_rows(config.eval_dataset, config_name=config.eval_dataset_config or config.dataset_config,
                         split=config.eval_dataset_split, key="eval_dataset")
    if len(rows) == 0:
        raise ValueError("eval_dataset: expected at least one held-out row, received an empty dataset")
    check_prompt_column(rows, config.prompt_column, source, key="eval_dataset")
    count = len(rows) if config.eval_limit is None else min(config.eval_limit, len(rows))
    return take_rows(rows, range(count))


@torch.no_grad()
def evaluate_held_out(model, tokenizer, rows: list[dict[str, Any]], functions: Sequence[RewardFunction],
                      config: GRPOConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy completions of ``rows`` scored by the training rewards: (``eval/...`` figures, per-example records).

    Greedy decoding draws no random numbers, so evaluating never changes the run's sampling (a
    resumed run stays identical to an uninterrupted one)."""
    max_length = config.eval_max_completion_length or config.max_completion_length
    params = SamplingParams(num_generations=1, max_completion_length=max_length,
                            eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    texts = render_prompts([row[config.prompt_column] for row in rows], tokenizer)
    completions: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), config.eval_batch_size):
            completions += generate_greedy(model, tokenizer, texts[start:start + config.eval_batch_size], max_length)
    finally:
        model.train(was_training)
    if config.stop_strings:  # end where training rollouts end
        completions = [cut_at_stop_strings(ids, config.stop_strings, tokenizer) for ids in completions]
    rollout = build_rollout(rows, config.prompt_column, tokenize_prompts(texts, tokenizer), completions, tokenizer, params)
    scores = score_rollout(functions, config, rollout)
    figures = {"eval/reward/mean": float(scores.total.nanmean())}
    for name, values in scores.per_function.items():
        figures[f"eval/reward/{name}/mean"] = float(values.nanmean())
    figures["eval/completions/mean_length"] = float(rollout.completion_lengths.float().mean())
    figures["eval/completions/clipped_ratio"] = float(rollout.truncated.float().mean())
    examples = [
        {"prompt": rollout.prompts[index], "completion": rollout.completions[index],
         "reward": float(scores.total[index]),
         **{name: float(values[index]) for name, values in scores.per_function.items()}}
        for index in range(len(rollout))
    ]
    return figures, examples


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStart:
    """What a step changes besides the weights, as it was before the step: enough to save the step
    before it when the step is abandoned before its first update (``interrupts.UpdateCounter``)."""

    position: int
    rng: dict[str, Any]
    scaler: dict[str, Any]
    entropy_control: dict[str, float]

    @classmethod
    def capture(cls, position: int, scaler: torch.amp.GradScaler, entropy_control: EntropyControl) -> "StepStart":
        return cls(position, rng_state(), scaler.state_dict(), entropy_control.state())


@dataclass
class RunLoop:
    """One run's steps (rollout, update, log, evaluate, checkpoint on schedule) and the ways it stops
    early, each leaving the run resumable: an interrupt, a non-finite step."""

    config: GRPOConfig
    run_dir: Path
    model: Any
    reference_model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    entropy_control: EntropyControl
    functions: Sequence[RewardFunction]
    dataset: Any
    eval_rows: list[dict[str, Any]] | None
    generate: Generate
    device: torch.device
    logger: MetricsLogger
    position: int = 0  # prompts consumed
    agent: AgentRollouts | None = None  # tools / environments
    saved: int | None = None  # the last step with a checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)

    def step(self, step: int) -> None:
        config = self.config
        indices = prompt_indices(self.position, config.prompts_per_step, len(self.dataset), config.seed, config.shuffle)
        record, rollout, scores = train_step(self.model, self.reference_model, self.tokenizer, self.optimizer,
                                             self.scheduler, self.scaler, self.functions,
                                             take_rows(self.dataset, indices), config, self.generate, self.device,
                                             self.entropy_control, self.agent)
        self.position += config.prompts_per_step
        record = {"step": step, "data_position": self.position, **record}
        if self.eval_rows and config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
            started = time.perf_counter()
            figures, examples = evaluate_held_out(self.model, self.tokenizer, self.eval_rows, self.functions, config)
            record.update(figures)
            record["time/eval"] = time.perf_counter() - started
            self.logger.eval_examples(step, examples)
        self.history.append(record)
        self.logger.log(record)
        if config.sample_every and step % config.sample_every == 0:
            self.logger.samples(step, rollout, scores, config.num_samples)
        if step == config.max_steps or (config.save_every and step % config.save_every == 0):
            self.save(step)

    def save(self, step: int, start: StepStart | None = None) -> None:
        """The live state as ``step``'s checkpoint; with ``start``, the states a step began with (the
        weights and optimiser still the step before's)."""
        save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.scheduler, self.tokenizer,
                        scaler=self.scaler, data_position=start.position if start else self.position,
                        config=self.config, keep_last=self.config.save_total_limit,
                        extra_state={"entropy_control": start.entropy_control if start else self.entropy_control.state()},
                        rng=start.rng if start else None, scaler_state=start.scaler if start else None)
        self.saved = step

    def stopped(self, step: int, signal_number: int) -> TrainingInterrupted:
        """The first signal: ``step`` finished; it is saved (if its schedule did not)."""
        if self.saved != step:
            self.save(step)
        return TrainingInterrupted(run_dir=self.run_dir, step=step, signal_number=signal_number,
                                   what=f"step {step} finished")

    def abandoned(self, step: int, start: StepStart, signal_number: int, updated: bool) -> TrainingInterrupted:
        """The second signal, inside ``step``: the step before is saved if this one had not updated the
        weights yet (with the RNG and loss-scale states this one started from)."""
        if not updated and step > 1 and self.saved != step - 1:
            self.save(step - 1, start)
        return TrainingInterrupted(run_dir=self.run_dir, step=self.saved, signal_number=signal_number,
                                   what=f"step {step} abandoned")

    def non_finite(self, step: int, error: NonFiniteError) -> NonFiniteError:
        kept = f"the last checkpoint, step {self.saved}, is intact" if self.saved is not None else "no checkpoint was saved"
        return NonFiniteError(f"step {step}: {error}; stopped without saving step {step} ({kept}); set "
                              "on_nonfinite: skip to skip such optimiser steps instead")


def check_rewards_fit_the_data(config: GRPOConfig, dataset, *, rewards_given: bool,
                               dataset_given: bool = False) -> None:
    """The demo's reward scores only rows that carry the demo's ``letters`` column: another dataset with
    the default ``reward_functions`` would train on a meaningless reward, silently. Refused, naming the key."""
    if rewards_given or list(config.reward_functions) != DEMO_REWARD_FUNCTIONS:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        columns = list(dataset[0]) if len(dataset) else []
    if "letters" not in columns:
        source = "the dataset argument's rows" if dataset_given else f"dataset {config.dataset!r}"
        raise ValueError(f"reward_functions: expected the reward functions that score {source} "
                         "('module:function' paths, e.g. --reward_functions my_rewards:correct), received the "
                         f"default {DEMO_REWARD_FUNCTIONS}, which scores only rows with the built-in demo's "
                         f"'letters' column ({DEMO_DATASET})")


def train(
    config: GRPOConfig,
    *,
    model=None,
    tokenizer=None,
    dataset=None,
    reward_functions: Sequence[RewardFunction | str] | None = None,
    generate: Generate | None = None,
    eval_dataset=None,
) -> TrainResult:
    """Train with ``config``. ``model``/``tokenizer``, ``dataset`` and ``eval_dataset`` (rows with
    ``prompt_column``) and ``reward_functions`` (callables or import paths) override the config's
    when given.

    Every input is resolved before the model loads (run directory, datasets, reward functions, model
    source); errors are ``ValueError``s naming the key. During training a reward function that
    raises is a ``RewardFunctionError``, a NaN / inf loss or gradient norm a ``NonFiniteError``
    (``on_nonfinite: stop``), and SIGINT / SIGTERM a ``TrainingInterrupted`` after the last finished
    step was saved (``grpo_fast.interrupts``)."""
    if config.eval_every > 0 and config.eval_dataset is None and eval_dataset is None:
        raise ValueError("eval_dataset: expected held-out rows (config or argument) with eval_every > 0, received None")
    if (model is None) != (tokenizer is None):
        raise ValueError("model / tokenizer: expected both or neither, received only one")
    plan = plan_run(config)
    seed_everything(config.seed)
    dataset_given = dataset is not None
    if dataset is None:
        dataset = load_prompts(config)
    else:
        check_prompt_column(dataset, config.prompt_column, "dataset argument")
    check_rewards_fit_the_data(config, dataset, rewards_given=reward_functions is not None,
                               dataset_given=dataset_given)
    if len(dataset) < config.prompts_per_step:
        print(f"note: the dataset has {len(dataset)} prompts, fewer than prompts_per_step {config.prompts_per_step}: "
              "each step repeats prompts (set prompts_per_step to at most the number of prompts to avoid it)",
              flush=True)
    functions = load_reward_functions(reward_functions if reward_functions is not None else config.reward_functions)
    if reward_functions is not None and config.reward_weights is not None and len(config.reward_weights) != len(functions):
        raise ValueError(f"reward_weights: expected {len(functions)} weights, received {len(config.reward_weights)}")
    agent = AgentRollouts.from_config(config)
    if agent is not None:
        functions += agent.reward_functions()
        if not functions:
            raise ValueError("reward_functions: expected reward functions or an environment with get_reward(), "
                             "received neither")
    eval_rows = None
    if eval_dataset is not None or config.eval_every > 0:
        eval_rows = load_eval_rows(config, eval_dataset)
    if model is None:
        check_model_source(config)
        model, tokenizer = load_model(config)
    keep_nf4_layout_for_training(model)  # also for models passed in (see its docstring)
    # the loss's log-probs are the model's: its logit transform known (else refused) and checked once
    check_model_logits(model, logit_transform(model))
    device = next(model.parameters()).device
    config, kv_bytes = fit_to_memory(config, model, tokenizer, dataset, device, agent)  # before anything is sized
    if generate is None:
        generate = rollout_sampler(config, device, tokenizer, max_kv_bytes=kv_bytes)
    reference_model = None
    if config.beta > 0 and not is_peft_model(model):  # full fine-tuning: a frozen copy is the reference
        reference_model = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    scaler = build_grad_scaler(config, model, device)
    entropy_control = EntropyControl(config.entropy_coef)

    position = 0
    if plan.checkpoint is not None:
        state = load_checkpoint(plan.checkpoint, model, optimizer, scheduler, scaler=scaler)
        position = state["data_position"]
        if state.get("entropy_control"):  # the adaptive coefficient where the run left it
            entropy_control = EntropyControl(state["entropy_control"]["entropy_coef"],
                                             state["entropy_control"]["last_entropy"])
        print(f"resuming run {plan.run_dir} from step {plan.step} ({plan.checkpoint.name}); training steps "
              f"{plan.step + 1}-{config.max_steps}", flush=True)
    start_run(plan)
    loop = RunLoop(config, plan.run_dir, model, reference_model, tokenizer, optimizer, scheduler, scaler,
                   entropy_control, functions, dataset, eval_rows, generate, device,
                   MetricsLogger(plan.run_dir, config, start_step=plan.step), position,
                   saved=plan.step if plan.checkpoint is not None else None, agent=agent)
    try:
        with InterruptGuard() as interrupts, UpdateCounter(optimizer) as updates:
            for step in range(plan.step + 1, config.max_steps + 1):
                start = StepStart.capture(loop.position, scaler, loop.entropy_control)
                updates.reset()
                try:
                    loop.step(step)
                except StepAbandoned as abandoned:
                    raise loop.abandoned(step, start, abandoned.signal_number, updated=updates.count > 0) from None
                except NonFiniteError as error:
                    raise loop.non_finite(step, error) from None
                if interrupts.requested:
                    raise loop.stopped(step, interrupts.signal_number)
    finally:
        loop.logger.close()
    return TrainResult(run_dir=plan.run_dir, history=loop.history, model=model, tokenizer=tokenizer)
