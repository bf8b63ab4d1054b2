"""Models whose logits are transformed after the lm_head (Gemma's soft cap, Cohere's and Granite's
scales): the fused log-probs and loss, the rollout engine, the trainer and FusedGRPOTrainer use the
model's own distribution; unknown transforms are refused, naming the config field. Tiny fp32
models built in code, their heads scaled so that raw logits reach ~20: the cap (5) and the
scales (1/4) change the distribution, and each test shows the identity would fail it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from grpo_fast.engine import RolloutEngine, _decode_step
from grpo_fast.logits import IDENTITY, LogitTransform, check_logits, logit_transform
from grpo_fast.loss import GRPOLossConfig, grpo_loss, token_logprobs
from grpo_fast.model import check_model_logits
from grpo_fast.rollout import SamplingParams, pad
from helpers import needs_bnb_cpu_repack
from tiny_lm import RecordGradients, tiny_model, tiny_tokenizer

VOCAB = 258  # tiny_lm's byte tokenizer: 256 bytes, <pad>, <eos>
TEMPERATURE = 0.7

# family -> (transformers config class, model class, the fields that transform the logits)
FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=5.0, head_dim=16,
                                                          query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=5.0, head_dim=16,
                                                              query_pre_attn_scalar=16)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
}
EXPECTED = {"gemma2": LogitTransform(softcap=5.0), "gemma3": LogitTransform(softcap=5.0),
            "cohere": LogitTransform(scale=0.25), "granite": LogitTransform(scale=0.25)}


def transformed_lm(family: str, seed: int = 0):
    """A 2-layer fp32 model of ``family`` sized to tiny_lm's tokenizer, untied head with raw logits ~20."""
    import transformers

    config_name, model_name, fields = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=256,
        eos_token_id=257, bos_token_id=None, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 1.0)  # normed hidden states of size 32: raw logits up to ~20
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 256, 257
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, transformed_lm(request.param)


def _log_softmax_at(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids[..., None])[..., 0]


# --------------------------------------------------------------------------------------------
# Reading the transform from the config
# --------------------------------------------------------------------------------------------


class _ConfigOnly:
    """What logit_transform reads of a model: its config and its lm_head."""

    def __init__(self, config, head_bias: bool = False):
        self.config, self.head = config, torch.nn.Linear(4, 4, bias=head_bias)

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("config_name, fields, expected", [
    ("Gemma2Config", dict(final_logit_softcapping=30.0), LogitTransform(softcap=30.0)),
    ("Gemma2Config", dict(final_logit_softcapping=None), IDENTITY),
    ("Gemma4Config", dict(text_config=dict(final_logit_softcapping=30.0)), LogitTransform(softcap=30.0)),
    ("VaultGemmaConfig", dict(final_logit_softcapping=30.0), LogitTransform(softcap=30.0)),
    ("NanoChatConfig", dict(final_logit_softcapping=15.0), LogitTransform(softcap=15.0)),
    ("Cohere2Config", dict(logit_scale=0.0625), LogitTransform(scale=0.0625)),
    ("GraniteMoeHybridConfig", dict(logits_scaling=8.0), LogitTransform(scale=0.125)),
    ("GraniteMoeSharedConfig", dict(logits_scaling=1.0), IDENTITY),
    ("FalconH1Config", dict(lm_head_multiplier=0.5), LogitTransform(scale=0.5)),
    ("HyperCLOVAXConfig", dict(logits_scaling=0.25), LogitTransform(scale=0.25)),
    ("MiniCPM3Config", dict(hidden_size=1280, dim_model_base=320), LogitTransform(scale=0.25)),
    ("MuseSparkConfig", dict(text_config=dict(output_multiplier=0.125, final_logit_softcapping=20.0)),
     LogitTransform(scale=0.125, softcap=20.0)),
    ("LlamaConfig", dict(), IDENTITY),
    ("Qwen2Config", dict(), IDENTITY),
])
def test_the_transform_is_read_from_the_config(config_name, fields, expected):
    import transformers

    assert logit_transform(_ConfigOnly(getattr(transformers, config_name)(**fields))) == expected


