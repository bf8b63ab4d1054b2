"""The rollout engine against Hugging Face ``generate`` and a separate forward pass, on tiny models
built in code: greedy tokens equal token for token (full precision and NF4 + LoRA, fp32 compute),
left-padded prompts of different lengths, EOS mid-generation, finished rows dropping out,
sampled-token log-probs, seeds, the sampling filters, stop strings, minimum lengths, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from grpo_fast.engine import RolloutEngine, filter_logits, sample_tokens
from grpo_fast.rollout import SamplingParams, cut_at_eos, hf_generate, pad
from tiny_lm import tiny_model, tiny_tokenizer

TEXTS = ["hello there", "a", "abc def ghi", "The cat", "xyz", "12345 678", "q", "GRPO rollouts"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def full_model(tokenizer):
    return tiny_model(tokenizer, hidden_size=64, seed=1).eval()


@pytest.fixture(scope="module")
def nf4_lora_model(tokenizer, tmp_path_factory):
    """The tiny model in NF4 (fp32 compute, so that greedy ties cannot differ by rounding) with a
    LoRA adapter whose B matrices are nonzero: the adapter changes the outputs."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(tokenizer, hidden_size=64, seed=1).save_pretrained(folder)
    quantisation = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantisation, device_map={"": "cpu"},
                                                dtype=torch.float32)
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in base.modules())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    from grpo_fast.model import keep_nf4_layout_for_training

    keep_nf4_layout_for_training(model)  # as the trainer's models: bitsandbytes' standard NF4 layout throughout
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def _prompts(tokenizer, texts=TEXTS):
    return [tokenizer.encode(text) for text in texts]


def _params(tokenizer, **overrides):
    values = dict(num_generations=1, max_completion_length=MAX_NEW, eos_token_ids=(tokenizer.eos_token_id,),
                  pad_token_id=tokenizer.pad_token_id, top_k=1)
    values.update(overrides)
    return SamplingParams(**values)


def _hf_greedy(model, prompts, pad_id, eos_ids, max_new=MAX_NEW, min_new=0):
    ids, mask = pad(prompts, pad_id, left=True)
    output = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                            min_new_tokens=min_new, pad_token_id=pad_id, eos_token_id=list(eos_ids) or None)
    return [cut_at_eos(row, eos_ids, max_new) for row in output[:, ids.shape[1]:].tolist()]


