"""FusedGRPOTrainer replays a truncating sampler's top-p on the policy's own logits (issue 27): vLLM's
log-probs under top-k / top-p / min-p are the truncated distribution's, so TRL's importance ratio against
full-vocabulary log-probs is the kept mass, not 1. Here grpo-fast's engine plays vLLM (its kept log-probs
are what vLLM's processed log-probs are) and the trainer's old log-probs replay the truncation."""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import grpo_fast.integrations.trl as trl_integration  # noqa: E402
from grpo_fast.engine import RolloutEngine  # noqa: E402
from grpo_fast.integrations.trl import FusedGRPOTrainer  # noqa: E402
from grpo_fast.rollout import SamplingParams, pad  # noqa: E402
from test_trl_integration import PROMPTS, grpo_config, length_reward, make_batch  # noqa: E402
from tiny_lm import tiny_model, tiny_tokenizer  # noqa: E402


def _trainer(tmp_path, replay_truncation=True, **overrides):
    tokenizer = tiny_tokenizer()
    trainer = FusedGRPOTrainer(model=tiny_model(tokenizer, seed=1), reward_funcs=[length_reward],
                               args=grpo_config(tmp_path, temperature=0.9, **overrides),
                               train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                               processing_class=tokenizer, loss_backend="torch", replay_truncation=replay_truncation)
    # TRL's vLLM set-up, whose sampler log-probs correct the loss (no vLLM server is needed below)
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    return trainer, tokenizer


def test_replay_is_on_only_where_the_sampler_truncates(tmp_path):
    assert _trainer(tmp_path, top_p=0.8)[0]._replays_truncation()
    assert _trainer(tmp_path, top_k=20)[0]._replays_truncation()
    assert not _trainer(tmp_path)[0]._replays_truncation()  # top_p 1, no top-k / min-p
    assert not _trainer(tmp_path, top_p=0.8, replay_truncation=False)[0]._replays_truncation()
    trainer, _ = _trainer(tmp_path, top_p=0.8)
    trainer.use_vllm = False  # Hugging Face generate: TRL uses no sampler log-probs
    assert not trainer._replays_truncation()
    trainer, _ = _trainer(tmp_path, top_p=0.8, off_policy_mask_threshold=0.5)
    trainer.vllm_importance_sampling_correction = False  # the mask alone: TRL may skip the old-policy pass
    assert not trainer._replays_truncation()


@pytest.mark.parametrize("replay", [True, False])
def test_the_first_ratio_is_one_when_replayed(tmp_path, replay):
    trainer, tokenizer = _trainer(tmp_path, top_p=0.8)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    params = SamplingParams(num_generations=4, max_completion_length=8, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, temperature=0.9, top_p=0.8)
    output = RolloutEngine(seed=0).generate(trainer.model, prompts, params)
    prompt_ids, prompt_mask = pad([prompts[row // 4] for row in range(16)], tokenizer.pad_token_id, left=True)
    completion_ids, completion_mask = pad(output.completion_ids, tokenizer.pad_token_id, left=False)
    kept = torch.tensor([row + [0.0] * (completion_ids.shape[1] - len(row)) for row in output.kept_logprobs])
    trainer._replaying, trainer._replayed = replay, None
    with torch.no_grad():
        old, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            completion_ids.shape[1])
    ratio = (old - kept).exp()[completion_mask.bool()]
    if replay:  # a reference pass after it stays over the full vocabulary
        with torch.no_grad():
            reference, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, completion_mask], 1), completion_ids.shape[1])
        assert ((reference - kept).exp()[completion_mask.bool()].min() < 0.95)
        assert trainer._replayed.shape == completion_ids.shape
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)
    else:  # full-vocabulary log-probs: the ratio is the kept mass
        assert trainer._replayed is None
        assert ratio.max() <= 1 + 1e-4 and ratio.min() < 0.95


def test_the_loss_takes_the_batch_thresholds(tmp_path, monkeypatch):
    trainer, _ = _trainer(tmp_path, top_p=0.8)
    inputs = make_batch(trainer, torch.Generator().manual_seed(0))
    inputs["logit_thresholds"] = torch.full(inputs["completion_ids"].shape, -math.inf)
    seen = {}
    real = trl_integration.grpo_loss

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(trl_integration, "grpo_loss", spy)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which does not run here
    trainer._compute_loss(trainer.model, inputs)
    assert seen["logit_threshold"] is inputs["logit_thresholds"]