def test_a_plain_model_has_the_identity_even_under_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_model(tiny_tokenizer())
    assert logit_transform(model) == IDENTITY == LogitTransform(1.0, None)
    capped = transformed_lm("gemma2")
    peft_model = get_peft_model(capped, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert logit_transform(peft_model) == LogitTransform(softcap=5.0)


@pytest.mark.parametrize("config_name, fields, message", [
    # a field grpo-fast knows from another family, on a model of a family where it means nothing known
    ("LlamaConfig", dict(logits_scaling=2.0), r"^model\.config\.logits_scaling: expected None .*received 2\.0; "
                                              r"the logits of .* are transformed in a way grpo-fast does not know"),
    ("Qwen2Config", dict(final_logit_softcapping=30.0), r"^model\.config\.final_logit_softcapping: .*received 30\.0"),
    ("LlamaConfig", dict(hidden_size=64, dim_model_base=16), r"^model\.config\.dim_model_base: .*received 16"),
    # Gemma3ForConditionalGeneration's forward does not apply its text config's cap: refused, not guessed
    ("Gemma3Config", dict(text_config=dict(final_logit_softcapping=30.0)),
     r"^model\.config\.text_config\.final_logit_softcapping: .*received 30\.0"),
    ("DoryConfig", dict(), r"^model: .*'dory' model .*learned per-token scale"),
    ("CohereConfig", dict(logit_scale=0.0),
     r"^model\.config\.logit_scale: expected a finite number > 0, received 0\.0"),
])
def test_unknown_or_invalid_transforms_are_refused_naming_the_field(config_name, fields, message):
    import transformers

    config = getattr(transformers, config_name)()
    for name, value in fields.items():  # set after construction: extra attributes as a hub config would carry them
        if name == "text_config":
            for text_name, text_value in value.items():
                setattr(config.get_text_config(), text_name, text_value)
        else:
            setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        logit_transform(_ConfigOnly(config))


def test_minicpm3_with_a_head_bias_is_refused():
    from transformers import MiniCPM3Config

    with pytest.raises(ValueError, match=r"^model\.lm_head\.bias: expected None"):
        logit_transform(_ConfigOnly(MiniCPM3Config(), head_bias=True))


def test_apply_matches_the_kernels_definition_and_keeps_its_input():
    x = torch.randn(3, 7, dtype=torch.bfloat16) * 20
    original = x.clone()
    z = LogitTransform(scale=0.5, softcap=4.0).apply(x)
    assert z.dtype == torch.float32 and torch.equal(x, original)
    torch.testing.assert_close(z, 4.0 * torch.tanh(0.5 * x.float() / 4.0))
    assert LogitTransform(scale=0.5, softcap=4.0).loss_keywords() == {"logit_scale": 0.5, "logit_softcap": 4.0}
    with pytest.raises(ValueError, match=r"^softcap: expected a finite number > 0 or None, received -1"):
        LogitTransform(softcap=-1)


# --------------------------------------------------------------------------------------------
# The fused log-probs and loss against the model's own logits
# --------------------------------------------------------------------------------------------


def test_fused_logprobs_and_loss_are_the_models(family_model):
    family, model = family_model
    transform = logit_transform(model)
    assert transform == EXPECTED[family]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 9), generator=generator)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state[:, :-1]
        logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    expected = _log_softmax_at(logits, targets, TEMPERATURE)
    weight = model.lm_head.weight.detach()
    for backend in ("torch", "triton"):
        logps = token_logprobs(hidden, weight, targets, temperature=TEMPERATURE, backend=backend,
                               **transform.loss_keywords())
        torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5, msg=backend)
        config = GRPOLossConfig(temperature=TEMPERATURE, **transform.loss_keywords())
        output = grpo_loss(hidden, weight, targets, torch.ones_like(targets),
                           advantages=torch.randn(2, generator=generator), config=config, backend=backend)
        torch.testing.assert_close(output.logps, expected, rtol=1e-5, atol=1e-5, msg=backend)
    ignored = token_logprobs(hidden, weight, targets, temperature=TEMPERATURE, backend="torch")
    assert (ignored - expected).abs().max() > 0.5  # without the transform: another distribution


def test_the_safety_net_catches_a_wrong_transform(family_model):
    family, model = family_model
    check_model_logits(model, logit_transform(model))
    wrong = IDENTITY if family.startswith("gemma") else LogitTransform(softcap=5.0)
    with pytest.raises(ValueError, match=r"^model: expected logits = f\(the decoder's last_hidden_state @ lm_head"):
        check_model_logits(model, wrong)
    input_ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        outputs = model(input_ids=input_ids, output_hidden_states=True)
    check_logits(model, outputs.hidden_states[-1], outputs.logits, logit_transform(model))
    with pytest.raises(ValueError, match="use something else$"):
        check_logits(model, outputs.hidden_states[-1], outputs.logits, wrong, advice="; use something else")


@needs_bnb_cpu_repack
def test_the_safety_net_keeps_nf4_weights_in_their_training_layout():
    """check_model_logits runs an eval-mode no-grad forward: on a fresh 4-bit model it must not let
    bitsandbytes repack the weights for its CPU inference kernel (the trainer could not train it)."""
    from grpo_fast.config import GRPOConfig
    from grpo_fast.model import keep_nf4_layout_for_training, load_model

    model, _ = load_model(GRPOConfig(load_in_4bit=True, lora_r=4))
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on a freshly built layer
    check_model_logits(model, logit_transform(model))
    keep_nf4_layout_for_training(model)  # raises if the check's forward repacked them


