"""The CUDA-only paths, run by `pytest -m gpu` on a GPU (skipped elsewhere, tests/conftest.py).

What no CPU test can reach: the Triton kernels compiled (not interpreted) in bf16 / fp16 at a 7B
head's shape, cuBLAS's fp32-output products, the rollout engine with CUDA graphs, compaction and
the fused NF4 matmul against the same engine eager and Hugging Face `generate`, the NF4 custom op
inside an inductor-compiled graph, the NF4 split-K reducer's rounds compiled, and the trainer on CUDA. The rule for the loss is the CPU
suite's: a fused backend's error against float64 may not exceed the eager reference's in the same
dtype, plus a small tolerance.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

from benchmarks.logprob_accuracy import realistic_head
from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs
from grpo_fast.reference import reference_grpo_loss
from test_loss import assert_close_to_oracle

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
H_7B, V_7B = 3584, 152064  # Qwen2.5-7B's lm_head


def _count_calls(monkeypatch, module, name: str) -> list:
    """Calls of ``module.name`` from now on (one entry each), the function still doing its work."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@contextlib.contextmanager
def _no_eager_fallback(engine):
    """The engine keeps its compiled CUDA-graph step: no "decoding eagerly" warning, ``cuda_graphs`` still
    on. Other warnings (e.g. inductor's note that TF32 is off for an fp32 matmul) are not failures."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "decoding eagerly" in str(w.message)]
    assert not fallbacks, fallbacks
    assert engine.cuda_graphs, "the engine gave up its CUDA graphs"


def _head_case(dtype, tokens=256, rows=4, max_logit=24.0, seed=0):
    hidden, weight, ids = realistic_head(tokens, H_7B, V_7B, max_logit, dtype, seed=seed, device=CUDA)
    hidden, ids = hidden.view(rows, tokens // rows, H_7B), ids.view(rows, tokens // rows)
    mask = torch.ones_like(ids)
    mask[1, tokens // rows // 2:] = 0  # a shorter completion
    with torch.no_grad():
        exact = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, ids[..., None]).squeeze(-1)
    g = torch.Generator(device=CUDA).manual_seed(seed)
    old = (exact - 0.3 * torch.randn(exact.shape, generator=g, device=CUDA, dtype=torch.float64)).float()
    ref = (exact + 0.3 * torch.randn(exact.shape, generator=g, device=CUDA, dtype=torch.float64)).float()
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2], device=CUDA)[:rows]
    return hidden, weight, ids, mask, advantages, old, ref


def _run(backend, hidden, weight, ids, mask, advantages, old, ref, config, threshold=None):
    as64 = backend == "float64"
    h = (hidden.double() if as64 else hidden).detach().requires_grad_(True)
    w = (weight.double() if as64 else weight).detach().requires_grad_(True)
    if as64:
        out = reference_grpo_loss(h, w, ids, mask.bool(), advantages.double(), old.double(), ref.double(), None, config,
                                  logit_threshold=threshold)
    else:
        out = grpo_loss(h, w, ids, mask, advantages=advantages, old_logps=old, ref_logps=ref, config=config,
                        backend=backend, logit_threshold=threshold)
    out.loss.backward()
    result = {"loss": out.loss.detach().double(), "logps": out.logps.double() * mask,
              "d_hidden": h.grad.double(), "d_weight": w.grad.double()}
    del h, w, out
    return result


def _assert_oracle_rule(case, config, dtype):
    """The compiled Triton backend's error against float64 within the eager reference's (same dtype)."""
    exact = _run("float64", *case, config)
    eager = _run("reference", *case, config)
    fused = _run("triton", *case, config)
    assert_close_to_oracle(fused, eager, exact, dtype, "compiled triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_loss_matches_float64_at_a_7b_head(dtype):
    case = _head_case(dtype)
    config = GRPOLossConfig(loss_type="grpo", beta=0.04, epsilon_high=0.28, chunk_size=96)
    _assert_oracle_rule(case, config, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_truncated_loss_matches_float64_at_a_7b_head(dtype):
    """The kernels' threshold variant (top-p 0.9 replayed, ``logit_threshold``) compiled at a 7B head: within
    the eager reference's error against float64, and its training log-probs the no-grad pass's."""
    from grpo_fast.truncation import truncation_threshold

    case = _head_case(dtype)
    hidden, weight, ids, mask = case[:4]
    with torch.no_grad():
        threshold = truncation_threshold((hidden.double() @ weight.double().T).float(), 0, 0.9, 0.0)
    config = GRPOLossConfig(loss_type="grpo", beta=0.04, epsilon_high=0.28, chunk_size=96)
    exact, eager, fused = (_run(backend, *case, config, threshold=threshold)
                           for backend in ("float64", "reference", "triton"))
    assert_close_to_oracle(fused, eager, exact, dtype, "compiled triton, truncated")
    no_grad = token_logprobs(hidden, weight, ids, completion_mask=mask, chunk_size=96, backend="triton",
                             logit_threshold=threshold)
    assert torch.equal(no_grad.double() * mask, fused["logps"])


@pytest.mark.parametrize("options", [
    dict(loss_type="cispo", epsilon_high=1.3, beta=0.04),
    dict(loss_type="sapo", entropy_coef=0.05),
    dict(loss_type="grpo", importance_sampling_level="sequence", top_entropy_quantile=0.5, entropy_coef=0.02),
    dict(loss_type="vespo", off_policy_mask_threshold=0.1, beta=0.04, kl_bias_correction=True),
], ids=["cispo", "sapo-entropy", "seq-top-entropy", "vespo-off-policy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_loss_types_match_float64(options, dtype):
    case = _head_case(dtype, tokens=128, seed=3)
    config = GRPOLossConfig(chunk_size=48, **options)
    _assert_oracle_rule(case, config, dtype)


def test_compiled_logit_transform_matches_float64():
    hidden, weight, ids = realistic_head(64, 512, 32000, 40.0, torch.bfloat16, seed=1, device=CUDA)
    mask = torch.ones_like(ids)
    config = GRPOLossConfig(logit_scale=0.5, logit_softcap=15.0, beta=0.0)
    h64 = hidden.double().requires_grad_(True)
    exact = reference_grpo_loss(h64, weight.double(), ids, mask.bool(), torch.ones(1, device=CUDA, dtype=torch.float64),
                                None, None, None, config)
    exact.loss.backward()
    h = hidden.clone().requires_grad_(True)
    out = grpo_loss(h, weight, ids, mask, advantages=torch.ones(1, device=CUDA), config=config, backend="triton")
    out.loss.backward()
    assert (out.logps.double() - exact.logps).abs().max().item() <= 1e-4
    err = (h.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()
    assert err.item() <= 2e-2


def test_compiled_training_logps_are_the_no_grad_logps_at_a_7b_head():
    hidden, weight, ids, mask, advantages, old, ref = _head_case(torch.bfloat16, seed=2)
    config = GRPOLossConfig(beta=0.04, chunk_size=96)
    no_grad = token_logprobs(hidden, weight, ids, completion_mask=mask, backend="triton", chunk_size=96)
    out = grpo_loss(hidden.clone().requires_grad_(True), weight, ids, mask, advantages=advantages,
                    old_logps=no_grad, ref_logps=no_grad, config=config, backend="triton")
    assert torch.equal(out.logps, no_grad)  # the same chunks read by the same code: ratio exactly 1
    assert out.metrics["kl"].item() == 0.0
    other = token_logprobs(hidden, weight, ids, completion_mask=mask, backend="triton", chunk_size=50)
    on_chip = token_logprobs(hidden, weight, ids, completion_mask=mask, backend="triton", on_chip=True)
    assert (other - no_grad).abs().max().item() <= 1e-5
    assert (on_chip - no_grad).abs().max().item() <= 5e-5
    # and they are fp32 log-probs: far closer to float64 than log-probs of bf16-rounded logits
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T
        exact = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1) * mask
        rounded = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, ids[..., None]).squeeze(-1) * mask
    assert (no_grad.double() - exact).abs().max() < (rounded.double() - exact).abs().max() / 100


def test_compiled_fp16_gradients_survive_every_loss_scale():
    from test_numerics import SCALES, _fp16_d_hidden_errors

    eager = _fp16_d_hidden_errors("reference", SCALES)
    fused = _fp16_d_hidden_errors("triton", SCALES)
    for scale, e, f in zip(SCALES, eager, fused):
        assert math.isfinite(f) and f <= (e if math.isfinite(e) else math.inf) + 2e-3, (scale, f, e)


def test_compiled_trained_head_accumulates_in_fp32():
    from test_numerics import test_trained_head_gradient_accumulates_in_fp32

    test_trained_head_gradient_accumulates_in_fp32("triton")


@pytest.mark.parametrize("options", [{}, {"delta": 1.5}, {"loss_type": "cispo", "epsilon_high": 5.0},
                                     {"loss_type": "sapo"}], ids=["clip", "delta", "cispo", "sapo"])
@pytest.mark.parametrize("poison", ["hidden-nan", "hidden-inf", "old-nan"])
def test_compiled_loss_is_non_finite_for_non_finite_inputs(options, poison):
    """Compiled Triton's minimum / maximum return the other operand of a NaN unless told to propagate
    it (the interpreter's numpy fmin does the same): the bf16 loss must still turn non-finite."""
    hidden, weight, ids, mask, advantages, old, _ = _head_case(torch.bfloat16, tokens=64)
    hidden = hidden.clone()
    if poison == "old-nan":
        old = old.clone()
        old[0, 3] = math.nan
    else:
        hidden[0, 3, 5] = math.nan if poison == "hidden-nan" else math.inf
    out = grpo_loss(hidden.requires_grad_(True), weight, ids, mask, advantages=advantages, old_logps=old,
                    config=GRPOLossConfig(**options), backend="triton")
    assert not math.isfinite(float(out.loss)), (options, poison, float(out.loss))


# ----------------------------------------------------------------------------------------------
# The NF4 matmul and the rollout engine
# ----------------------------------------------------------------------------------------------


def test_nf4_custom_op_in_an_inductor_graph_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    from grpo_fast.nf4 import FusedNF4Linear

    layer = bnb.nn.Linear4bit(3584, 512, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(512, 3584) * 0.02, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    layer = layer.to(CUDA)
    fused = FusedNF4Linear(layer)
    x = torch.randn(8, 3584, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x).float()
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            compiled = torch.compile(fused, mode=mode, fullgraph=True)
            for _ in range(3):  # reduce-overhead records its CUDA graph on a later call
                got = compiled(x).float()
            err = (got - expected).abs().max() / expected.abs().max()
            assert err.item() <= 2e-2, (mode, err.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_nf4_split_k_reducer_rounds_on_the_k_proj_shape(dtype):
    """k_proj's shape (512 x 3584) split 28 ways, as the sm_90 plan split it at 1-8 rows: the reducing
    program adds the partials several a round (reduce_group), in split order: the same bits as one
    split per round, the same bits every call (tickets reset), and the unsplit product within rounding."""
    import dataclasses

    from grpo_fast.kernels.nf4_decode import default_decode_config, nf4_decode_matmul, reduce_group, repack_nf4
    from grpo_fast.kernels.nf4_matmul import NF4Weight

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    dense = torch.randn(512, 3584, device=CUDA) * 0.02
    packed, state = bnb_functional.quantize_4bit(dense.to(dtype), blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    weight = repack_nf4([NF4Weight.from_bnb(packed, state)])
    dequantised = bnb_functional.dequantize_4bit(packed, state).float()
    x = torch.randn(8, 3584, device=CUDA, dtype=dtype)
    base = default_decode_config(8, CUDA)
    split = dataclasses.replace(base, splits=28)
    assert reduce_group(28, split.block_ns[0], split.block_mx, split.num_warps) > 1
    with torch.no_grad():
        first = nf4_decode_matmul(x, weight, config=split)
        assert int(weight.counters.abs().sum()) == 0
        assert torch.equal(first, nf4_decode_matmul(x, weight, config=split))
        assert torch.equal(first, nf4_decode_matmul(x, weight, config=dataclasses.replace(split, reduce_group=1)))
        whole = nf4_decode_matmul(x, weight, config=dataclasses.replace(base, splits=1)).float()
        expected = x.float() @ dequantised.T
    scale = expected.abs().max()
    assert ((first.float() - whole).abs().max() / scale).item() <= 1e-2
    assert ((first.float() - expected).abs().max() / scale).item() <= 2e-2


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_lm import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def qwen2_nf4_lora(tokenizer, tmp_path_factory):
    """A small Qwen2 (grouped-query attention, q/k/v biases) in NF4 with bf16 compute on CUDA and a
    LoRA adapter with nonzero B; its head is scaled up so that greedy choices are never near-ties
    (bf16 paths that sum in another order must still pick the same tokens)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    folder = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(folder)
    quantisation = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantisation, device_map={"": CUDA},
                                                dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def test_engine_with_cuda_graphs_and_fused_nf4_matches_eager_and_generate(tokenizer, qwen2_nf4_lora, monkeypatch):
    import grpo_fast.kernels.nf4_decode as kernel_module
    from grpo_fast.engine import RolloutEngine
    from grpo_fast.rollout import SamplingParams, cut_at_eos, pad

    model = qwen2_nf4_lora
    texts = ["hello there", "a", "abc def ghi", "The cat", "xyz", "12345 678", "q", "GRPO rollouts"]
    prompts = [tokenizer.encode(text) for text in texts]
    max_new = 40
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=True)
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[:, ids.shape[1]:].tolist()
    eos_ids = (free[0][3], free[2][max_new // 2])  # rows stop at different steps: compaction runs
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=list(eos_ids))
    expected = [cut_at_eos(row, eos_ids, max_new) for row in output[:, ids.shape[1]:].tolist()]
    params = SamplingParams(num_generations=4, max_completion_length=max_new, eos_token_ids=eos_ids,
                            pad_token_id=tokenizer.pad_token_id, top_k=1)
    import grpo_fast.kernels.decode_attention as attention_module
    from torch._dynamo.utils import counters

    launches = {"nf4": [], "attention": []}
    for name, module in (("nf4", kernel_module), ("attention", attention_module)):
        launch = module._launch
        monkeypatch.setattr(module, "_launch",
                            lambda *a, name=name, launch=launch, **k: launches[name].append(1) or launch(*a, **k))
    counters.clear()
    import grpo_fast.engine as engine_module

    samples = _count_calls(monkeypatch, engine_module, "sample_fused")
    engine = RolloutEngine(sync_every=4)
    with _no_eager_fallback(engine):
        graphs = engine.generate(model, prompts, params)
    assert samples, "the one-pass sampling kernel did not run"
    assert launches["nf4"], "the fused NF4 matmul did not run"
    assert launches["attention"], "the decode attention kernel did not run"
    # the step really replays CUDA graphs (inductor skips them, silently, e.g. for mutated non-static inputs)
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    eager = RolloutEngine(sync_every=4, cuda_graphs=False, fused_nf4=False).generate(model, prompts, params)
    repeated = [row for row in expected for _ in range(4)]
    assert eager.completion_ids == repeated
    assert graphs.completion_ids == repeated
    # within a KV budget of three groups: waves of 3, 3 and 2 prompts, the same tokens
    config = model.config
    # a group: its prompt's KV once (the longest prompt, rounded up to 64) and 4 rows' completions (40)
    tokens = -(-max(map(len, prompts)) // 64) * 64 + 4 * max_new
    group_bytes = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size //
                                                                               config.num_attention_heads) * tokens * 2
    waves = RolloutEngine(sync_every=4, max_kv_bytes=3 * group_bytes).generate(model, prompts, params)
    assert waves.completion_ids == repeated and max(waves.slots_per_step) == 12
    assert graphs.slots_per_step[-1] < graphs.slots_per_step[0]  # finished rows were compacted out
    # the sampled tokens' log-probs: the engine's against a full forward pass of the same model
    for output in (graphs, eager):
        rows = [p + c for p, c in zip([p for p in prompts for _ in range(4)], output.completion_ids)]
        batch, batch_mask = pad(rows, tokenizer.pad_token_id, left=False)
        with torch.no_grad():
            logits = model(input_ids=batch.to(CUDA), attention_mask=batch_mask.to(CUDA)).logits.float()
        log_probs = torch.log_softmax(logits, -1)
        for index, (prompt, completion) in enumerate(zip([p for p in prompts for _ in range(4)], output.completion_ids)):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1, device=CUDA)
            forward = log_probs[index, positions, torch.tensor(completion, device=CUDA)]
            got = torch.tensor(output.logprobs[index], device=CUDA)
            assert (got - forward).abs().max().item() <= 0.05, index


def test_engine_shares_long_prompts_under_cuda_graphs_with_the_attention_kernel(tokenizer, qwen2_nf4_lora,
                                                                               monkeypatch):
    """Prompts of ~150-300 tokens x 8 rows each, greedy, CUDA graphs + the decode attention kernel: one
    prompt slot per prompt (not per row), the tokens of Hugging Face generate, the log-probs of a forward
    pass; with a budget of two groups (two slots, refilled) the same tokens, and sampled completions that
    a seed reproduces."""
    import dataclasses

    import grpo_fast.kernels.decode_attention as attention_module
    from grpo_fast.engine import RolloutEngine
    from grpo_fast.rollout import SamplingParams, cut_at_eos, pad

    model = qwen2_nf4_lora
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (length,), generator=generator).tolist() for length in (150, 300, 220, 170)]
    max_new, group = 24, 8
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=True)
    with torch.no_grad():
        output = model.generate(input_ids=ids.to(CUDA), attention_mask=mask.to(CUDA), do_sample=False,
                                max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    expected = [cut_at_eos(row, (tokenizer.eos_token_id,), max_new) for row in output[:, ids.shape[1]:].tolist()]
    params = SamplingParams(num_generations=group, max_completion_length=max_new,
                            eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id, top_k=1)
    import grpo_fast.engine as engine_module

    launches = _count_calls(monkeypatch, attention_module, "_launch")
    samples = _count_calls(monkeypatch, engine_module, "sample_fused")
    engine = RolloutEngine(sync_every=4)
    with _no_eager_fallback(engine):
        result = engine.generate(model, prompts, params)
    assert launches, "the decode attention kernel did not run"
    assert samples, "the one-pass sampling kernel did not run (greedy)"
    assert result.completion_ids == [row for row in expected for _ in range(group)]
    layer = engine._cache.layers[0]
    assert layer.prompt_keys.shape[:3] == (4, model.config.num_key_value_heads, 320)  # 300 -> 320: one per prompt
    assert layer.keys.shape[:3] == (4 * group, model.config.num_key_value_heads, max_new)
    rows = [p for p in prompts for _ in range(group)]
    batch, batch_mask = pad([p + c for p, c in zip(rows, result.completion_ids)], tokenizer.pad_token_id, left=False)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=batch.to(CUDA), attention_mask=batch_mask.to(CUDA)).logits.float(), -1)
    for index, (prompt, completion) in enumerate(zip(rows, result.completion_ids)):
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1, device=CUDA)
        forward = log_probs[index, positions, torch.tensor(completion, device=CUDA)]
        assert (torch.tensor(result.logprobs[index], device=CUDA) - forward).abs().max().item() <= 0.05, index
    per_token = model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_attention_heads) * 2
    two_groups = 2 * (320 + group * max_new) * per_token
    waves = RolloutEngine(sync_every=4, max_kv_bytes=two_groups).generate(model, prompts, params)
    assert waves.completion_ids == result.completion_ids and max(waves.slots_per_step) == 2 * group
    # sampled with the one-pass kernel, slots refilled under CUDA graphs: a seed reproduces the completions
    sampled = dataclasses.replace(params, top_k=0, temperature=0.9, min_completion_length=2)
    samples.clear()
    first, again = (RolloutEngine(sync_every=4, max_kv_bytes=two_groups).generate(model, prompts, sampled, seed=7)
                    for _ in range(2))
    assert samples, "the one-pass sampling kernel did not run (sampled)"
    assert first.completion_ids == again.completion_ids and len(set(map(tuple, first.completion_ids))) > 4
    assert all(len(row) >= 2 for row in first.completion_ids)  # min_completion_length held by the kernel


def _trainer_kernels(monkeypatch) -> dict:
    """Counters of the fused paths a CUDA training run must take: the loss's fused Triton pass, the
    engine's one-pass sampling and its fused NF4 decode matmul."""
    import grpo_fast.engine as engine_module
    import grpo_fast.kernels.nf4_decode as nf4_module
    import grpo_fast.loss as loss_module

    return {"loss": _count_calls(monkeypatch, loss_module, "fused_grpo_loss"),
            "sampling": _count_calls(monkeypatch, engine_module, "sample_fused"),
            "nf4": _count_calls(monkeypatch, nf4_module, "_launch")}


def _assert_trained(result, kernels: dict, steps: int) -> None:
    """Every step finite and logged, the fused paths taken, and the adapter moved: peft starts LoRA's B at
    zero, so a nonzero B means the optimiser applied gradients that reached the adapter."""
    import bitsandbytes as bnb

    assert [record["step"] for record in result.history] == list(range(1, steps + 1))
    for record in result.history:
        for key in ("loss", "grad_norm", "reward/mean", "entropy", "completions/mean_length"):
            assert math.isfinite(record[key]), (key, record)
        assert record["completions/mean_length"] > 0
    assert any(record["grad_norm"] > 0 for record in result.history)
    for name, count in kernels.items():
        assert count, f"the fused {name} path did not run"
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in result.model.modules()), "the base is not NF4"
    lora_b = [p for name, p in result.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.detach().abs().max().item() > 0 for p in lora_b), "the LoRA adapter never moved"


def test_trainer_step_on_cuda_with_the_engine(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from grpo_fast.config import GRPOConfig
    from grpo_fast.trainer import train

    kernels = _trainer_kernels(monkeypatch)
    config = GRPOConfig(max_steps=3, load_in_4bit=True, dtype="bfloat16", output_dir=str(tmp_path), run_name="gpu",
                        save_every=0, rollout_engine="engine", beta=0.04, num_iterations=2)
    result = train(config)
    _assert_trained(result, kernels, 3)
    assert any(record.get("kl", 0.0) != 0.0 for record in result.history[1:])  # beta > 0: the KL is computed


def test_trainer_fp16_step_on_cuda_with_loss_scaling(tmp_path, monkeypatch):
    # a T4 / V100-class run: NF4 with fp16 compute, LoRA, GradScaler, the engine sampling in fp16
    pytest.importorskip("bitsandbytes")
    from grpo_fast.config import GRPOConfig
    from grpo_fast.trainer import train

    kernels = _trainer_kernels(monkeypatch)
    config = GRPOConfig(max_steps=3, load_in_4bit=True, dtype="float16", output_dir=str(tmp_path), run_name="fp16",
                        save_every=0, rollout_engine="engine", beta=0.04, num_iterations=2)
    result = train(config)
    _assert_trained(result, kernels, 3)
    assert all(record["grad_scale"] > 0 for record in result.history)
