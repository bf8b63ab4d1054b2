"""FusedGRPOTrainer in the scenarios TRL's own GRPO tests train, under TRL's default mixed precision
(``bf16=True``: fp32 weights, bf16 autocast; ``use_cpu=True`` lets it autocast on CPU): each run asserts
what TRL's tests assert (every trainable tensor changed, the loss and the scenario's metrics logged), and
the loss-level ones compare with trl.GRPOTrainer on the same batch. Tiny models built in code, one or two
steps. Every loss type trains once, each with another scenario; the loss-level comparisons of every loss
type and option are in test_trl_integration.py (fp32) and test_trl_precision.py (bf16 and fp16 autocast)."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from grpo_fast.integrations.trl import FusedGRPOTrainer  # noqa: E402
from test_trl_integration import PROMPTS, grpo_config, make_batch  # noqa: E402
from test_trl_precision import BF16_ROUNDING, FP32_HEAD, _assert_within, _compare, _trainers  # noqa: E402
from test_trl_precision import completion_text, train_and_check, varied_reward  # noqa: E402
from tiny_lm import save_tiny_model, tiny_model, tiny_tokenizer  # noqa: E402


async def async_length_reward(prompts, completions, **columns):
    return [float(len(completion_text(c)) % 4) for c in completions]


def reward_model(tokenizer):
    """A tiny sequence classifier (one score) as TRL's reward-model reward function."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                             pad_token_id=tokenizer.pad_token_id)
        return LlamaForSequenceClassification(config)


# architecture -> (config class, model class, fields): Qwen2 and six others; two MoEs with their auxiliary
# loss (Qwen3-MoE; GPT-OSS, with attention sinks and sliding-window layers), two with logit transforms
# (Gemma 2's soft cap, Cohere 2's scale) applied by the fused loss, and two MoEs whose sigmoid routers have
# no auxiliary loss: GLM-4-MoE (a dense first layer, shared experts) and Nemotron-H (hybrid Mamba-2 /
# attention / MoE layers; the Mamba layers run transformers' PyTorch path on CPU)
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, output_router_logits=True,
        router_aux_loss_coef=0.1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=5.0, head_dim=16,
                                                          query_pre_attn_scalar=16)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=0.25, head_dim=16)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8, output_router_logits=True,
        router_aux_loss_coef=0.1, rope_parameters=dict(rope_type="yarn", factor=2.0, beta_fast=32.0, beta_slow=1.0,
                                                       truncate=False, original_max_position_embeddings=128))),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, head_dim=16, n_group=1, topk_group=1)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp"], head_dim=16, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=8, n_routed_experts=4, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32)),
}
AUX_LOSS = ("qwen3_moe", "gpt_oss")


def architecture_model(name: str, tokenizer):
    import transformers

    config_name, model_name, fields = ARCHITECTURES[name]
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _lora(**options):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **options)