def _eos_mid_generation(model, prompts, pad_id):
    """Two token ids that greedy decoding emits early in one prompt and late in another: used as EOS,
    rows stop at different steps and some never do."""
    free = _hf_greedy(model, prompts, pad_id, ())
    return (free[0][1], free[2][MAX_NEW // 2])


# --------------------------------------------------------------------------------------------
# Greedy decoding equals Hugging Face generate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["full_model", "nf4_lora_model"])
def test_greedy_equals_hf_generate_with_padding_and_eos(request, tokenizer, which):
    model = request.getfixturevalue(which)
    prompts = _prompts(tokenizer)
    eos_ids = _eos_mid_generation(model, prompts, tokenizer.pad_token_id)
    expected = _hf_greedy(model, prompts, tokenizer.pad_token_id, eos_ids)
    lengths = [len(row) for row in expected]
    assert min(lengths) < MAX_NEW // 2 and max(lengths) == MAX_NEW, lengths  # stops mid-way, and some never
    engine = RolloutEngine(sync_every=2)
    output = engine.generate(model, prompts, _params(tokenizer, eos_token_ids=eos_ids, num_generations=4))
    assert output.completion_ids == [row for row in expected for _ in range(4)]
    # Finished rows dropped out: the batch shrank to the live rows (a power of two) along the way.
    rows = 4 * len(prompts)
    assert output.slots_per_step[0] == rows and output.slots_per_step[-1] < rows, output.slots_per_step


def _group_kv_bytes(model, prompts, params) -> int:
    """One group's cache, counted here from the model config (not the engine's code): the longest prompt's
    KV once (rounded up to 64 columns) and each row's completion."""
    config = model.config
    tokens = -(-max(map(len, prompts)) // 64) * 64 + params.num_generations * params.max_completion_length
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * tokens * 4  # fp32


@pytest.mark.parametrize("groups_per_wave", [1, 3])
def test_waves_within_a_kv_budget_equal_one_batch(tokenizer, full_model, groups_per_wave):
    """A budget that holds 1 or 3 groups' KV: the prompts decode in waves (slot counts show it), the
    greedy tokens and their log-probs are those of one big batch, in the prompts' order."""
    prompts = _prompts(tokenizer)
    eos_ids = _eos_mid_generation(full_model, prompts, tokenizer.pad_token_id)
    params = _params(tokenizer, num_generations=2, eos_token_ids=eos_ids)
    whole = RolloutEngine(sync_every=2).generate(full_model, prompts, params)
    budget = groups_per_wave * _group_kv_bytes(full_model, prompts, params) + 1
    engine = RolloutEngine(sync_every=2, max_kv_bytes=budget)
    assert engine.prompts_per_wave(full_model.config, prompts, params, torch.float32) == groups_per_wave
    waves = engine.generate(full_model, prompts, params)
    assert waves.completion_ids == whole.completion_ids
    for got, expected in zip(waves.logprobs, whole.logprobs):
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5)
    assert max(waves.slots_per_step) == 2 * groups_per_wave < max(whole.slots_per_step)
    assert len(waves.slots_per_step) > len(whole.slots_per_step)  # decoded wave after wave


def test_a_groups_prompt_kv_is_stored_once_as_the_memory_formula_says(tokenizer, full_model):
    """Three prompts (60, 40 and 13 tokens) x 4 rows: the cache holds 3 prompt slots (not 12 copies) at
    the longest prompt's length and 12 completion rows, exactly ModelShape.rollout_kv_bytes, the memory
    estimate's term; the tokens are those of Hugging Face generate (each row attends to its group's slot)."""
    from grpo_fast.config import GRPOConfig
    from grpo_fast.memory import ModelShape, estimate

    prompts = _prompts(tokenizer, ["abc def ghi " * 5, "The cat " * 5, "GRPO rollouts"])
    assert list(map(len, prompts)) == [60, 40, 13]
    params = _params(tokenizer, num_generations=4, max_completion_length=70)
    engine = _KeepCacheEngine()
    assert engine(full_model, prompts, params) == [row for row in _hf_greedy(
        full_model, prompts, tokenizer.pad_token_id, params.eos_token_ids, max_new=70) for _ in range(4)]
    cache = engine._cache
    allocated = sum(tensor.numel() * tensor.element_size() for layer in cache.layers
                    for tensor in (layer.prompt_keys, layer.prompt_values, layer.keys, layer.values))
    assert cache.layers[0].prompt_keys.shape[:3] == (3, full_model.config.num_key_value_heads, 64)
    assert cache.layers[0].keys.shape[:3] == (12, full_model.config.num_key_value_heads, 70)
    shape = ModelShape.from_config(full_model.config)
    assert allocated == shape.rollout_kv_bytes(3, 4, max(map(len, prompts)), 70, 4) == _group_kv_bytes(
        full_model, prompts, params) * 3
    config = GRPOConfig(prompts_per_step=3, num_generations=4, max_completion_length=70, dtype="float32")
    assert estimate(config, shape, prompt_length=max(map(len, prompts)), dtype_bytes=4).terms["rollout KV cache"] == allocated
    copied = 12 * (60 + 70) * shape.kv_bytes_per_token(4)  # a copy of the prompt per row, even unrounded
    assert allocated < copied


def test_slot_refill_starts_waiting_prompts_as_groups_finish(tokenizer, full_model):
    """A budget of two groups, eight prompts that stop at different steps, host checks every step: a
    slot whose group is done takes the next prompt while the other slot decodes on, so the call takes
    fewer decode steps than waves of two (each as long as its longest completion) would; the greedy
    tokens and log-probs are one big batch's and Hugging Face generate's."""
    prompts = _prompts(tokenizer)
    eos_ids = _eos_mid_generation(full_model, prompts, tokenizer.pad_token_id)
    params = _params(tokenizer, num_generations=2, eos_token_ids=eos_ids)
    expected = _hf_greedy(full_model, prompts, tokenizer.pad_token_id, eos_ids)
    whole = RolloutEngine(sync_every=1).generate(full_model, prompts, params)
    assert whole.completion_ids == [row for row in expected for _ in range(2)]
    engine = RolloutEngine(sync_every=1, max_kv_bytes=2 * _group_kv_bytes(full_model, prompts, params) + 1)
    refilled = engine.generate(full_model, prompts, params)
    assert refilled.completion_ids == whole.completion_ids
    for got, want in zip(refilled.logprobs, whole.logprobs):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert max(refilled.slots_per_step) == 4
    lengths = [len(row) for row in expected]
    in_waves = sum(max(lengths[start:start + 2]) - 1 for start in range(0, len(prompts), 2))
    assert len(refilled.slots_per_step) < in_waves, (len(refilled.slots_per_step), in_waves)


class _FusedSamplingEngine(RolloutEngine):
    """The one-pass sampling kernel on CPU (the Triton interpreter): draws keyed by (output row, step)."""

    def _fused_sampling(self, params, device):
        from grpo_fast.engine import fused_sampling_supported

        return fused_sampling_supported(params)


def test_sampling_with_slot_refill_is_deterministic_and_the_models(tokenizer, full_model, monkeypatch):
    """Sampled (temperature 0.9, EOS suppressed for 2 steps) within a budget of one group, its slot refilled:
    the same seed gives the same completions; the log-probs are a full forward pass's; with the one-pass
    kernel each row's draw is keyed by its output row and step, so the refilled run samples what one big
    batch samples."""
    prompts = _prompts(tokenizer)[:3]
    eos_ids = _eos_mid_generation(full_model, _prompts(tokenizer), tokenizer.pad_token_id)
    params = _params(tokenizer, num_generations=2, eos_token_ids=eos_ids, top_k=0, temperature=0.9,
                     min_completion_length=2, max_completion_length=6)
    budget = _group_kv_bytes(full_model, prompts, params) + 1  # one group at a time
    first = RolloutEngine(sync_every=2, max_kv_bytes=budget).generate(full_model, prompts, params, seed=4)
    again = RolloutEngine(sync_every=2, max_kv_bytes=budget).generate(full_model, prompts, params, seed=4)
    assert first.completion_ids == again.completion_ids and first.logprobs == again.logprobs
    assert all(len(row) >= 3 or row[-1] not in eos_ids for row in first.completion_ids)
    assert_logprobs_are_the_models(full_model, prompts, first, 2, 0.9, tokenizer.pad_token_id)
    import grpo_fast.kernels.sampling as sampling_module

    monkeypatch.setattr(sampling_module, "sample_block", lambda: 512)  # the whole vocabulary per program: fast to interpret
    fused = _FusedSamplingEngine(sync_every=2, max_kv_bytes=budget).generate(full_model, prompts, params, seed=4)
    one_batch = _FusedSamplingEngine(sync_every=2).generate(full_model, prompts, params, seed=4)
    assert fused.completion_ids == one_batch.completion_ids
    assert len(set(map(tuple, fused.completion_ids))) > 3  # sampling: a group's two rows differ
    assert_logprobs_are_the_models(full_model, prompts, fused, 2, 0.9, tokenizer.pad_token_id)


def test_a_kv_budget_below_one_group_decodes_one_group_at_a_time_with_a_warning(tokenizer, full_model):
    """A prompt longer than the trainer sized the budget for: the engine goes over the budget by one
    group rather than failing mid-run, and says so."""
    prompts = _prompts(tokenizer)[:2]
    params = _params(tokenizer, num_generations=4)
    engine = RolloutEngine(max_kv_bytes=_group_kv_bytes(full_model, prompts, params) - 1)
    with pytest.warns(UserWarning, match="exceeds max_kv_bytes"):
        output = engine.generate(full_model, prompts, params)
    assert output.completion_ids == RolloutEngine().generate(full_model, prompts, params).completion_ids
    assert max(output.slots_per_step) == 4  # one group at a time
    with pytest.raises(ValueError, match="max_kv_bytes: expected a positive number"):
        RolloutEngine(max_kv_bytes=0)


def test_nf4_lora_adapter_is_used(tokenizer, nf4_lora_model):
    prompts = _prompts(tokenizer)
    params = _params(tokenizer)
    with_adapter = RolloutEngine()(nf4_lora_model, prompts, params)
    with nf4_lora_model.disable_adapter():
        without_adapter = RolloutEngine()(nf4_lora_model, prompts, params)
        assert without_adapter == _hf_greedy(nf4_lora_model, prompts, tokenizer.pad_token_id, params.eos_token_ids)
    assert with_adapter != without_adapter


def test_groups_share_the_prompt_and_compaction_keeps_results(tokenizer, full_model):
    prompts = _prompts(tokenizer)[:3]
    eos_ids = _eos_mid_generation(full_model, _prompts(tokenizer), tokenizer.pad_token_id)
    params = _params(tokenizer, num_generations=4, eos_token_ids=eos_ids)
    expected = _hf_greedy(full_model, prompts, tokenizer.pad_token_id, eos_ids)
    for engine in (RolloutEngine(sync_every=1), RolloutEngine(compact=False), RolloutEngine(sync_every=100)):
        completions = engine(full_model, prompts, params)
        assert completions == [row for row in expected for _ in range(4)]


def test_min_completion_length_suppresses_eos(tokenizer, full_model):
    prompts = _prompts(tokenizer)
    eos_ids = _eos_mid_generation(full_model, prompts, tokenizer.pad_token_id)
    expected = _hf_greedy(full_model, prompts, tokenizer.pad_token_id, eos_ids, min_new=10)
    completions = RolloutEngine()(full_model, prompts, _params(tokenizer, eos_token_ids=eos_ids, min_completion_length=10))
    assert completions == expected
    assert min(len(row) for row in completions) >= 11  # EOS at step 10 at the earliest
    forced = RolloutEngine()(full_model, prompts, _params(tokenizer, eos_token_ids=eos_ids, min_completion_length=MAX_NEW))
    assert all(len(row) == MAX_NEW and not set(row[:-1]) & set(eos_ids) for row in forced)


def test_prefill_mask_is_causal_skips_padding_and_never_empty():
    from grpo_fast.engine import _prefill_mask

    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = _prefill_mask(prompt_mask)[:, 0]
    assert mask.shape == (2, 4, 4)
    assert torch.equal(mask[1], torch.ones(4, 4, dtype=torch.bool).tril())
    # real queries see real keys up to themselves; padding queries see only themselves (a fully
    # masked row would give NaN in some sdpa kernels, and NaN would reach the cached values)
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expected)


class _KeepCacheEngine(RolloutEngine):
    """Keeps its KV buffers between calls, as with CUDA graphs (the decode step stays eager)."""

    def _uses_cuda_graphs(self, device):
        return True

    def _compile_step(self):
        from grpo_fast.engine import _decode_step

        return _decode_step


def test_kept_cache_is_reused_across_calls_and_shapes(tokenizer, full_model):
    engine, caches = _KeepCacheEngine(sync_every=3), []
    # the second call reuses the first one's longer buffers, stale keys and values included
    for texts, max_new in ((TEXTS, 60), (TEXTS[::-1], MAX_NEW), (TEXTS[:3], 7), (TEXTS, MAX_NEW)):
        prompts = _prompts(tokenizer, texts)
        expected = _hf_greedy(full_model, prompts, tokenizer.pad_token_id, (tokenizer.eos_token_id,), max_new=max_new)
        assert engine(full_model, prompts, _params(tokenizer, max_completion_length=max_new)) == expected
        caches.append(engine._cache)
    assert caches[0] is caches[1] and caches[2] is not caches[1]
    assert (caches[1].prompt_length, caches[1].completion_length) == (64, 60)  # 13 tokens rounded up, and 60
    assert (caches[2].slots, caches[2].capacity) == (3, 3)
    plain = RolloutEngine()  # without CUDA graphs the buffers are freed after each call
    plain(full_model, _prompts(tokenizer), _params(tokenizer))
    assert plain._cache is None


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_equals_hf_generate_qwen2_grouped_query_attention(tokenizer, attention):
    # Qwen2: 4 query heads sharing 2 KV heads, q/k/v biases; both mask formats (sdpa: boolean, eager: additive).
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation=attention)
    model = Qwen2ForCausalLM(config).eval()
    prompts = _prompts(tokenizer)
    eos_ids = _eos_mid_generation(model, prompts, tokenizer.pad_token_id)
    expected = _hf_greedy(model, prompts, tokenizer.pad_token_id, eos_ids)
    assert RolloutEngine(sync_every=2)(model, prompts, _params(tokenizer, eos_token_ids=eos_ids)) == expected


