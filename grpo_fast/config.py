"""GRPOConfig: every setting of a training run, from defaults, a YAML file and ``--key value`` overrides.

The defaults are the embedded demo (a tiny model built in code learning the built-in ``letters``
task on CPU in about a minute); a real run sets ``model``, ``dataset``, ``reward_functions`` and
the optimiser in a YAML file (see ``examples/qwen2.5_7b_qlora.yaml``)::

    config = load_config("run.yaml", overrides=["--learning_rate", "5e-6", "--max_steps=200"])

Every key's type and range, and the rules across keys, are checked when a ``GRPOConfig`` is built,
before anything is loaded or written: unknown keys, values of the wrong type, NaN or infinite
floats and out-of-range values are ``ValueError``s naming the key, the expected and the received
value (a YAML syntax error names the file, line and column).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
SCHEDULERS = ("cosine", "constant")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ROLLOUT_ENGINES = ("auto", "engine", "hf")
ROLLOUT_MEMORY = ("auto", "keep", "free")
NONFINITE_ACTIONS = ("stop", "skip")
SEED_LIMIT = 2**32  # NumPy's seeds are 32-bit
# The embedded demo: its dataset and the reward that scores only that dataset
DEMO_DATASET = "grpo_fast.tasks:letters_dataset"
DEMO_REWARD_FUNCTIONS = ["grpo_fast.tasks:letters_reward"]


@dataclass
class GRPOConfig:
    # ---- run ----------------------------------------------------------------------------------
    output_dir: str = "runs"  # parent folder of run directories
    run_name: str | None = None  # run directory name under output_dir (a folder name); None: "grpo-<UTC time>" (with resume: the run written to last)
    seed: int = 0  # seeds Python, NumPy and torch (sampling, data order, LoRA init); 0 <= seed < 2**32
    max_steps: int = 80  # generation batches to train on (each gives num_iterations optimiser steps)
    resume: bool = False  # continue from the run directory's latest complete checkpoint
    overwrite: bool = False  # start a new run in a run directory that holds one, deleting its logs and checkpoints

    # ---- model --------------------------------------------------------------------------------
    model: str = "tiny"  # Hugging Face hub id or local folder; "tiny": a small model + char tokenizer built in code
    dtype: str = "auto"  # weights dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 (T4 / V100: fp16 compute, loss scaling, LoRA required) | float32
    load_in_4bit: bool = False  # NF4 base weights with double quantisation (bitsandbytes), fp16 compute with dtype float16, else bf16; implies LoRA
    nf4_single_copy: bool = True  # with load_in_4bit: each NF4 Linear's weight held once, in the decode kernel's repacked layout, for training, the reference and decoding (bitsandbytes' tensors released; grpo_fast.nf4_train.restore_bitsandbytes converts back to merge or export); false: bitsandbytes' modules, and on a GPU the rollout engine keeps a second, repacked copy
    use_lora: bool | None = None  # train LoRA adapters instead of all weights; None: True with load_in_4bit, else False
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = lora_alpha / lora_r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_target_modules: list[str] | None = None  # module names to adapt; None: every Linear in the decoder blocks
    gradient_checkpointing: bool = False  # recompute block activations in the backward (less memory, ~30% slower)
    attn_implementation: str = "auto"  # auto: flash_attention_2 when flash_attn is importable, else sdpa; or any HF value
    trust_remote_code: bool = False  # passed to from_pretrained for models with custom code

    # ---- data ---------------------------------------------------------------------------------
    dataset: str = DEMO_DATASET  # hub id, local .jsonl/.json/.parquet file, or "module:function" returning rows
    dataset_config: str | None = None  # hub dataset configuration name (e.g. "main" for openai/gsm8k)
    dataset_split: str = "train"  # split to read
    prompt_column: str = "prompt"  # column holding a prompt string or a list of chat messages
    shuffle: bool = True  # reshuffle prompt order each epoch (seeded)

    # ---- rollouts -----------------------------------------------------------------------------
    prompts_per_step: int = 8  # distinct prompts per generation batch
    num_generations: int = 8  # completions sampled per prompt (the group size)
    max_completion_length: int = 12  # new tokens per completion at most; longer ones are truncated
    temperature: float = 1.0  # sampling temperature (the loss uses the same one)
    top_p: float = 1.0  # nucleus sampling mass; 1.0 disables
    top_k: int = 0  # sample among the k most likely tokens; 0 disables
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability; 0 disables
    replay_truncation: bool = True  # with top_k / top_p / min_p and the engine: the policy's, old and sampler log-probs of the loss are over the tokens the sampler kept (the engine's per-token threshold), so the sampler ratio is 1 where the weights did not move (the reference's stay full: the KL is the truncated policy's to the reference); false: over the full vocabulary, against the sampler's truncated log-probs
    stop_strings: list[str] | None = None  # a completion ends after the first of these in its text (kept, like EOS)
    mask_truncated_completions: bool = False  # leave completions that hit max_completion_length out of the loss
    rollout_engine: str = "auto"  # sampler: auto (grpo_fast.engine on CUDA, Hugging Face generate elsewhere) | engine | hf
    rollout_memory: str = "auto"  # the engine's KV cache and repacked NF4 weights on a GPU: keep (allocated between steps for its CUDA graphs: fastest) | free (released after each rollout for training, decoding without CUDA graphs) | auto (keep unless the step fits max_memory_gb only when they are freed)

    # ---- rewards ------------------------------------------------------------------------------
    reward_functions: list[str] = field(default_factory=lambda: list(DEMO_REWARD_FUNCTIONS))  # "module:function" paths; the default scores only the demo dataset
    reward_weights: list[float] | None = None  # one weight per reward function; None: all 1.0

    # ---- tools and environments ------------------------------------------------------------------
    tools: list[str] | None = None  # "module:function" tools the model may call (TRL's tools: name, type hints and docstring are the schema); multi-turn rollouts through the engine, tool results masked out of the loss
    environment: str | dict[str, str] | None = None  # "module:Class" built once per rollout (TRL's environment_factory): reset(**row) starts it (a returned string is appended to the last message), its public methods are tools, get_reward() a reward named after the class; or a mapping name -> "module:Class" picked by each row's environment column
    max_tool_calling_iterations: int | None = None  # tool-calling turns per completion at most (TRL's meaning); null: no limit
    tool_timeout: float | None = 60.0  # seconds a tool call may run before the model receives a timeout error (the call's thread is abandoned); null: no limit

    # ---- loss ---------------------------------------------------------------------------------
    loss_type: str = "dapo"  # dapo | grpo | bnpo | dr_grpo | luspo | cispo | sapo | vespo (TRL's meanings)
    beta: float = 0.0  # KL coefficient against the reference policy (the base model with the adapter off)
    epsilon_low: float = 0.2  # lower clip of the importance ratio: 1 - epsilon_low
    epsilon_high: float | None = 0.28  # upper clip: 1 + epsilon_high; None: epsilon_low; cispo: the cap on the ratio (5.0 in the paper)
    delta: float | None = None  # two-sided clip of the unclipped ratio (None: off)
    kl_bias_correction: bool = False  # multiply the KL by the importance ratio (TRL's use_bias_correction_kl, True by default there)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    sapo_temperature_pos: float = 1.0  # sapo: the soft gate's temperature for positive advantages
    sapo_temperature_neg: float = 1.05  # sapo: ... for the others
    vespo_k_pos: float = 2.0  # vespo: phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio w, for A >= 0
    vespo_lambda_pos: float = 3.0  # vespo: lambda for A >= 0
    vespo_k_neg: float = 3.0  # vespo: k for A < 0
    vespo_lambda_neg: float = 2.0  # vespo: lambda for A < 0
    entropy_coef: float = 0.0  # entropy bonus: the loss minus entropy_coef x the mean token entropy (initial value with use_adaptive_entropy)
    use_adaptive_entropy: bool = False  # Skywork-OR1's control: the bonus applies while the step's entropy <= entropy_target; entropy_coef moves by entropy_coef_delta each optimiser step
    entropy_coef_min: float = 0.0  # adaptive control: lower bound of entropy_coef
    entropy_coef_max: float = 1.0  # adaptive control: upper bound of entropy_coef
    entropy_coef_delta: float = 0.005  # adaptive control: the step of entropy_coef
    entropy_target: float = 0.2  # adaptive control: target mean token entropy (nats)
    top_entropy_quantile: float = 1.0  # < 1: the policy term only on the tokens at or above this entropy quantile (0.2 in "Beyond the 80/20 rule")
    off_policy_mask_threshold: float | None = None  # drop negative-advantage completions whose mean KL to the sampler exceeds this (DeepSeek-V3.2); None: off
    importance_sampling_correction: str = "none"  # correct the loss for the sampler's mismatch with the training forward, from the engine's sampled-token log-probs: none | token_truncate | token_mask | sequence_truncate | sequence_mask (needs the engine)
    importance_sampling_clip_min: float | None = None  # the correction's lower bound (truncate: clip; mask: drop below)
    importance_sampling_clip_max: float | None = 3.0  # the correction's upper bound (truncate: clip; mask: drop above)
    scale_rewards: str = "group"  # advantage scaling: group | batch | none
    num_iterations: int = 2  # optimisation passes over each generation batch (>1 computes old log-probs)
    micro_batch_size: int = 16  # completions per forward/backward; gradients accumulate over the batch
    micro_batch_tokens: int | None = None  # pack micro-batches by tokens (prompt + completion, padded) up to this many instead of micro_batch_size rows: a long completion trains alone, short ones together; None: rows (or sized to max_memory_gb)
    max_memory_gb: float | None = None  # the device memory the run may use: the rollout's waves and the micro-batches (and the check before the first step) size themselves to it; None: on CUDA the model's memory plus the free memory less 10%, no limit on CPU
    activation_offload: bool = False  # with gradient_checkpointing: keep the saved block inputs in pinned CPU memory until backward (very long sequences)
    loss_backend: str = "auto"  # fused-loss backend: auto | triton | torch | reference
    loss_chunk_size: int | None = None  # tokens per loss chunk (None: the loss's default memory budget)

    # ---- optimiser ----------------------------------------------------------------------------
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes)
    learning_rate: float = 3e-3  # peak learning rate (the demo's; use ~1e-5 full / 1e-5..5e-5 LoRA for real models)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.99  # AdamW beta2
    warmup_ratio: float = 0.05  # fraction of optimiser steps with a linear warm-up from 0
    lr_scheduler: str = "cosine"  # cosine (to 0 at the last step) | constant (after warm-up)
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables clipping (the norm is still logged)
    on_nonfinite: str = "stop"  # a NaN / inf loss or gradient norm: stop (the last checkpoint kept) | skip (that optimiser step, counted in the log)

    # ---- held-out evaluation -----------------------------------------------------------------
    eval_every: int = 0  # greedy-decode the held-out rows and score them with the reward functions every N steps (and at the end); 0: never
    eval_dataset: str | None = None  # held-out rows, in the forms `dataset` takes; needed with eval_every > 0 (or train(eval_dataset=...))
    eval_dataset_split: str = "test"  # split of eval_dataset (hub ids and local files)
    eval_dataset_config: str | None = None  # hub configuration name of eval_dataset; None: dataset_config
    eval_limit: int | None = 128  # evaluate the first N rows of the split; None: all
    eval_batch_size: int = 32  # prompts per greedy generate call
    eval_max_completion_length: int | None = None  # new tokens per eval completion; None: max_completion_length

    # ---- logging and checkpoints --------------------------------------------------------------
    sample_every: int = 10  # write sample completions with their rewards every N steps (0: never)
    num_samples: int = 3  # completions shown per sample
    tensorboard: bool = False  # also log to TensorBoard under <run>/tensorboard
    progress_bar: bool = True  # tqdm bar with the step's key figures
    plot: bool = True  # write reward_length.png at the end
    save_every: int = 20  # checkpoint every N steps (and always at the end); 0: only at the end
    save_total_limit: int = 2  # keep the last K checkpoints

    @property
    def generation_batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: expected one of {list(choices)}, received {value!r}")


def _positive(config: GRPOConfig, *keys: str) -> None:
    for key in keys:
        if getattr(config, key) <= 0:
            raise ValueError(f"{key}: expected a positive number, received {getattr(config, key)!r}")


def _at_least_zero(config: GRPOConfig, *keys: str, why: str = "") -> None:
    for key in keys:
        if getattr(config, key) < 0:
            raise ValueError(f"{key}: expected >= 0{why}, received {getattr(config, key)!r}")


def _fraction(config: GRPOConfig, *keys: str) -> None:
    """Values in [0, 1): probabilities and decay rates."""
    for key in keys:
        if not 0.0 <= getattr(config, key) < 1.0:
            raise ValueError(f"{key}: expected a value in [0, 1), received {getattr(config, key)!r}")


def check_run_name(run_name: str | None) -> None:
    """One folder name: a run directory stays inside output_dir."""
    if run_name is None:
        return
    # a leading "." refuses ".." too
    if run_name.startswith(".") or any(character in run_name for character in "/\\\0"):
        raise ValueError(f"run_name: expected a folder name (no '/', '\\' or leading '.': the run directory is "
                         f"output_dir/run_name), received {run_name!r}")


def validate(config: GRPOConfig) -> None:
    """Type, range and choice checks of every key and the rules across keys; each error names the
    key, the expected and the received value."""
    for item in dataclasses.fields(config):
        _check_type(item.name, getattr(config, item.name), _field_types()[item.name])
    _choice("loss_type", config.loss_type, LOSS_TYPES)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("lr_scheduler", config.lr_scheduler, SCHEDULERS)
    _choice("dtype", config.dtype, DTYPES)
    _choice("importance_sampling_level", config.importance_sampling_level, ("token", "sequence"))
    _choice("scale_rewards", config.scale_rewards, ("group", "batch", "none"))
    _choice("loss_backend", config.loss_backend, ("auto", "triton", "torch", "reference"))
    _choice("rollout_engine", config.rollout_engine, ROLLOUT_ENGINES)
    _choice("rollout_memory", config.rollout_memory, ROLLOUT_MEMORY)
    _choice("importance_sampling_correction", config.importance_sampling_correction, SAMPLER_CORRECTIONS)
    _choice("on_nonfinite", config.on_nonfinite, NONFINITE_ACTIONS)
    check_run_name(config.run_name)
    if config.resume and config.overwrite:
        raise ValueError("overwrite: expected false with resume (resume continues the run that overwrite would "
                         "delete), received true")
    if not 0 <= config.seed < SEED_LIMIT:
        raise ValueError(f"seed: expected an integer in [0, 2**32), received {config.seed}")
    for key in ("micro_batch_tokens", "max_memory_gb"):
        value = getattr(config, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{key}: expected a positive number or null, received {value!r}")
    if config.activation_offload and not config.gradient_checkpointing:
        raise ValueError("activation_offload: expected gradient_checkpointing: true with it (it offloads the "
                         "checkpointed blocks' saved inputs), received gradient_checkpointing: false")
    _positive(config, "max_steps", "prompts_per_step", "max_completion_length", "temperature",
              "num_iterations", "micro_batch_size", "lora_r", "lora_alpha", "save_total_limit", "learning_rate",
              "num_samples", "eval_batch_size")
    _at_least_zero(config, "save_every", "sample_every", "eval_every", why=" (0: never)")
    _at_least_zero(config, "max_grad_norm", why=" (0: no clipping)")
    _at_least_zero(config, "weight_decay")
    _fraction(config, "lora_dropout", "adam_beta1", "adam_beta2")
    if config.lora_target_modules is not None and not config.lora_target_modules:
        raise ValueError("lora_target_modules: expected module names or null (every Linear of the blocks), "
                         "received []")
    if config.num_generations < 2:
        raise ValueError(f"num_generations: expected at least 2 (advantages compare completions of a group), "
                         f"received {config.num_generations}")
    if not 0.0 < config.top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], received {config.top_p}")
    if not 0.0 <= config.min_p <= 1.0:
        raise ValueError(f"min_p: expected a value in [0, 1] (0 disables), received {config.min_p}")
    if config.top_k < 0:
        raise ValueError(f"top_k: expected >= 0 (0 disables), received {config.top_k}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio: expected a value in [0, 1), received {config.warmup_ratio}")
    if config.beta < 0:
        raise ValueError(f"beta: expected >= 0, received {config.beta}")
    if not config.reward_functions and config.environment is None:
        raise ValueError("reward_functions: expected at least one 'module:function' path (or an environment with "
                         "get_reward), received []")
    _check_tool_keys(config)
    if config.reward_weights is not None and len(config.reward_weights) != len(config.reward_functions):
        raise ValueError(
            f"reward_weights: expected one weight per reward function ({len(config.reward_functions)}), "
            f"received {len(config.reward_weights)}"
        )
    for key in ("eval_limit", "eval_max_completion_length", "loss_chunk_size"):
        if getattr(config, key) is not None and getattr(config, key) <= 0:
            raise ValueError(f"{key}: expected a positive number or null, received {getattr(config, key)}")
    if config.load_in_4bit and config.use_lora is False:
        raise ValueError("use_lora: expected True or None with load_in_4bit=True (4-bit weights cannot be "
                         "trained directly), received False")
    _check_loss_options(config)
    for key in ("importance_sampling_clip_min", "importance_sampling_clip_max"):
        value = getattr(config, key)
        if value is not None and value < 0:
            raise ValueError(f"{key}: expected a number >= 0 or null, received {value!r}")
    if (config.importance_sampling_clip_min is not None and config.importance_sampling_clip_max is not None
            and config.importance_sampling_clip_min > config.importance_sampling_clip_max):
        raise ValueError(f"importance_sampling_clip_min: expected <= importance_sampling_clip_max "
                         f"({config.importance_sampling_clip_max}), received {config.importance_sampling_clip_min}")
    if config.loss_type == "vespo" and config.importance_sampling_correction.startswith("sequence"):
        raise ValueError(f"importance_sampling_correction: expected none, token_truncate or token_mask with "
                         f"loss_type vespo (its weights take per-token ratios), received "
                         f"{config.importance_sampling_correction!r}")
    if config.importance_sampling_correction != "none" and config.rollout_engine == "hf":
        raise ValueError("importance_sampling_correction: expected none with rollout_engine hf (the correction "
                         "uses the engine's sampled-token log-probs), received "
                         f"{config.importance_sampling_correction!r}; set rollout_engine: engine")
    _at_least_zero(config, "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target")
    if config.entropy_coef_min > config.entropy_coef_max:
        raise ValueError(f"entropy_coef_min: expected <= entropy_coef_max ({config.entropy_coef_max}), "
                         f"received {config.entropy_coef_min}")
    if config.dtype == "float16" and not lora_enabled(config):
        # Loss scaling unscales fp32 gradients only: fp16 weights trained directly have no fp32 master copy.
        raise ValueError("dtype: expected bfloat16, float32 or auto for full fine-tuning, received 'float16' (loss "
                         "scaling cannot unscale the fp16 gradients of fp16 weights); with float16 train LoRA "
                         "adapters (use_lora: true or load_in_4bit: true; peft keeps them in fp32), or use dtype "
                         "bfloat16 / float32")


def _check_tool_keys(config: GRPOConfig) -> None:
    paths = [(f"tools[{index}]", path) for index, path in enumerate(config.tools or [])]
    if isinstance(config.environment, str):
        paths.append(("environment", config.environment))
    elif isinstance(config.environment, dict):
        paths += [(f"environment[{name!r}]", path) for name, path in config.environment.items()]
    for key, path in paths:
        if not is_import_path(path):
            raise ValueError(f"{key}: expected an import path 'module:name', received {path!r}")
    if isinstance(config.environment, dict):
        if not config.environment or not all(isinstance(name, str) and name for name in config.environment):
            raise ValueError(f"environment: expected a 'module:Class' path or a non-empty mapping of names to them, "
                             f"received {config.environment!r}")
    if config.max_tool_calling_iterations is not None and config.max_tool_calling_iterations < 0:
        raise ValueError(f"max_tool_calling_iterations: expected an integer >= 0 or null, received "
                         f"{config.max_tool_calling_iterations}")
    if config.tool_timeout is not None and config.tool_timeout <= 0:
        raise ValueError(f"tool_timeout: expected a positive number of seconds or null, received {config.tool_timeout}")
    if not uses_tools(config):
        return
    if config.rollout_engine == "hf":
        raise ValueError("rollout_engine: expected auto or engine with tools or an environment (tool calls run between "
                         "the engine's turns), received 'hf'")
    if config.eval_every > 0:
        raise ValueError(f"eval_every: expected 0 with tools or an environment (held-out evaluation decodes single "
                         f"turns), received {config.eval_every}")


def _check_loss_options(config: GRPOConfig) -> None:
    """The loss's own checks (grpo_fast.loss.GRPOLossConfig: same key names) before any model loads."""
    from .loss import GRPOLossConfig  # imports torch: only when a config is validated

    GRPOLossConfig(**{name: getattr(config, name) for name in LOSS_OPTIONS})


