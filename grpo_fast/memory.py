"""Peak memory of a GRPO step, estimated from a config before anything loads (``grpo-fast plan``).

A step's memory is what stays (the weights, the trainable state) plus the largest of its phases:
the rollout (the KV cache of the rows decoding together, prefill activations, the sampling logits),
the no-grad log-prob passes, and the training micro-batch (activations, the fused loss's chunk).
Each term is a formula in the model's shape (its Hugging Face config) and the run's config:

    weights      NF4 Linear weights 0.516 B / param (4 bits, 8-bit absmax per 64 with fp32 scales per
                 256 blocks: double quantisation), or with ``nf4_single_copy`` the one repacked copy
                 that training and the engine's decode kernel share (0.5625 B / param, each group of
                 Linears sharing an input padded to 128 output features: ``repacked_nf4_bytes``);
                 everything else in the compute dtype
    trainable    LoRA (or all) parameters: fp32 value + gradient + AdamW moments (16 B / param; 8-bit
                 AdamW 10 B), in the parameters' dtype for full fine-tuning
    rollout KV   (prompts x prompt rounded up to 64 + rows x completion) x layers x 2 x
                 kv_heads x head_dim x 2 B (``ModelShape.rollout_kv_bytes``: a group's prompt KV is
                 stored once, shared by its rows): all of a step's rows, or within a budget the
                 waves of whole groups the engine decodes (``rollout_rows``: at least one group); on
                 a GPU the engine keeps its KV cache and, without ``nf4_single_copy``, its NF4 decode
                 copy (0.5625 B / NF4 param) between steps for its CUDA graphs, so both count as resident there (without the
                 decode attention kernel, after a compaction or with eager attention, the engine also
                 gathers one layer's prompt KV per row for each step: a transient not counted here)
    activations  per token: layers x (a hidden + b intermediate + c kv_dim + d) + (e hidden + ...)
                 bytes at the peak of forward + backward (the tensors autograd keeps for a Llama /
                 Qwen2 block with LoRA on every Linear, SDPA attention: no tokens^2 term, plus the
                 backward's transients); with gradient checkpointing the per-layer part is the saved
                 block inputs and the rest one block recomputed
    loss         the fused loss's fp32 logits chunk (512 MiB) + fp32 d_hidden + the hidden states

The activation coefficients were measured with ``LiveTensorBytes`` (below) on tiny Llama blocks
(tests/test_memory_model.py checks the formulas against measured peaks on held-out shapes, within
10%); on a GPU the suite's CUDA allocator peaks check the whole estimate. Everything here is an
estimate until measured: ``grpo-fast plan`` says so.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 1024 ** 3
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Peak bytes per token of a micro-batch's forward + backward (LoRA's own gradients excluded), as
# L x (a H + b I + c kv + d) + (e H + f I + g kv + h) for L layers, hidden H, intermediate I, kv dim:
# least squares over 20 measurements (5 shapes x 2 depths) of Llama blocks with LoRA r=8 on every
# Linear and SDPA attention (no tokens^2 term), by LiveTensorBytes on CPU; max residual 1.6%. bf16
# keeps a few fp32 copies (RMSNorm's upcast, SDPA's log-sum-exp), so it is not half of fp32. With
# checkpointing the per-layer part is the saved block input; the rest is one block recomputed.
ACTIVATION_COEFFICIENTS = {
    # dtype bytes: {checkpointing: ((a, b, c, d) per layer, (e, f, g, h) per token)}
    2: {False: ((35.28, 9.75, 3.76, 252.9), (19.29, 2.26, 3.30, -961.2)),
        True: ((0.75, 0.25, 0.17, 0.0), (48.92, 13.51, 3.88, 205.3))},
    4: {False: ((22.53, 15.50, 7.59, 252.9), (14.75, 8.73, 10.65, -3002.0)),
        True: ((2.42, -0.34, -0.12, -68.2), (25.06, 24.03, 8.29, 253.9))},
}
# The published configs of the models the README's table uses (no download needed to plan for them).
KNOWN_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}


# kernels/nf4_decode.py's repack_nf4 (not imported: planning needs no Triton): features padded to a
# multiple of ROW_ALIGN, one fp32 scale per chunk of 64 weights, the 16 levels in fp32, fp16 and bf16
REPACK_ROW_ALIGN, REPACK_CHUNK, REPACK_TABLE_BYTES = 128, 64, 16 * (4 + 2 + 2)

CACHE_LENGTH_MULTIPLE = 64  # the engine's prompt KV segment is a multiple of this long: few shapes across steps


def cache_length(tokens: int) -> int:
    """Columns of the engine's prompt KV segment for prompts of up to ``tokens``: rounded up to
    CACHE_LENGTH_MULTIPLE (prompt widths vary from step to step; the completion segment is exactly
    ``max_completion_length``, fixed for a run)."""
    return -(-tokens // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only transformer (a Hugging Face config's fields)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: Optional[int] = None

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers config object or a dict of its fields (config.json's names)."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))

        def first(*keys):  # the field under the names model families use (GPT-2, OPT, Falcon, ...)
            return next((get(key) for key in keys if get(key) is not None), None)

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head", "num_heads")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        vocab = get("vocab_size")
        missing = [name for name, value in (("hidden_size", hidden), ("num_attention_heads", heads),
                                            ("num_hidden_layers", layers), ("vocab_size", vocab)) if value is None]
        if missing:
            raise ValueError(f"model: expected a config with {', '.join(missing)} (or its family's names) to "
                             "estimate memory from, received none")
        intermediate = first("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff") or 4 * hidden
        return cls(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                   kv_heads=first("num_key_value_heads", "num_kv_heads") or heads, vocab=vocab,
                   tied=bool(get("tie_word_embeddings", False)), head_dim=get("head_dim"))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one block's Linear layers: q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    @property
    def other_params(self) -> int:
        """Embeddings, the head (when untied), norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * 2 * self.hidden + self.hidden

    def repacked_nf4_bytes(self) -> int:
        """Bytes of the decode kernel's repacked NF4 Linears (``repack_nf4``): per group of Linears that
        share an input (q/k/v, o, gate/up, down) its output features padded to REPACK_ROW_ALIGN, half a
        byte per weight, an fp32 scale per REPACK_CHUNK weights, its int32 split-K tickets (a byte per
        padded feature) and its level tables (biases, as elsewhere here, not counted)."""
        h, i = self.hidden, self.intermediate
        total = 0
        for in_features, out_features in ((h, self.q_dim + 2 * self.kv_dim), (self.q_dim, h), (h, 2 * i), (i, h)):
            rows = -(-out_features // REPACK_ROW_ALIGN) * REPACK_ROW_ALIGN
            total += rows * in_features // 2 + 4 * rows * in_features // REPACK_CHUNK + rows + REPACK_TABLE_BYTES
        return self.layers * total

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.linear_shapes())

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.layers * 2 * self.kv_dim * dtype_bytes

    def rollout_kv_bytes(self, prompts: int, group: int, prompt_length: int, completion_length: int,
                         dtype_bytes: int = 2) -> int:
        """The rollout engine's KV cache for ``prompts`` groups of ``group`` rows: each prompt's KV once
        (a prompt slot of ``prompt_length`` columns rounded up as the engine rounds them, ``cache_length``,
        shared by its group's rows) plus each row's own completion (``completion_length`` columns). The
        one formula of the engine's waves and of the memory estimate."""
        tokens = prompts * cache_length(prompt_length) + prompts * group * completion_length
        return tokens * self.kv_bytes_per_token(dtype_bytes)

    def activation_bytes_per_token(self, dtype_bytes: int, checkpointing: bool) -> float:
        """Peak bytes a micro-batch's forward + backward holds per token (ACTIVATION_COEFFICIENTS)."""
        per_layer, per_token = ACTIVATION_COEFFICIENTS[dtype_bytes][checkpointing]
        return self.layers * _apply(per_layer, self) + _apply(per_token, self)


