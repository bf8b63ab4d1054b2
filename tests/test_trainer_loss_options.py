"""The trainer's keys for TRL's other loss types and options: validated before any model loads,
trained end to end on the tiny model, and the sampler correction built from the engine's log-probs."""

import dataclasses
import math

import pytest
import torch

from grpo_fast.config import GRPOConfig
from grpo_fast.loss import sampler_correction
from grpo_fast.trainer import train

FAST = dict(max_steps=2, prompts_per_step=2, num_generations=4, max_completion_length=6, micro_batch_size=3,
            progress_bar=False, plot=False, save_every=0)


@pytest.mark.parametrize("options", [
    {"loss_type": "cispo", "epsilon_high": 5.0},
    {"loss_type": "sapo", "sapo_temperature_neg": 1.2},
    {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    {"loss_type": "vespo", "rollout_engine": "engine", "importance_sampling_correction": "token_mask"},
    {"entropy_coef": 0.05, "top_entropy_quantile": 0.5, "beta": 0.04},
    {"off_policy_mask_threshold": 0.0, "rollout_engine": "engine"},
    {"importance_sampling_correction": "sequence_truncate", "rollout_engine": "engine", "loss_type": "grpo"},
], ids=["cispo", "sapo", "luspo-seq", "vespo-is", "entropy", "off-policy", "is-sequence"])
def test_each_option_trains(tmp_path, options):
    result = train(GRPOConfig(output_dir=str(tmp_path), run_name="run", **FAST, **options))
    assert len(result.history) == 2
    for record in result.history:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    if options.get("loss_type") == "cispo":
        assert "cispo_clip_ratio" in result.history[0]
    if options.get("loss_type") == "vespo":
        assert "vespo/phi_seq_mean" in result.history[0]
    if "entropy_coef" in options:
        assert result.history[0]["entropy_coef"] == 0.05 and "policy_loss" in result.history[0]


def test_engine_sampler_correction_is_one_in_full_precision(tmp_path):
    # fp32 on CPU: the engine samples from the very distribution the training forward computes, so the
    # correction's ratios are 1 up to fp32 rounding (a wrong log-prob alignment would show here)
    result = train(GRPOConfig(output_dir=str(tmp_path), run_name="run", rollout_engine="engine",
                              importance_sampling_correction="token_truncate", **FAST))
    for record in result.history:
        assert abs(record["sampling/importance_sampling_ratio/min"] - 1.0) < 1e-4
        assert abs(record["sampling/importance_sampling_ratio/max"] - 1.0) < 1e-4
        assert record["sampling/sampling_logp_difference/max"] < 1e-4


@pytest.mark.parametrize("replay", [True, False])
def test_truncated_sampling_is_replayed(tmp_path, replay):
    # top_p 0.8: the engine draws from the kept tokens only, so the sampler's probability of a draw is
    # p / (kept mass). Replayed, the trainer scores that same truncated distribution and the first
    # iteration's ratio is 1 for every token; over the full vocabulary it is the kept mass, below 1.
    result = train(GRPOConfig(output_dir=str(tmp_path), run_name="run", rollout_engine="engine", top_p=0.8,
                              importance_sampling_correction="token_truncate", importance_sampling_clip_max=10.0,
                              replay_truncation=replay, **{**FAST, "max_steps": 1}))
    record = result.history[0]
    if replay:
        assert abs(record["sampling/importance_sampling_ratio/min"] - 1.0) < 1e-4
        assert abs(record["sampling/importance_sampling_ratio/max"] - 1.0) < 1e-4
    else:
        assert record["sampling/importance_sampling_ratio/max"] <= 1.0 + 1e-4
        assert record["sampling/importance_sampling_ratio/min"] < 0.95
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])


def test_sampler_correction_modes():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    diff = torch.tensor([[0.5, -1.0, 0.0], [-0.1, 0.0, 0.0]])  # a NaN sampler log-prob counts as no difference
    torch.testing.assert_close(sampler_correction(old, sampler, mask, "token_truncate", 0.5, 1.5),
                               diff.exp().clamp(0.5, 1.5))
    masked = diff.exp().masked_fill((diff.exp() < 0.5) | (diff.exp() > 1.5), 0.0)
    torch.testing.assert_close(sampler_correction(old, sampler, mask, "token_mask", 0.5, 1.5), masked)
    seq = diff.sum(-1, keepdim=True).exp()
    torch.testing.assert_close(sampler_correction(old, sampler, mask, "sequence_truncate", None, 1.2), seq.clamp(max=1.2))
    torch.testing.assert_close(sampler_correction(old, sampler, mask, "sequence_mask", 0.5, None),
                               seq.masked_fill(seq < 0.5, 0.0))
    with pytest.raises(ValueError, match="mode: expected one of"):
        sampler_correction(old, sampler, mask, "token")


@pytest.mark.parametrize("options,message", [
    ({"loss_type": "ppo"}, "loss_type: expected one of"),
    ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg: expected a value > 0"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile: expected a value in"),
    ({"importance_sampling_correction": "token"}, "importance_sampling_correction: expected one of"),
    ({"importance_sampling_correction": "token_mask", "rollout_engine": "hf"}, "importance_sampling_correction: expected none with rollout_engine hf"),
    ({"loss_type": "vespo", "importance_sampling_correction": "sequence_mask", "rollout_engine": "engine"},
     "importance_sampling_correction: expected none, token_truncate or token_mask with loss_type vespo"),
    ({"importance_sampling_clip_min": 2.0, "importance_sampling_clip_max": 1.0}, "importance_sampling_clip_min: expected <="),
    ({"entropy_coef_min": 0.5, "entropy_coef_max": 0.1}, "entropy_coef_min: expected <="),
    ({"off_policy_mask_threshold": -1.0}, "off_policy_mask_threshold: expected a value >= 0"),
])
def test_bad_options_name_the_key_before_the_model_loads(options, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**options)


def test_correction_refused_when_auto_samples_with_generate_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="importance_sampling_correction: expected none when rollout_engine auto"):
        train(GRPOConfig(output_dir=str(tmp_path), importance_sampling_correction="token_truncate", **FAST))


def test_replayed_rollouts_score_the_reference_over_the_full_vocabulary():
    """The policy's thresholds say nothing about the reference's logits: its log-probs stay full (the KL is the
    truncated policy's to the reference), while the policy's old log-probs take the thresholds."""
    from grpo_fast.engine import RolloutEngine
    from grpo_fast.model import build_tiny_model, tiny_tokenizer
    from grpo_fast.tasks import ALPHABET, SEPARATOR, letters_dataset
    from grpo_fast.trainer import batch_logprobs, generate_rollout, reference_logprobs

    config = GRPOConfig(top_p=0.7, rollout_engine="engine", num_generations=4, max_completion_length=8)
    tokenizer = tiny_tokenizer(ALPHABET + SEPARATOR)
    model, reference = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2)
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, letters_dataset(4), config, RolloutEngine())
    assert rollout.logit_thresholds is not None
    cpu = torch.device("cpu")
    full = dataclasses.replace(rollout, logit_thresholds=None)
    torch.testing.assert_close(reference_logprobs(model, reference, rollout, config, cpu),
                               batch_logprobs(reference, full, config, cpu), rtol=0, atol=0)
    mask = rollout.completion_mask.bool()
    replayed, untruncated = batch_logprobs(model, rollout, config, cpu), batch_logprobs(model, full, config, cpu)
    assert (replayed[mask] >= untruncated[mask] - 1e-6).all() and (replayed[mask] > untruncated[mask] + 1e-3).any()