# --------------------------------------------------------------------------------------------
# The rollout engine samples from the model's own distribution
# --------------------------------------------------------------------------------------------


class _TracedEngine(RolloutEngine):
    """The CUDA-graph code path on CPU: the decode step traced as one graph (tests/test_engine.py)."""

    def _uses_cuda_graphs(self, device):
        return self.cuda_graphs

    def _compile_step(self):
        return torch.compile(_decode_step, backend="eager", fullgraph=True, dynamic=False)


def _engine_logprobs_against_the_model(engine, model):
    prompts, group = [[72, 101, 108], [97], [84, 104, 101, 32]], 2
    params = SamplingParams(num_generations=group, max_completion_length=6, eos_token_ids=(257,), pad_token_id=256,
                            temperature=TEMPERATURE, top_k=0)
    output = engine.generate(model, prompts, params, seed=3)
    prompt_ids, prompt_mask = pad([p for p in prompts for _ in range(group)], 256, left=True)
    completion_ids, present = pad(output.completion_ids, 256, left=False)
    mask = torch.cat([prompt_mask, present], dim=1)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        raw = model.lm_head(model.get_decoder()(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                                                attention_mask=mask,
                                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state)
    width = prompt_ids.shape[1]
    expected = _log_softmax_at(logits[:, width - 1:-1], completion_ids, TEMPERATURE)
    untransformed = _log_softmax_at(raw[:, width - 1:-1], completion_ids, TEMPERATURE)
    received = torch.zeros_like(expected)
    for row, values in enumerate(output.logprobs):
        received[row, : len(values)] = torch.tensor(values)
    keep = present.bool()
    return received[keep], expected[keep], untransformed[keep]


def test_engine_logprobs_are_the_models(family_model):
    _, model = family_model
    received, expected, untransformed = _engine_logprobs_against_the_model(RolloutEngine(sync_every=2), model)
    torch.testing.assert_close(received, expected, rtol=1e-4, atol=1e-4)
    assert (untransformed - expected).abs().max() > 0.5


def test_engine_transform_traces_in_the_one_graph_decode_step():
    model = transformed_lm("gemma3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to eager
        engine = _TracedEngine(sync_every=2)
        received, expected, _ = _engine_logprobs_against_the_model(engine, model)
    assert engine._compiled_step is not None
    torch.testing.assert_close(received, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# grpo-fast's trainer
# --------------------------------------------------------------------------------------------


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


ROWS = [{"prompt": "What is 2 + 3?"}, {"prompt": "Say hi."}]


def test_trainer_step_on_gemma2(tmp_path):
    """One step of train() on a soft-capped model: the logged entropy is that of the model's own
    distribution, and the KL to the reference (the same weights before the step) is 0, so the
    no-grad reference pass and the loss read the same, transformed, log-probs."""
    import copy

    from grpo_fast.config import GRPOConfig
    from grpo_fast.rollout import hf_generate
    from grpo_fast.trainer import train

    tokenizer, model = tiny_tokenizer(), transformed_lm("gemma2")
    initial, sampled = copy.deepcopy(model), []

    def generate(model, prompt_ids, params):
        completions = hf_generate(model, prompt_ids, params, tokenizer=tokenizer)
        sampled.extend((list(prompt), completion) for prompt, completion in
                       zip([p for p in prompt_ids for _ in range(params.num_generations)], completions))
        return completions

    config = GRPOConfig(output_dir=str(tmp_path), max_steps=1, prompts_per_step=2, num_generations=2,
                        max_completion_length=4, micro_batch_size=4, beta=0.1, temperature=TEMPERATURE,
                        progress_bar=False, save_every=0, plot=False)
    result = train(config, model=model, tokenizer=tokenizer, dataset=ROWS, reward_functions=[length_reward],
                   generate=generate)
    record = result.history[0]
    entropies = {"model": [], "untransformed": []}
    with torch.no_grad():
        for prompt, completion in sampled:
            input_ids = torch.tensor([prompt + completion])
            span = slice(len(prompt) - 1, -1)
            logits = initial(input_ids=input_ids).logits[0, span]
            raw = initial.lm_head(initial.get_decoder()(input_ids=input_ids).last_hidden_state)[0, span]
            for name, values in (("model", logits), ("untransformed", raw)):
                log_probs = torch.log_softmax(values.float() / TEMPERATURE, -1)
                entropies[name].append(-(log_probs.exp() * log_probs).sum(-1))
    expected, untransformed = (float(torch.cat(values).mean()) for values in entropies.values())
    assert record["entropy"] == pytest.approx(expected, rel=1e-4)
    assert abs(untransformed - expected) > 0.1
    assert record["kl"] == pytest.approx(0.0, abs=1e-6) and math.isfinite(record["loss"])


def test_trainer_refuses_an_unknown_transform(tmp_path):
    from grpo_fast.config import GRPOConfig
    from grpo_fast.trainer import train

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    model.config.logits_scaling = 2.0
    with pytest.raises(ValueError, match=r"^model\.config\.logits_scaling: expected None"):
        train(GRPOConfig(output_dir=str(tmp_path), max_steps=1, progress_bar=False), model=model, tokenizer=tokenizer,
              dataset=ROWS, reward_functions=[length_reward])


def test_trainer_loss_and_logprobs_are_the_models():
    """optimise's gradient and batch_logprobs' log-probs, against autograd on the model's own
    (soft-capped) logits: GRPO on-policy, ratio exp(logp - logp.detach()), dapo normalisation."""
    from grpo_fast.config import GRPOConfig
    from grpo_fast.rollout import hf_generate
    from grpo_fast.trainer import batch_logprobs, build_grad_scaler, generate_rollout, optimise

    tokenizer, model = tiny_tokenizer(), transformed_lm("gemma2")
    config = GRPOConfig(prompts_per_step=2, num_generations=2, max_completion_length=5, micro_batch_size=4,
                        temperature=TEMPERATURE, max_grad_norm=0.0)
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, ROWS, config, hf_generate)
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0])
    mask = rollout.completion_mask.bool()
    attention_mask = rollout.attention_mask
    width = rollout.prompt_ids.shape[1]
    parameters = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    logits = model(input_ids=rollout.input_ids, attention_mask=attention_mask,
                   position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    logps = _log_softmax_at(logits[:, width - 1:-1], rollout.completion_ids, TEMPERATURE)
    ratio = torch.exp(logps - logps.detach())
    (-(advantages[:, None] * ratio)[mask].sum() / mask.sum()).backward()
    expected = [p.grad.clone() for p in parameters]
    model.zero_grad()

    received = batch_logprobs(model, rollout, config, torch.device("cpu"))
    torch.testing.assert_close(received[mask], logps.detach()[mask], rtol=1e-5, atol=1e-5)
    optimizer = RecordGradients(parameters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = build_grad_scaler(config, model, torch.device("cpu"))  # disabled: not float16
    optimise(model, optimizer, scheduler, scaler, rollout, advantages, None, None, config, torch.device("cpu"))
    for index, (gradient, reference) in enumerate(zip(optimizer.gradients[0], expected)):
        torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-6, msg=f"parameter {index}")
    head = [index for index, p in enumerate(parameters) if p is model.lm_head.weight][0]
    assert optimizer.gradients[0][head].abs().max() > 0


# --------------------------------------------------------------------------------------------
# FusedGRPOTrainer against trl.GRPOTrainer
# --------------------------------------------------------------------------------------------


def test_fused_grpo_trainer_matches_trl_on_gemma2(tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import copy

    import trl

    from grpo_fast.integrations.trl import FusedGRPOTrainer
    from test_trl_integration import PROMPTS, grpo_config, loss_and_grads, make_batch

    tokenizer, model = tiny_tokenizer(), transformed_lm("gemma2")
    args = grpo_config(tmp_path, temperature=TEMPERATURE)
    common = dict(reward_funcs=[length_reward], train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                  processing_class=tokenizer)
    reference = trl.GRPOTrainer(model=copy.deepcopy(model), args=args, **common)
    fused = FusedGRPOTrainer(model=copy.deepcopy(model), args=copy.deepcopy(args), loss_backend="torch", **common)
    assert fused.logit_transform == LogitTransform(softcap=5.0)
    for trainer in (reference, fused):  # a KL term (set after construction: TRL would load a reference model)
        trainer.beta, trainer.args.use_bias_correction_kl = 0.04, True
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which does not run here
    inputs = make_batch(reference, torch.Generator().manual_seed(1))
    (trl_loss, trl_grads), (loss, grads) = (loss_and_grads(trainer, inputs) for trainer in (reference, fused))
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert trl_grads.keys() == grads.keys() and "lm_head.weight" in grads
    for name in trl_grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the no-grad passes (old / reference log-probs) too
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    with torch.no_grad():
        (trl_logps, _, _), (logps, _, _) = (
            trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, T)
            for trainer in (reference, fused))
    torch.testing.assert_close(logps, trl_logps, rtol=1e-5, atol=1e-5)