def _apply(coefficients, shape: ModelShape) -> float:
    a, b, c, d = coefficients
    return a * shape.hidden + b * shape.intermediate + c * shape.kv_dim + d


@dataclass
class MemoryEstimate:
    """Bytes of each term; ``peak`` is what stays plus the largest phase."""

    terms: dict[str, float] = field(default_factory=dict)
    phases: dict[str, list[str]] = field(default_factory=dict)  # phase -> the transient terms it holds

    @property
    def resident(self) -> float:
        transient = {name for names in self.phases.values() for name in names}
        return sum(value for name, value in self.terms.items() if name not in transient)

    def phase_bytes(self, phase: str) -> float:
        return sum(self.terms[name] for name in self.phases[phase])

    @property
    def peak(self) -> float:
        return self.resident + max((self.phase_bytes(phase) for phase in self.phases), default=0.0)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)


def _dtype_bytes(config) -> int:
    if config.dtype == "float32":
        return 4
    if config.dtype == "auto":  # bfloat16 on CUDA, float32 on a CPU
        return 2 if planned_for_gpu(config) else 4
    return 2


_CONFIGURED = object()
NF4_REPACK_BYTES_PER_PARAM = 0.5625  # the engine's decode layout: 4-bit weights + fp32 scale per 64


def planned_for_gpu(config) -> bool:
    """Whether an estimate is for a GPU run: on CUDA, or for any model but the CPU demo's ``tiny``
    (``grpo-fast plan`` on a CPU plans the GPU run of a named model)."""
    return torch.cuda.is_available() or config.model != "tiny"