class _TracedEngine(RolloutEngine):
    """The CUDA-graph code path on CPU: the decode step goes through dynamo as ONE graph (fullgraph;
    the eager backend, as inductor's CUDA graphs need a GPU), so a graph break would fail here."""

    def _uses_cuda_graphs(self, device):
        return self.cuda_graphs

    def _compile_step(self):
        from grpo_fast.engine import _decode_step

        return torch.compile(_decode_step, backend="eager", fullgraph=True, dynamic=False)


def test_decode_step_traces_as_one_graph_nf4_lora(tokenizer, nf4_lora_model):
    prompts = _prompts(tokenizer)[:4]
    eos_ids = _eos_mid_generation(nf4_lora_model, _prompts(tokenizer), tokenizer.pad_token_id)
    params = _params(tokenizer, num_generations=2, eos_token_ids=eos_ids)
    expected = RolloutEngine()(nf4_lora_model, prompts, params)
    from torch._dynamo.utils import counters

    engine = _TracedEngine(sync_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to eager
        assert engine(nf4_lora_model, prompts, params) == expected
        assert engine.cuda_graphs and engine._compiled_step is not None
        # The next call of the same shapes (a training step's) reuses the graphs: no recompilation.
        counters.clear()
        assert engine(nf4_lora_model, prompts, params) == expected
        assert counters["stats"]["unique_graphs"] == 0


def test_fused_decode_step_traces_as_one_graph_of_at_most_15_kernels_per_layer(tokenizer, nf4_lora_model,
                                                                                 monkeypatch):
    """As on CUDA: the decode loop inside fused_nf4_decode and with the decode attention kernel (forced
    here: the Triton interpreter), every NF4 linear (LoRA included, q/k/v and gate/up grouped) and the
    attention one opaque op of the single traced graph, the tokens those of the plain engine; the
    step's kernels per layer, counted from that graph (benchmarks.static.step_kernels), at most 15 (the plain
    engine's step: twice that)."""
    import grpo_fast.kernels.decode_attention as attention_module
    import grpo_fast.kernels.nf4_decode as kernel_module
    from benchmarks.static.step_kernels import count_kernels, decode_step_graphs
    from grpo_fast.nf4 import fused_nf4_decode

    class Fused(RolloutEngine):
        def _nf4_decode(self, decoder, device):
            return fused_nf4_decode(decoder, force=True)

        def _fused_attention(self, config, implementation, device, dtype=None):
            return implementation == "sdpa"

    prompts = _prompts(tokenizer)[:2]
    params = _params(tokenizer, max_completion_length=3)
    launches = []
    for module in (kernel_module, attention_module):
        launch = module._launch
        monkeypatch.setattr(module, "_launch", lambda *a, launch=launch, **k: launches.append(1) or launch(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to eager
        fused, completions = decode_step_graphs(Fused, nf4_lora_model, prompts, params)
        plain, expected = decode_step_graphs(RolloutEngine, nf4_lora_model, prompts, params)
    assert completions == expected and launches
    layers = nf4_lora_model.config.num_hidden_layers
    counts, plain_counts = count_kernels(fused[0].graph, layers), count_kernels(plain[0].graph, layers)
    assert counts.max_per_layer <= 15, counts
    assert counts.extern_ops == {"aten.mm": 4 * layers + 1, "grpo_fast.nf4_decode": 4 * layers,
                                 "hop.auto_functionalized_v2": layers}  # LoRA-A per shared input, head; attention
    assert plain_counts.max_per_layer >= 2 * counts.max_per_layer, plain_counts


def test_compile_failure_falls_back_to_eager_with_a_warning(tokenizer, full_model):
    class Failing(_TracedEngine):
        def _compile_step(self):
            def fail(*args):
                raise RuntimeError("no graph today")
            return fail

    prompts = _prompts(tokenizer)[:3]
    engine = Failing()
    with pytest.warns(UserWarning, match="compiling the decode step failed .RuntimeError: no graph today.; decoding eagerly"):
        completions = engine(full_model, prompts, _params(tokenizer))
    assert completions == RolloutEngine()(full_model, prompts, _params(tokenizer))
    assert not engine.cuda_graphs


# --------------------------------------------------------------------------------------------
# Sampling: log-probs, seeds, filters
# --------------------------------------------------------------------------------------------


def assert_logprobs_are_the_models(model, prompts, output, group: int, temperature: float, pad_id: int) -> None:
    """The engine's sampled-token log-probs equal log_softmax(logits / temperature) of one full forward
    pass of the model over prompt + completion (the loss's quantity: before EOS suppression and filtering)."""
    prompt_ids, prompt_mask = pad([p for p in prompts for _ in range(group)], pad_id, left=True)
    completion_ids, present = pad(output.completion_ids, pad_id, left=False)
    mask = torch.cat([prompt_mask, present], dim=1)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
    width = prompt_ids.shape[1]
    expected = torch.log_softmax(logits[:, width - 1:-1] / temperature, -1).gather(-1, completion_ids[..., None])[..., 0]
    actual = torch.zeros_like(expected)
    for row, values in enumerate(output.logprobs):
        actual[row, : len(values)] = torch.tensor(values)
    torch.testing.assert_close(actual[present.bool()], expected[present.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["full_model", "nf4_lora_model"])
def test_sampled_logprobs_match_a_full_forward_pass(request, tokenizer, which):
    model = request.getfixturevalue(which)
    prompts = _prompts(tokenizer)[:4]
    temperature = 0.7
    # EOS suppressed for 3 steps: the log-probs stay those of the unsuppressed distribution (the loss's)
    params = _params(tokenizer, num_generations=3, top_k=0, top_p=0.95, temperature=temperature, min_completion_length=3)
    output = RolloutEngine(sync_every=4).generate(model, prompts, params, seed=3)
    assert_logprobs_are_the_models(model, prompts, output, 3, temperature, tokenizer.pad_token_id)
    assert all(len(ids) == len(values) for ids, values in zip(output.completion_ids, output.logprobs))


def test_seeds_make_sampling_reproducible(tokenizer, full_model):
    prompts = _prompts(tokenizer)[:4]
    params = _params(tokenizer, num_generations=4, top_k=0)
    first = RolloutEngine(seed=1)(full_model, prompts, params)
    assert RolloutEngine(seed=1)(full_model, prompts, params) == first
    assert RolloutEngine(seed=2)(full_model, prompts, params) != first
    engine = RolloutEngine()
    assert engine.generate(full_model, prompts, params, seed=1).completion_ids == first
    engine = RolloutEngine(seed=1)  # an engine seed starts one stream that later calls continue
    assert engine(full_model, prompts, params) == first and engine(full_model, prompts, params) != first
    torch.manual_seed(5)  # without a seed: drawn from torch's global RNG, so manual_seed reproduces it
    unseeded = RolloutEngine()(full_model, prompts, params)
    torch.manual_seed(5)
    assert RolloutEngine()(full_model, prompts, params) == unseeded


def _sampling_params(**overrides):
    values = dict(num_generations=1, max_completion_length=1, eos_token_ids=(0,), pad_token_id=0)
    return SamplingParams(**{**values, **overrides})


def test_sampling_follows_the_distribution():
    # 40,000 draws from a fixed 6-token distribution: frequencies within 0.01 of softmax (seeded).
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]).repeat(40_000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_tokens(logits, _sampling_params(), 5, torch.tensor([5]), generator)
    frequencies = torch.bincount(tokens, minlength=6).float() / len(tokens)
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.01, rtol=0)
    torch.testing.assert_close(logprobs, logits[0].log_softmax(-1)[tokens])
    # EOS (token 5 here) is never drawn before min_completion_length, and its log-prob is unchanged.
    tokens, _ = sample_tokens(torch.tensor([[-5.0, -5.0, -5.0, -5.0, -5.0, 9.0]] * 1000),
                              _sampling_params(min_completion_length=1), 0, torch.tensor([5]), generator)
    assert not (tokens == 5).any()
    # per row (the engine's steps): only the rows still short of it have EOS (tokens 4 and 5) suppressed,
    # and every log-prob is the unfiltered distribution's
    logits = torch.tensor([[-5.0, -5.0, -5.0, 1.0, 9.0, 8.0]] * 4)
    tokens, logprobs = sample_tokens(logits, _sampling_params(min_completion_length=2, top_k=1),
                                     torch.tensor([0, 1, 2, 7]), torch.tensor([4, 5]), None)
    assert tokens.tolist() == [3, 3, 4, 4]
    torch.testing.assert_close(logprobs, logits[0].log_softmax(-1)[tokens])


def test_race_draws_of_zero_never_pick_a_filtered_token():
    from grpo_fast.engine import race_argmax

    probs = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.5, 0.0, 0.5, 0.0]])
    race = torch.tensor([[0.0, 1.0, 1.0, 0.5], [2.0, 0.0, 0.0, 1.0]])  # zeros, as float32 draws can give
    assert race_argmax(probs, race).tolist() == [1, 2]