# the keys that are GRPOLossConfig options of the same name
LOSS_OPTIONS = ("loss_type", "beta", "epsilon_low", "epsilon_high", "delta", "kl_bias_correction", "temperature",
                "importance_sampling_level", "scale_rewards", "sapo_temperature_pos", "sapo_temperature_neg",
                "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef",
                "top_entropy_quantile", "off_policy_mask_threshold")


def is_import_path(source: str) -> bool:
    """``source`` has the shape of ``"package.module:name"`` (identifiers only)."""
    module_name, separator, attribute = source.partition(":")
    return bool(separator) and attribute.isidentifier() and all(part.isidentifier() for part in module_name.split("."))


def uses_tools(config: GRPOConfig) -> bool:
    """The model calls tools: ``tools`` or an ``environment`` is configured (multi-turn rollouts)."""
    return bool(config.tools) or config.environment is not None


def lora_enabled(config: GRPOConfig) -> bool:
    return config.load_in_4bit if config.use_lora is None else config.use_lora


def nf4_single_copy(config: GRPOConfig) -> bool:
    """Whether the model grpo-fast loads keeps its NF4 weights once, in the repacked layout."""
    return config.load_in_4bit and config.nf4_single_copy


# --------------------------------------------------------------------------------------------
# Types: YAML values are checked, command-line strings are parsed, against the field annotations
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(GRPOConfig)  # evaluates every annotation: once


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        return members[0], len(members) < len(typing.get_args(annotation))
    return annotation, False