def engine_samples(config) -> bool:
    """Whether the rollout engine samples (``rollout_engine: engine``, or ``auto`` on a GPU): then the
    rollout decodes in waves within a budget; Hugging Face generate decodes every row at once."""
    return config.rollout_engine == "engine" or (config.rollout_engine == "auto" and planned_for_gpu(config))


def engine_keeps(config) -> bool:
    """Whether the engine keeps its KV cache and repacked NF4 weights between steps: on a GPU, where
    its CUDA graphs read them in place (so they stay allocated through training), unless
    ``rollout_memory: free`` (``auto`` is planned as ``keep``; ``size_to_budget`` turns it to ``free``
    when only that fits)."""
    return engine_samples(config) and planned_for_gpu(config) and config.rollout_memory != "free"


def _freed(config):
    """``config`` with the engine's memory freed after each rollout, when ``rollout_memory: auto`` plans
    to keep it; else None (nothing to choose)."""
    import dataclasses

    if config.rollout_memory == "auto" and engine_keeps(config):
        return dataclasses.replace(config, rollout_memory="free")
    return None


def estimate(config, shape: ModelShape, *, prompt_length: int = 256, completion_length: Optional[int] = None,
             micro_batch_tokens=_CONFIGURED, dtype_bytes: Optional[int] = None,
             loss_chunk_bytes: int = 512 * 1024 ** 2, rollout_rows: Optional[int] = None) -> MemoryEstimate:
    """The memory terms of one step of ``config`` (a grpo_fast.config.GRPOConfig) on a model of ``shape``.

    ``prompt_length``: the longest prompt in tokens (the engine pads a step's prompts to it);
    ``completion_length``, ``micro_batch_tokens``: default the config's; ``rollout_rows``: the rows the
    engine decodes together (default all of the step's; fewer when it decodes in waves)."""
    from .config import lora_enabled, nf4_single_copy

    completion = completion_length or config.max_completion_length
    dtype_bytes = dtype_bytes or _dtype_bytes(config)
    compute = dtype_bytes
    rows = config.prompts_per_step * config.num_generations
    terms: dict[str, float] = {}
    single_copy = nf4_single_copy(config)
    if config.load_in_4bit:
        nf4 = shape.repacked_nf4_bytes() if single_copy else shape.linear_params * NF4_BYTES_PER_PARAM
        terms["weights"] = nf4 + shape.other_params * compute
    else:
        terms["weights"] = (shape.linear_params + shape.other_params) * dtype_bytes
    optimizer_bytes = 2 if config.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
    if lora_enabled(config):
        terms["trainable state"] = shape.lora_params(config.lora_r) * (4 + 4 + optimizer_bytes)
    else:  # gradients and AdamW moments in the parameters' dtype
        terms["trainable state"] = (shape.linear_params + shape.other_params) * dtype_bytes * (1 + 2)
    # rollout: the KV of the rows decoding together (a wave of whole groups: each prompt's KV once, each
    # row's completion), their prompts' prefill
    wave = rows if rollout_rows is None else max(config.num_generations, min(rows, rollout_rows))
    terms["rollout KV cache"] = shape.rollout_kv_bytes(wave // config.num_generations, config.num_generations,
                                                       prompt_length, completion, 2 if compute == 2 else 4)
    # no-grad prefill: about one block's activations at a time
    terms["rollout prefill"] = (wave // config.num_generations) * prompt_length * _apply(
        ACTIVATION_COEFFICIENTS[compute][False][0], shape)
    terms["sampling logits"] = wave * shape.vocab * 4 * 3  # fp32 logits, scaled, filtered probabilities
    # the engine's fused NF4 decode reads a repacked copy of bitsandbytes' weights (on a GPU; with
    # nf4_single_copy the weights themselves); with CUDA graphs it and the KV cache stay allocated
    # through training, else both are freed after each rollout
    kept = engine_keeps(config)
    repacked = config.load_in_4bit and not single_copy and engine_samples(config) and planned_for_gpu(config)
    if repacked:
        terms["NF4 decode copy"] = shape.linear_params * NF4_REPACK_BYTES_PER_PARAM
    # training: one micro-batch (prompt + completion tokens) forward and backward
    row_tokens = prompt_length + completion
    batch_rows = min(config.micro_batch_size, rows)
    micro_batch_tokens = config.micro_batch_tokens if micro_batch_tokens is _CONFIGURED else micro_batch_tokens
    if micro_batch_tokens is not None:
        batch_rows = max(1, min(rows, micro_batch_tokens // row_tokens))
    tokens = batch_rows * row_tokens
    per_token = shape.activation_bytes_per_token(compute, config.gradient_checkpointing)
    if config.activation_offload:  # the saved block inputs wait in host memory: one block's activations stay
        per_token -= shape.layers * _apply(ACTIVATION_COEFFICIENTS[compute][True][0], shape)
    terms["training activations"] = tokens * per_token
    completion_tokens = batch_rows * completion
    # the fused loss: one chunk of fp32 logits (the triton backend writes its gradient over it; the
    # torch backend also holds fp32 temporaries), fp32 d_hidden and the hidden states
    torch_backend = config.loss_backend == "torch" or (config.loss_backend == "auto" and not torch.cuda.is_available())
    chunk = min(loss_chunk_bytes, completion_tokens * shape.vocab * (12 if torch_backend else 4))
    terms["loss"] = chunk + completion_tokens * shape.hidden * (compute + 4)
    freed = [] if kept else ["rollout KV cache", *(["NF4 decode copy"] if repacked else [])]
    phases = {"rollout": [*freed, "rollout prefill", "sampling logits"],
              "training": ["training activations", "loss"]}
    return MemoryEstimate(terms, phases)


def longest_completion(config, shape: ModelShape, budget_bytes: float, prompt_length: int = 256,
                       limit: int = 1 << 17) -> int:
    """The longest completion (a multiple of 64 tokens) whose step fits ``budget_bytes`` with the
    rollout in waves and the micro-batches sized to the budget (``size_to_budget``: one group per wave,
    one row per micro-batch at the least; with ``rollout_memory: auto``, the engine's memory kept or,
    if only that fits, freed for training); 0 if none."""
    freed = _freed(config)
    plans = [config] if freed is None else [config, freed]

    def fits(length: int) -> bool:
        return any(estimate(plan, shape, prompt_length=prompt_length, completion_length=length,
                            micro_batch_tokens=prompt_length + length,
                            rollout_rows=config.num_generations).peak <= budget_bytes for plan in plans)

    low, high = 0, limit // 64
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle * 64) else (low, middle - 1)
    return low * 64


SEARCH_LIMIT = 1 << 17  # the table's longest completion searched (tokens)
README_MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b")
README_BUDGETS_GB = (16, 24, 40, 80)


def readme_table() -> str:
    """The README's table: the longest completion per model and GPU memory for 8 prompts x 8
    completions, NF4 + LoRA r16, gradient checkpointing, the Triton loss, prompts of 256 tokens
    (estimated)."""
    import dataclasses

    from .config import GRPOConfig

    header = "| model | " + " | ".join(f"{budget} GiB" for budget in README_BUDGETS_GB) + " |"
    lines = [header, "|---|" + "---:|" * len(README_BUDGETS_GB)]
    for name in README_MODELS:
        config = GRPOConfig(model=name, load_in_4bit=True, dtype="bfloat16", lora_r=16, prompts_per_step=8,
                            num_generations=8, gradient_checkpointing=True, loss_backend="triton")
        shape = ModelShape.from_config(KNOWN_SHAPES[name])
        kept = dataclasses.replace(config, rollout_memory="keep")
        cells = []
        for budget in README_BUDGETS_GB:
            longest = longest_completion(config, shape, budget * GIB, limit=SEARCH_LIMIT)
            cell = f"{longest:,}+" if longest >= SEARCH_LIMIT else f"{longest:,}"  # +: the search's end
            # *: only with the rollout's memory freed for training (rollout_memory auto -> free)
            cells.append(cell + ("*" if longest > longest_completion(kept, shape, budget * GIB, limit=SEARCH_LIMIT)
                                 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_table())


# ----------------------------------------------------------------------------------------------
# measuring on a CPU: the peak of live tensor bytes
# ----------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """The peak bytes of the tensor storages that ATen ops make under it and that are still alive: on a
    CPU, the stand-in for CUDA's peak allocated memory (tensors made before entering are not counted).

    >>> with LiveTensorBytes() as meter:
    ...     x = torch.ones(256)          # 1 KiB
    ...     y = x * 2                    # 1 KiB more
    ...     del x, y
    ...     z = torch.ones(128)
    >>> meter.peak, meter.current
    (2048, 512)
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors holding it]
        self.current = 0
        self.peak = 0

    def _release(self, address: int) -> None:
        entry = self._live.get(address)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            address = tensor.untyped_storage().data_ptr()
            if address == 0 or (address in inputs and address not in self._live):
                continue  # an input's storage (in place, out=, a view of something older)
            entry = self._live.get(address)
            if entry is None:
                entry = self._live[address] = [tensor.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, address)
        return out


# ----------------------------------------------------------------------------------------------
# sizing a run to a budget
# ----------------------------------------------------------------------------------------------


def memory_budget(config, device: torch.device) -> Optional[float]:
    """Bytes the run may use: ``max_memory_gb``, else on CUDA what this process holds (the model,
    when loaded) plus the device's free memory less 10%; None (no limit) on a CPU without
    ``max_memory_gb``."""
    if config.max_memory_gb is not None:
        return config.max_memory_gb * GIB
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.9 * free + torch.cuda.memory_allocated(device)
    return None


def rollout_rows(config, shape: ModelShape, budget: float, prompt_length: int) -> int:
    """The rows the engine may decode together within ``budget`` bytes: whole groups, all of the
    step's rows when they fit, at least one group (``size_to_budget`` refuses a budget without room
    for it)."""
    group, rows = config.num_generations, config.prompts_per_step * config.num_generations
    if not engine_samples(config):  # Hugging Face generate: every row at once
        return rows
    one_row = prompt_length + config.max_completion_length

    def fits(count: int) -> bool:
        if not engine_keeps(config):
            return _rollout_bytes(config, shape, prompt_length, count) <= budget
        # a kept cache stays through training: it must leave room for a micro-batch of one row
        return estimate(config, shape, prompt_length=prompt_length, rollout_rows=count,
                        micro_batch_tokens=one_row).peak <= budget

    fitting = [count for count in range(group, rows + 1, group) if fits(count)]
    return fitting[-1] if fitting else group


def _rollout_bytes(config, shape: ModelShape, prompt_length: int, rows: int) -> float:
    result = estimate(config, shape, prompt_length=prompt_length, rollout_rows=rows)
    return result.resident + result.phase_bytes("rollout")


def kv_budget_bytes(config, shape: ModelShape, budget: float, prompt_length: int) -> float:
    """The engine's ``max_kv_bytes`` within ``budget``: the KV cache of the rows ``rollout_rows``
    allows (at the longest prompt and completion), what the estimate charges for it."""
    result = estimate(config, shape, prompt_length=prompt_length,
                      rollout_rows=rollout_rows(config, shape, budget, prompt_length))
    return result.terms["rollout KV cache"]


def size_to_budget(config, shape: ModelShape, budget: float, prompt_length: int):
    """``config``, or a copy whose micro-batches are packed by tokens to fit ``budget`` bytes: the most
    tokens (a multiple of 64, at least one row) whose estimated step fits; with ``rollout_memory: auto``
    and a step that fits only with the engine's KV cache and NF4 decode copy freed for training, a copy
    with ``rollout_memory: free``. Raises a ValueError naming max_memory_gb when even one row per
    micro-batch, or the rollout, does not fit."""
    try:
        return _size_micro_batches(config, shape, budget, prompt_length)
    except ValueError:
        freed = _freed(config)
        if freed is None:
            raise
        return _size_micro_batches(freed, shape, budget, prompt_length)  # its error if this fails too


def _size_micro_batches(config, shape: ModelShape, budget: float, prompt_length: int):
    import dataclasses

    smallest = config.num_generations if engine_samples(config) else config.generation_batch_size
    need = _rollout_bytes(config, shape, prompt_length, smallest)
    if need > budget:
        what = "one group" if engine_samples(config) else "all rows at once (Hugging Face generate)"
        raise ValueError(f"max_memory_gb: expected room for the rollout of {what} ({smallest} "
                         f"completions of up to {config.max_completion_length} tokens; estimated {need / GIB:.1f} "
                         f"GiB with the weights), received a budget of {budget / GIB:.1f} GiB; lower "
                         "max_completion_length or num_generations")
    wave = rollout_rows(config, shape, budget, prompt_length)
    current = estimate(config, shape, prompt_length=prompt_length, rollout_rows=wave)
    if current.peak <= budget:
        return config
    row = prompt_length + config.max_completion_length
    best = None
    first = math.ceil(row / 64) * 64  # one row exactly, then multiples of 64 tokens
    for tokens in [row, *range(first if first > row else first + 64, row * config.generation_batch_size + 64, 64)]:
        if estimate(config, shape, prompt_length=prompt_length, micro_batch_tokens=tokens,
                    rollout_rows=wave).peak > budget:
            break
        best = tokens
    if best is None:
        one_row = estimate(config, shape, prompt_length=prompt_length, micro_batch_tokens=row, rollout_rows=wave)
        hint = "" if config.gradient_checkpointing else "; gradient_checkpointing: true keeps less"
        raise ValueError(f"max_memory_gb: expected room for one completion per micro-batch (estimated "
                         f"{one_row.peak / GIB:.1f} GiB), received a budget of {budget / GIB:.1f} GiB{hint}")
    return dataclasses.replace(config, micro_batch_tokens=best)


def shape_of(config) -> ModelShape:
    """The shape of ``config.model``: a known model (by name), the tiny demo model, or its config.json
    (a local folder, or the Hugging Face cache / hub)."""
    name = config.model.lower().replace("_", "-")
    for known, fields in KNOWN_SHAPES.items():
        if known in name:  # e.g. "Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B"
            return ModelShape.from_config(fields)
    if config.model == "tiny":
        from .model import build_tiny_model, tiny_tokenizer
        from .tasks import ALPHABET, SEPARATOR

        return ModelShape.from_config(build_tiny_model(tiny_tokenizer(ALPHABET + SEPARATOR)).config)
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"model: expected a local model folder, a cached or reachable hub id, or one of "
                         f"{', '.join(KNOWN_SHAPES)}, received {config.model!r} ({error})") from None
    return ModelShape.from_config(hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config)