@pytest.mark.parametrize("option", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2), dict(top_k=4, top_p=0.8, min_p=0.05)])
def test_filters_equal_hugging_face_warpers(option):
    from test_engine_truncation import hugging_face_warpers

    scores = torch.randn(16, 37) * 3
    expected = hugging_face_warpers(scores, option)
    filtered = filter_logits(scores, option.get("top_k", 0), option.get("top_p", 1.0), option.get("min_p", 0.0))
    assert torch.equal(torch.isinf(filtered), torch.isinf(expected))
    assert torch.isinf(filtered).any(dim=-1).all()  # each option removes something here


def test_filters_restrict_the_support(tokenizer, full_model):
    logits = torch.randn(2000, 50) * 2
    generator = torch.Generator().manual_seed(0)
    top3 = logits.topk(3, dim=-1).indices
    tokens, _ = sample_tokens(logits, _sampling_params(top_k=3), 1, torch.tensor([0]), generator)
    assert (tokens[:, None] == top3).any(-1).all()
    assert len(set(tokens.tolist())) > 3  # different rows, different supports: still sampling
    probs = logits.softmax(-1)
    tokens, _ = sample_tokens(logits, _sampling_params(min_p=0.999), 1, torch.tensor([0]), generator)
    # min_p near 1: only the argmax survives (and a near-tie within 0.1%, in a few of these rows)
    assert (probs.gather(-1, tokens[:, None])[:, 0] >= 0.999 * probs.amax(-1)).all()
    assert (tokens == logits.argmax(-1)).float().mean() > 0.99
    tokens, _ = sample_tokens(logits, _sampling_params(top_p=0.6), 1, torch.tensor([0]), generator)
    # the chosen token's rank: the mass of the strictly more likely tokens must be below top_p
    above = (probs * (probs > probs.gather(-1, tokens[:, None]))).sum(-1)
    assert (above < 0.6).all()
    # through the engine: min_p near 1 at T=1 samples the greedy tokens
    prompts = _prompts(tokenizer)
    greedy = RolloutEngine()(full_model, prompts, _params(tokenizer))
    assert RolloutEngine(seed=0)(full_model, prompts, _params(tokenizer, top_k=0, min_p=0.9999)) == greedy
    assert hf_generate(full_model, prompts, _params(tokenizer, top_k=0, min_p=0.9999)) == greedy  # honoured there too
    assert hf_generate(full_model, prompts, _params(tokenizer, top_k=0)) != greedy