def _union_members(annotation: Any) -> list[Any]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [member for member in typing.get_args(annotation) if member is not type(None)]
    return [annotation]


def _type_name(annotation: Any) -> str:
    base, optional = _split_optional(annotation)
    name = getattr(base, "__name__", str(base)) if typing.get_origin(base) is None else str(base)
    return f"{name} or null" if optional else name


def _check_type(key: str, value: Any, annotation: Any) -> None:
    """The annotation's type, and two rules for every key: floats are finite (a NaN would pass every
    range check), strings are not empty (nor blank, but for stop strings: "\\n" is one)."""
    base, optional = _split_optional(annotation)
    if value is None:
        if optional:
            return
        raise ValueError(f"{key}: expected {_type_name(annotation)}, received None")
    members = _union_members(annotation)
    if len(members) > 1:  # e.g. a path or a mapping of names to paths
        for member in members:
            with contextlib.suppress(ValueError):
                return _check_type(key, value, member)
        raise ValueError(f"{key}: expected {' or '.join(_type_name(member) for member in members)}, received "
                         f"{value!r} ({type(value).__name__})")
    if typing.get_origin(base) is dict:
        key_type, value_type = typing.get_args(base)
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, received {value!r}")
        for name, item in value.items():
            _check_type(key, name, key_type)
            _check_type(key, item, value_type)
        return
    if typing.get_origin(base) is list:
        (item_type,) = typing.get_args(base)
        if not isinstance(value, list) or not all(_is_instance(item, item_type) for item in value):
            raise ValueError(f"{key}: expected a list of {item_type.__name__}, received {value!r}")
        for item in value:
            _check_value(key, item, f"a list of {_type_name(item_type)}", value)
        return
    if not _is_instance(value, base):
        raise ValueError(f"{key}: expected {_type_name(annotation)}, received {value!r} ({type(value).__name__})")
    _check_value(key, value, _type_name(annotation), value)


