"""The memory model's terms (grpo_fast.memory) against what the code allocates, measured on CPU with
LiveTensorBytes: training activations of Llama blocks with LoRA (held-out shapes, not the ones the
coefficients were measured on), the fused loss's chunk, the rollout engine's KV cache, the weights;
and `grpo-fast plan` on the example configs."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from grpo_fast.memory import GIB, KNOWN_SHAPES, LiveTensorBytes, ModelShape, estimate, longest_completion


def _lora_llama(hidden, intermediate, heads, kv_heads, layers, dtype, checkpointing):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(config).to(dtype),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model.train(), ModelShape.from_config(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
@pytest.mark.parametrize("dims", [(160, 448, 5, 1), (224, 288, 7, 7)], ids=["gqa", "mha"])
def test_activation_term_matches_measured(dims, checkpointing, dtype):
    hidden, intermediate, heads, kv_heads = dims
    model, shape = _lora_llama(hidden, intermediate, heads, kv_heads, 3, dtype, checkpointing)
    ids = torch.randint(0, 300, (2, 96))
    with LiveTensorBytes() as meter:
        model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state.float().pow(2).mean().backward()
        # the peak of a checkpointed step comes in backward (one block recomputed); stored: after the forward
    tokens = ids.numel()
    dtype_bytes = 2 if dtype == torch.bfloat16 else 4
    estimated = tokens * shape.activation_bytes_per_token(dtype_bytes, checkpointing)
    lora = shape.lora_params(8) * (4 if dtype == torch.float32 else 2)  # LoRA gradients made in backward
    measured = meter.peak - lora
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)


def test_loss_term_matches_measured():
    from grpo_fast import GRPOLossConfig, grpo_loss

    n, H, V = 600, 64, 4000
    hidden = torch.randn(1, n, H, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.bfloat16) * 0.05
    ids = torch.randint(0, V, (1, n))
    chunk_bytes = 256 * V * 12  # the torch backend's budget per chunk of 256 tokens: fp32 logits + temporaries
    with LiveTensorBytes() as meter:
        out = grpo_loss(hidden, weight, ids, torch.ones_like(ids), advantages=torch.ones(1),
                        config=GRPOLossConfig(chunk_size=256), backend="torch")
        out.loss.backward()
    estimated = chunk_bytes + n * H * (2 + 4) + V * H * 4  # chunk, d_hidden (fp32 + its bf16 copy), fp32 head
    assert abs(estimated - meter.peak) <= 0.10 * meter.peak, (estimated, meter.peak)


def test_kv_term_is_the_engines_cache():
    from grpo_fast.engine import RolloutEngine
    from grpo_fast.rollout import SamplingParams
    from tiny_lm import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, hidden_size=64).eval()
    shape = ModelShape.from_config(model.config)
    prompts = [tokenizer.encode(text) for text in ("hello there", "a b c d e f")]
    params = SamplingParams(num_generations=4, max_completion_length=40, min_completion_length=40, top_k=1,
                            eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    engine = RolloutEngine(compact=False)
    with LiveTensorBytes() as meter:
        engine.generate(model, prompts, params)
    # the two prompts' KV once (11 tokens -> 64 columns) and the 8 rows' completions (40 columns)
    kv = (2 * 64 + 8 * 40) * shape.kv_bytes_per_token(4)
    assert kv == shape.rollout_kv_bytes(2, 4, 11, 40, 4)
    # on CPU (sdpa, rows slot-major: no compaction here) the attention reads both segments in place: beyond
    # the cache only the logits and each layer's [rows, heads, 64 + 40] fp32 scores and probabilities
    heads = model.config.num_attention_heads
    assert kv <= meter.peak <= 1.10 * kv + 8 * shape.vocab * 4 * 4 + 3 * 8 * heads * 104 * 4, (kv, meter.peak)


def test_weights_term_counts_the_parameters():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=500, tie_word_embeddings=False)
    shape = ModelShape.from_config(config)
    model = Qwen2ForCausalLM(config)
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith("bias"))
    assert shape.linear_params + shape.other_params == sum(p.numel() for p in model.parameters()) - biases


def test_estimate_grows_with_completions_and_the_budget_search_is_monotone():
    from grpo_fast.config import GRPOConfig

    shape = ModelShape.from_config(KNOWN_SHAPES["qwen2.5-7b"])
    config = GRPOConfig(model="qwen", load_in_4bit=True, dtype="bfloat16", prompts_per_step=8, num_generations=8,
                        max_completion_length=4096, micro_batch_size=1, gradient_checkpointing=True, lora_r=16,
                        rollout_memory="keep")  # one plan: auto's choice between two is tested below
    short = estimate(config, shape, completion_length=1024)
    long = estimate(config, shape, completion_length=4096)
    assert long.peak > short.peak and long.terms["weights"] == short.terms["weights"]
    # the 7B NF4 weights: ~5.5 GB (3.4 GB of 4-bit Linear weights, 2.2 GB of bf16 embeddings and head)
    assert 5.0 * GIB < long.terms["weights"] < 6.0 * GIB
    fit16, fit24 = longest_completion(config, shape, 16 * GIB), longest_completion(config, shape, 24 * GIB)
    assert 0 < fit16 < fit24
    # the rollout in waves of one group (the engine's within a budget), micro-batches of one row
    assert estimate(config, shape, completion_length=fit24, rollout_rows=8).peak <= 24 * GIB
    assert estimate(config, shape, completion_length=fit24 + 64, rollout_rows=8).peak > 24 * GIB
    waves = estimate(config, shape, completion_length=4096, rollout_rows=8)
    assert waves.terms["rollout KV cache"] * 8 == long.terms["rollout KV cache"]  # one group of the eight


def test_shapes_of_other_model_families():
    """GPT-2 / OPT name their fields differently (no intermediate_size, no num_key_value_heads): the
    shape reads them (a GPT-2 MLP is 4 x hidden), and a config without them is a clear error."""
    from transformers import GPT2Config, OPTConfig

    gpt2 = ModelShape.from_config(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300))
    assert (gpt2.layers, gpt2.hidden, gpt2.intermediate, gpt2.heads, gpt2.kv_heads) == (3, 64, 256, 4, 4)
    opt = ModelShape.from_config(OPTConfig(hidden_size=64, ffn_dim=100, num_hidden_layers=2, num_attention_heads=4))
    assert (opt.intermediate, opt.kv_heads) == (100, 4)
    with pytest.raises(ValueError, match="model: expected a config with hidden_size"):
        ModelShape.from_config({"vocab_size": 10})


def test_what_the_engine_keeps_on_a_gpu_is_resident():
    """A run planned for a GPU (a named model): the engine's KV cache and NF4 decode copy stay through
    training (its CUDA graphs read them in place); with Hugging Face generate neither does."""
    from grpo_fast.config import GRPOConfig

    shape = ModelShape.from_config(KNOWN_SHAPES["qwen2.5-7b"])
    common = dict(model="Qwen/Qwen2.5-7B", load_in_4bit=True, dtype="bfloat16", max_completion_length=1024,
                  nf4_single_copy=False)  # bitsandbytes' layers: the engine repacks a copy
    engine = estimate(GRPOConfig(rollout_engine="engine", **common), shape)
    hf = estimate(GRPOConfig(rollout_engine="hf", **common), shape)
    assert engine.terms["NF4 decode copy"] == shape.linear_params * 0.5625 and "NF4 decode copy" not in hf.terms
    assert "rollout KV cache" not in engine.phases["rollout"] and "rollout KV cache" in hf.phases["rollout"]
    assert engine.resident == hf.resident + engine.terms["rollout KV cache"] + engine.terms["NF4 decode copy"]


def test_rollout_memory_free_makes_the_engines_memory_a_rollout_phase():
    """``rollout_memory: free``: the KV cache and the NF4 decode copy live only through the rollout, so
    what stays through training is what Hugging Face generate leaves (and the peak is lower)."""
    from grpo_fast.config import GRPOConfig

    shape = ModelShape.from_config(KNOWN_SHAPES["qwen2.5-7b"])
    common = dict(model="Qwen/Qwen2.5-7B", load_in_4bit=True, dtype="bfloat16", max_completion_length=4096,
                  gradient_checkpointing=True, micro_batch_size=1, nf4_single_copy=False)
    kept = estimate(GRPOConfig(rollout_engine="engine", **common), shape)
    freed = estimate(GRPOConfig(rollout_engine="engine", rollout_memory="free", **common), shape)
    hf = estimate(GRPOConfig(rollout_engine="hf", **common), shape)
    assert freed.terms == kept.terms and freed.resident == hf.resident
    assert {"rollout KV cache", "NF4 decode copy"} <= set(freed.phases["rollout"])
    assert freed.resident == kept.resident - kept.terms["rollout KV cache"] - kept.terms["NF4 decode copy"]
    assert freed.peak < kept.peak


def test_auto_frees_the_rollouts_memory_only_when_keeping_it_does_not_fit():
    """The issue's goal configs: Qwen2.5-7B 8 x 8 x 4,096 in 24 GB keeps the engine's memory (its KV
    waves sized to leave room for training); Llama-3.1-8B's shape with 8 x 20K-token completions in
    40 GB fits only with it freed for training, which ``auto`` chooses and ``keep`` refuses."""
    from grpo_fast.config import GRPOConfig
    from grpo_fast.memory import rollout_rows, size_to_budget

    qwen = ModelShape.from_config(KNOWN_SHAPES["qwen2.5-7b"])
    config = GRPOConfig(model="Qwen/Qwen2.5-7B", load_in_4bit=True, dtype="bfloat16", lora_r=16, prompts_per_step=8,
                        num_generations=8, max_completion_length=4096, gradient_checkpointing=True)
    for single_copy, waves in ((False, range(8, 64)), (True, [64])):  # one NF4 copy: all 64 rows in one wave
        sized = size_to_budget(dataclasses.replace(config, nf4_single_copy=single_copy), qwen, 24 * GIB, 256)
        wave = rollout_rows(sized, qwen, 24 * GIB, 256)
        assert sized.rollout_memory == "auto" and sized.micro_batch_tokens is not None and wave in waves
        assert estimate(sized, qwen, prompt_length=256, rollout_rows=wave).peak <= 24 * GIB

    llama = ModelShape.from_config(KNOWN_SHAPES["llama-3.1-8b"])
    config = GRPOConfig(model="meta-llama/Llama-3.1-8B", load_in_4bit=True, dtype="bfloat16", lora_r=16,
                        prompts_per_step=1, num_generations=8, max_completion_length=20480, gradient_checkpointing=True,
                        nf4_single_copy=False)  # the engine's NF4 copy beside bitsandbytes' weights
    # with the one copy the NF4 decode copy's 3.7 GiB are not there to free: it fits with the memory kept
    assert size_to_budget(dataclasses.replace(config, nf4_single_copy=True), llama, 40 * GIB, 256).rollout_memory == "auto"
    sized = size_to_budget(config, llama, 40 * GIB, 256)
    assert sized.rollout_memory == "free"
    peak = estimate(sized, llama, prompt_length=256, rollout_rows=rollout_rows(sized, llama, 40 * GIB, 256)).peak
    assert peak <= 40 * GIB
    with pytest.raises(ValueError, match="max_memory_gb: expected room"):
        size_to_budget(dataclasses.replace(config, rollout_memory="keep"), llama, 40 * GIB, 256)
    assert longest_completion(config, llama, 40 * GIB) >= 20480 > longest_completion(
        dataclasses.replace(config, rollout_memory="keep"), llama, 40 * GIB)


def test_weights_term_is_what_the_single_copy_nf4_model_holds():
    """The tiny model loaded in NF4 + LoRA as the trainer loads it (nf4_single_copy): the bytes of every
    parameter and buffer it holds (each shared repacked weight once) are the weights term plus the LoRA
    parameters; bitsandbytes' tensors are gone, so nothing else holds the base weights."""
    from grpo_fast.config import GRPOConfig
    from grpo_fast.memory import shape_of
    from grpo_fast.model import load_model

    config = GRPOConfig(load_in_4bit=True, lora_r=4)
    model, _ = load_model(config, torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    shape = shape_of(config)
    lora = shape.lora_params(4) * 4  # peft keeps the adapters in fp32
    rotary = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "rotary" in name)
    estimated = estimate(config, shape).terms["weights"] + lora + rotary
    assert held == estimated, (held, estimated)
    # a second copy (bitsandbytes' 0.516 B / weight beside the repacked one) would be far off
    assert shape.linear_params * 0.5 > 0.3 * shape.repacked_nf4_bytes()


def test_single_copy_counts_the_repacked_weights_once():
    """With nf4_single_copy the engine's decode reads the weights themselves: no decode copy, resident or
    in the rollout, and the weights term is the repacked layout's (0.5625 B / weight and padding)."""
    from grpo_fast.config import GRPOConfig

    shape = ModelShape.from_config(KNOWN_SHAPES["qwen2.5-7b"])
    common = dict(model="Qwen/Qwen2.5-7B", load_in_4bit=True, dtype="bfloat16", max_completion_length=1024,
                  rollout_engine="engine")
    single = estimate(GRPOConfig(**common), shape)
    two = estimate(GRPOConfig(nf4_single_copy=False, **common), shape)
    assert "NF4 decode copy" not in single.terms and "NF4 decode copy" in two.terms
    repacked = shape.repacked_nf4_bytes()
    assert shape.linear_params * 0.5625 <= repacked <= shape.linear_params * 0.5625 * 1.01  # Qwen's padding is small
    assert single.terms["weights"] - two.terms["weights"] == repacked - shape.linear_params * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert two.peak - single.peak == two.terms["NF4 decode copy"] + two.terms["weights"] - single.terms["weights"]