# --------------------------------------------------------------------------------------------
# Stop strings and errors
# --------------------------------------------------------------------------------------------


def test_stop_strings_cut_after_the_first_match(tokenizer, full_model):
    prompts = _prompts(tokenizer)
    greedy = RolloutEngine()(full_model, prompts, _params(tokenizer))
    stop = tokenizer.decode(greedy[0][3:5])  # occurs in row 0 by construction
    params = _params(tokenizer, stop_strings=(stop,))
    completions = RolloutEngine(sync_every=3, tokenizer=tokenizer)(full_model, prompts, params)
    for row, full in zip(completions, greedy):
        cuts = [count for count in range(1, len(full) + 1) if stop in tokenizer.decode(full[:count])]
        assert row == full[: cuts[0]] if cuts else row == full
    assert len(completions[0]) <= 5 and stop in tokenizer.decode(completions[0])
    # Hugging Face generate with the same stop string (greedy through top_k=1) gives the same rows.
    assert hf_generate(full_model, prompts, params, tokenizer=tokenizer) == completions


@pytest.mark.parametrize("field,value,message", [
    ("temperature", 0.0, "temperature: expected a positive number"),
    ("top_p", 0.0, "top_p: expected a value in (0, 1]"),
    ("top_k", -1, "top_k: expected an integer >= 0"),
    ("min_p", 1.5, "min_p: expected a value in [0, 1]"),
    ("min_completion_length", MAX_NEW + 1, "min_completion_length: expected an integer in [0, max_completion_length"),
    ("max_completion_length", 0, "max_completion_length: expected an integer >= 1"),
    ("eos_token_ids", (), "eos_token_ids: expected at least one token id"),
    ("stop_strings", ("",), "stop_strings: expected a tuple of non-empty strings"),
])
def test_bad_sampling_params_name_the_field(tokenizer, full_model, field, value, message):
    params = _params(tokenizer, **{field: value})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        RolloutEngine()(full_model, _prompts(tokenizer), params)
    with pytest.raises(ValueError, match=field):
        hf_generate(full_model, _prompts(tokenizer), params)