# scenario -> (GRPOConfig options, trainer keyword arguments (built from the tokenizer), metrics logged)
SCENARIOS = {
    "standard-grpo": (dict(loss_type="grpo"), {}, ()),
    "conversational-bnpo-accumulation": (dict(loss_type="bnpo", gradient_accumulation_steps=2,
                                              per_device_train_batch_size=2),
                                         dict(conversational=True), ()),
    "peft_config-dr_grpo-beta": (dict(loss_type="dr_grpo", beta=0.04), dict(peft_config=_lora()), ("kl",)),
    "peft_model-dapo": (dict(loss_type="dapo"), dict(peft_model=True), ()),
    "gradient_checkpointing-luspo-sequence": (
        dict(loss_type="luspo", importance_sampling_level="sequence", gradient_checkpointing=True),
        dict(peft_config=_lora()), ()),
    "rewards-cispo": (dict(loss_type="cispo", epsilon_high=1.2, reward_weights=[1.0, 0.5, 2.0]),
                      dict(rewards="several"), ("rewards/varied_reward/mean", "rewards/async_length_reward/mean",
                                                "cispo_clip_ratio")),
    "iterable-sapo": (dict(loss_type="sapo"), dict(iterable=True), ()),
    "num_iterations-vespo": (dict(loss_type="vespo", num_iterations=2, max_steps=2), {}, ("vespo/phi_seq_mean",)),
    "beta-reference_model-sequence": (dict(beta=0.04, importance_sampling_level="sequence", max_steps=2),
                                      dict(from_path=True), ("kl",)),
    "off_policy_mask": (dict(off_policy_mask_threshold=0.5, num_iterations=2, max_steps=2), {}, ()),
    "entropy-options": (dict(top_entropy_quantile=0.5, entropy_coef=0.01, use_adaptive_entropy=True),
                        {}, ("policy_loss", "entropy_coef")),
    "eval": (dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4), dict(eval=True), ()),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_trains_like_trl(tmp_path, scenario):
    options, kwargs, metrics = SCENARIOS[scenario]
    kwargs = dict(kwargs)
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    if kwargs.pop("from_path", False):  # TRL loads the reference model (beta > 0, no adapter) from the path
        model = str(save_tiny_model(tmp_path / "model"))
    if kwargs.pop("peft_model", False):
        model = peft.get_peft_model(model, _lora())
    prompts = PROMPTS
    if kwargs.pop("conversational", False):
        prompts = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    if kwargs.pop("eval", False):
        kwargs["eval_dataset"] = dataset
    if kwargs.pop("iterable", False):
        dataset = dataset.to_iterable_dataset()
    rewards = [varied_reward]
    if kwargs.pop("rewards", None) == "several":
        rewards = [varied_reward, async_length_reward, reward_model(tokenizer)]
        kwargs["reward_processing_classes"] = [None, None, tokenizer]
    options = {"max_steps": 1, "bf16": True, **options}
    trainer = FusedGRPOTrainer(model=model, reward_funcs=rewards, args=grpo_config(tmp_path, **options),
                               train_dataset=dataset, processing_class=tokenizer, **kwargs)
    assert trainer.accelerator.native_amp  # TRL's default: bf16 autocast
    train_and_check(trainer, ("entropy", "reward") + metrics)
    if options.get("eval_strategy"):
        assert any("eval_loss" in entry and "eval_reward" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_architectures_train(tmp_path, architecture):
    tokenizer = tiny_tokenizer()
    trainer = FusedGRPOTrainer(model=architecture_model(architecture, tokenizer), reward_funcs=[varied_reward],
                               args=grpo_config(tmp_path, max_steps=1, bf16=True),
                               train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                               processing_class=tokenizer)
    aux_loss = architecture in AUX_LOSS
    assert trainer.aux_loss_enabled == aux_loss
    train_and_check(trainer, ("entropy", "reward") + (("aux_loss",) if aux_loss else ()))


@pytest.mark.parametrize("architecture", ["qwen3_moe", "gemma2", "cohere2", "gpt_oss"])
def test_architectures_same_loss_as_trl(tmp_path, architecture):
    """The router's auxiliary loss (MoE) and the logit transforms under bf16 autocast: TRL's loss and
    gradients on the same batch (fp32 head: to fp32 rounding; TRL's bf16 head: within its rounding)."""
    trainers = _trainers(tmp_path, architecture_model(architecture, tiny_tokenizer()), bf16=True)
    inputs = make_batch(trainers[0], torch.Generator().manual_seed(7))
    (trl_loss, trl_grads, trl_metrics), (fp32_loss, fp32_grads, _), (loss, grads, metrics) = _compare(trainers, inputs)
    torch.testing.assert_close(loss, fp32_loss, rtol=1e-4, atol=1e-6)
    _assert_within(loss, trl_loss, BF16_ROUNDING, "loss")
    assert grads.keys() == fp32_grads.keys()
    for name in grads:
        _assert_within(grads[name], fp32_grads[name], FP32_HEAD, name)
    if architecture in AUX_LOSS:
        assert metrics["aux_loss"] == pytest.approx(trl_metrics["aux_loss"], rel=1e-5)
        assert any("router" in name or "gate" in name for name in grads)


def test_tool_mask_same_loss_as_trl(tmp_path):
    """Tool calling's loss-side input: tool-result tokens (tool_mask 0) are left out of the loss, as TRL does."""
    trainers = _trainers(tmp_path, tiny_model(tiny_tokenizer(), bias=True), bf16=True)
    inputs = make_batch(trainers[0], torch.Generator().manual_seed(8))
    inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
    inputs["tool_mask"][1:4, 1:3] = 0
    (_, trl_grads, _), (fp32_loss, fp32_grads, _), (loss, grads, _) = _compare(trainers, inputs)
    torch.testing.assert_close(loss, fp32_loss, rtol=1e-4, atol=1e-6)
    for name in grads:
        _assert_within(grads[name], fp32_grads[name], FP32_HEAD, name)
    without = _compare(trainers[2:], {k: v for k, v in inputs.items() if k != "tool_mask"})[0][0]
    assert (without - loss).abs() > 1e-4  # the mask changes the loss