def _check_value(key: str, item: Any, expected: str, received: Any) -> None:
    if isinstance(item, float) and not math.isfinite(item):
        raise ValueError(f"{key}: expected {expected} (finite), received {received!r}")
    if isinstance(item, str) and not (item if key == "stop_strings" else item.strip()):  # "\n\n" stops
        raise ValueError(f"{key}: expected {expected} (not empty), received {received!r}")


def _is_instance(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def parse_value(key: str, text: str, annotation: Any) -> Any:
    """A command-line string as the field's type: ``"1e-5"`` -> 1e-05, ``"true"`` -> True,
    ``"null"`` -> None (optional fields), ``"a,b"`` or ``"[a, b]"`` -> a list."""
    base, optional = _split_optional(annotation)
    if optional and text.lower() in ("none", "null", "~"):
        return None
    try:
        if base is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if len(_union_members(annotation)) > 1:  # a path, or a YAML mapping: --environment '{a: m:A}'
            return yaml.safe_load(text) if text.startswith("{") else text
        if typing.get_origin(base) is list:
            (item_type,) = typing.get_args(base)
            items = yaml.safe_load(text) if text.startswith("[") else [part.strip() for part in text.split(",") if part.strip()]
            return [parse_value(key, str(item), item_type) for item in items]
        return text
    except (ValueError, yaml.YAMLError):
        raise ValueError(f"{key}: expected {_type_name(annotation)}, received {text!r}") from None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _unknown_key_error(key: str, source: str) -> ValueError:
    import difflib

    names = [item.name for item in dataclasses.fields(GRPOConfig)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{key}: unknown config key in {source}{hint}; expected one of the GRPOConfig fields")


def parse_overrides(arguments: Sequence[str]) -> dict[str, Any]:
    """``["--lr", "1e-5", "--seed=3", "--resume"]`` -> typed values; a flag with no value means true."""
    types_by_key = _field_types()
    values: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if not argument.startswith("--"):
            raise ValueError(f"{argument}: expected an option --key value, received a bare value {argument!r}")
        key, has_value, text = argument[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types_by_key:
            raise _unknown_key_error(key, "the command line")
        if not has_value:
            following = arguments[index + 1] if index + 1 < len(arguments) else None
            if following is None or following.startswith("--"):
                if _split_optional(types_by_key[key])[0] is not bool:
                    raise ValueError(f"{key}: expected a value after --{key}, received none")
                text = "true"
            else:
                text = following
                index += 1
        values[key] = parse_value(key, text, types_by_key[key])
        index += 1
    return values


def read_yaml(path: Path) -> Any:
    """The YAML document at ``path``; a syntax error, an unreadable or non-text file is a ValueError
    naming the file (and the line and column of a syntax error)."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = error.problem or error.context or "syntax error"
        raise ValueError(f"config: expected valid YAML in {str(path)!r}, received {problem}{where}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config: expected valid YAML in {str(path)!r}, received {' '.join(str(error).split())}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config: expected a UTF-8 text YAML file, received {str(path)!r} (not text)") from None
    except OSError as error:
        raise ValueError(f"config: expected a readable YAML file, received {str(path)!r} ({error.strerror})") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] | dict[str, Any] = ()) -> GRPOConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (command-line strings or a dict)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: expected an existing YAML file, received {str(path)!r} (not found)")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config: expected a YAML mapping of key: value in {str(path)!r}, received {type(loaded).__name__}")
        names = {item.name for item in dataclasses.fields(GRPOConfig)}
        for key in loaded:
            if key not in names:
                raise _unknown_key_error(str(key), str(path))
        values.update(loaded)
    if isinstance(overrides, dict):
        names = {item.name for item in dataclasses.fields(GRPOConfig)}
        for key in overrides:
            if key not in names:
                raise _unknown_key_error(str(key), "overrides")
        values.update(overrides)
    else:
        values.update(parse_overrides(overrides))
    return GRPOConfig(**values)


def config_to_dict(config: GRPOConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