def test_sliding_window_models_are_refused_where_the_window_matters(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=16,
                         max_window_layers=1, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    prompts = [tokenizer.encode("abc")]
    with pytest.raises(ValueError, match="model: expected full attention over the 27 prompt .* sliding-window layers of 16"):
        RolloutEngine()(model, prompts, _params(tokenizer))
    # within the window, sliding and full attention agree
    short = _params(tokenizer, max_completion_length=10)
    assert RolloutEngine()(model, prompts, short) == _hf_greedy(model, prompts, tokenizer.pad_token_id,
                                                                 short.eos_token_ids, max_new=10)


def test_other_bad_arguments_name_the_argument(tokenizer, full_model):
    with pytest.raises(ValueError, match="tokenizer: expected a tokenizer to match stop_strings"):
        RolloutEngine()(full_model, _prompts(tokenizer), _params(tokenizer, stop_strings=("x",)))
    with pytest.raises(ValueError, match="tokenizer: expected a tokenizer to match stop_strings"):
        hf_generate(full_model, _prompts(tokenizer), _params(tokenizer, stop_strings=("x",)))
    with pytest.raises(ValueError, match="prompt_ids: expected non-empty prompts, received an empty prompt at index 1"):
        RolloutEngine()(full_model, [[5], []], _params(tokenizer))
    with pytest.raises(ValueError, match="sync_every: expected an integer >= 1, received 0"):
        RolloutEngine(sync_every=0)


# --------------------------------------------------------------------------------------------
# The trainer's choice of sampler
# --------------------------------------------------------------------------------------------


def test_rollout_engine_config_key():
    from grpo_fast.config import GRPOConfig
    from grpo_fast.trainer import rollout_sampler

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert rollout_sampler(GRPOConfig(), cpu).func is hf_generate
    assert isinstance(rollout_sampler(GRPOConfig(), cuda), RolloutEngine)
    assert isinstance(rollout_sampler(GRPOConfig(rollout_engine="engine"), cpu), RolloutEngine)
    assert rollout_sampler(GRPOConfig(rollout_engine="hf"), cuda).func is hf_generate
    with pytest.raises(ValueError, match=r"rollout_engine: expected one of \['auto', 'engine', 'hf'\], received 'vllm'"):
        GRPOConfig(rollout_engine="vllm")


def test_trainer_trains_with_the_engine(tmp_path):
    import json

    from grpo_fast.config import GRPOConfig
    from grpo_fast.trainer import train

    config = GRPOConfig(output_dir=str(tmp_path), run_name="engine", rollout_engine="engine", max_steps=2,
                        prompts_per_step=2, num_generations=4, max_completion_length=6, progress_bar=False,
                        save_every=0, plot=False)
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "engine" / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert all(math.isfinite(record["loss"]) and 1 <= record["completions/mean_length"] <= 6 for record in records)
    assert result.history[-1]["grad_norm"] > 0


def test_resumed_run_with_the_engine_samples_as_an_uninterrupted_one(tmp_path):
    # The engine draws each call's seed from torch's global RNG, which checkpoints save and restore.
    import json
    import shutil

    from grpo_fast.config import GRPOConfig
    from grpo_fast.trainer import train

    config = dict(output_dir=str(tmp_path), rollout_engine="engine", max_steps=4, prompts_per_step=2,
                  num_generations=4, max_completion_length=6, progress_bar=False, plot=False, save_every=2)
    straight = train(GRPOConfig(run_name="straight", **config))
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_000002",
                    tmp_path / "resumed" / "checkpoints" / "step_000002")
    resumed = train(GRPOConfig(run_name="resumed", resume=True, **config))
    assert [record["step"] for record in resumed.history] == [3, 4]
    for key in ("reward/mean", "completions/mean_length", "loss"):
        assert [record[key] for record in resumed.history] == [record[key] for record in straight.history[2:]], key
    expected = dict(straight.model.named_parameters())
    for name, parameter in resumed.model.named_parameters():
        torch.testing.assert_close(parameter, expected[name], rtol=0, atol=0, msg=name)
    assert json.loads((tmp_path / "resumed" / "log.jsonl").read_text().splitlines()[0])["step"] == 3