def plan_table(config, shape: ModelShape, prompt_length: int, budgets_gb=(16, 24, 40, 80),
               rollout_rows: Optional[int] = None) -> str:
    """``grpo-fast plan``'s report: each term, the peak and its phase, the longest completion per budget
    (``rollout_rows``: the rows the engine decodes together, when a budget sizes its waves)."""
    import dataclasses

    result = estimate(config, shape, prompt_length=prompt_length, rollout_rows=rollout_rows)
    lines = [f"estimated memory of one step (prompts of {prompt_length} tokens, completions of "
             f"{config.max_completion_length}; an estimate: the GPU suite measures the truth)", ""]
    transient = {name: phase for phase, names in result.phases.items() for name in names}
    for name, value in result.terms.items():
        where = f"  ({transient[name]})" if name in transient else ""
        lines.append(f"  {name:<22} {value / GIB:8.2f} GiB{where}")
    lines.append(f"  {'peak':<22} {result.peak / GIB:8.2f} GiB  (resident + {result.peak_phase})")
    lines += ["", "longest completion that fits:"]
    kept = _freed(config) is not None and dataclasses.replace(config, rollout_memory="keep")
    for budget in budgets_gb:
        longest = longest_completion(config, shape, budget * GIB, prompt_length, limit=SEARCH_LIMIT)
        freed = kept and longest > longest_completion(kept, shape, budget * GIB, prompt_length, limit=SEARCH_LIMIT)
        shown = f"{longest}+" if longest >= SEARCH_LIMIT else str(longest)  # +: the search's end
        lines.append(f"  {budget:>4} GiB: {shown:>7} tokens"
                     + ("  (with rollout_memory free: the engine's memory freed for training)" if freed else ""))
    return "\n".join(lines)