def test_decode_attention_reads_kv_heads_as_sdpa_with_repeated_kv_would():
    """One query token, 8 query heads on 2 KV heads, a padding mask: the grouped computation equals
    sdpa on K/V expanded to every query head (transformers' repeat_kv order)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import repeat_kv

    from grpo_fast.engine import decode_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 8, 1, 16, generator=generator)
    key, value = torch.randn(2, 3, 2, 11, 16, generator=generator).unbind(0)
    mask = torch.rand(3, 1, 1, 11, generator=generator) > 0.3
    mask[..., 0] = True
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    out, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask, scale=0.25).transpose(1, 2)
    assert out.shape == (3, 1, 8, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_split_attention_over_the_shared_prompt_equals_sdpa_over_gathered_copies():
    """The CPU path without a copy (rows slot-major: a slot's rows' queries meet its prompt keys in one
    product) against the gathered path: each row's prompt KV copied next to its completion, sdpa masked."""
    from types import SimpleNamespace

    from grpo_fast.engine import SLOT_CACHE_KEYWORD, SlotCache, decode_attention

    generator = torch.Generator().manual_seed(0)
    slots, group, kv_heads, heads, head_dim = 2, 3, 2, 4, 16
    cache = SlotCache(num_layers=1, slots=slots, capacity=slots * group, prompt_length=8, completion_length=5,
                      device=torch.device("cpu"))
    cache.prefill_slots = torch.arange(slots)
    prompt_states = torch.randn(2, slots, kv_heads, 8, head_dim, generator=generator)
    cache.layers[0].update(*prompt_states)
    cache.prefill_slots = None
    cache.set_batch(slots * group)
    cache.start_rows(torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32), torch.tensor([3] * 3 + [0] * 3,
                                                                                       dtype=torch.int32), group)
    cache.row_position[:6] = torch.tensor([0, 2, 4, 1, 3, 4], dtype=torch.int32)
    layer = cache.layers[0]
    layer.keys.copy_(torch.randn(layer.keys.shape, generator=generator))
    layer.values.copy_(torch.randn(layer.values.shape, generator=generator))
    query = torch.randn(6, heads, 1, head_dim, generator=generator)
    new = torch.randn(2, 6, kv_heads, 1, head_dim, generator=generator).unbind(0)
    mask = cache.attention_mask()[:, None, None, :]
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, layer_idx=0)
    cache.split_attention = True
    assert layer.update(*new)[0] is new[0]  # the new token written, nothing gathered
    split, _ = decode_attention(module, query, *new, mask, scaling=0.25, **{SLOT_CACHE_KEYWORD: cache})
    cache.split_attention = False
    gathered_keys, gathered_values = layer.update(*new)  # writes the same token again, then gathers
    assert gathered_keys.shape == (6, kv_heads, 8 + 5, head_dim)
    expected, _ = decode_attention(module, query, gathered_keys, gathered_values, mask, scaling=0.25)
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-6)


def test_compiled_decode_step_keeps_compiling_past_dynamo_default_limit(tokenizer, full_model):
    """Each (batch size, cache length) is one graph; a run makes more than dynamo's default limit of 8,
    after which dynamo would silently run the step uncompiled."""
    from torch._dynamo.utils import counters

    engine = _TracedEngine(sync_every=64, compact=False)
    prompts = _prompts(tokenizer)[:1]
    counters.clear()
    for group in range(1, 11):  # ten batch sizes: ten graphs
        params = _params(tokenizer, num_generations=group, max_completion_length=2)
        assert engine(full_model, prompts, params) == RolloutEngine()(full_model, prompts, params)
    assert counters["stats"]["unique_graphs"] == 10
