"""The engine's records of truncated sampling (issue 27): each drawn token's truncation threshold and
its log-prob under the truncated distribution, against Hugging Face's warpers and an eager forward."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_fast.engine import RolloutEngine, records_truncation, sample_tokens
from grpo_fast.rollout import SamplingParams
from grpo_fast.truncation import truncation_threshold
from tiny_lm import tiny_model, tiny_tokenizer

OPTIONS = [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2), dict(top_k=4, top_p=0.8, min_p=0.05), dict(top_p=0.8)]


def hugging_face_warpers(scores: torch.Tensor, option: dict) -> torch.Tensor:
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = scores.clone()
    if option.get("top_k"):
        scores = TopKLogitsWarper(option["top_k"])(None, scores)
    if option.get("top_p"):
        scores = TopPLogitsWarper(option["top_p"])(None, scores)
    if option.get("min_p"):
        scores = MinPLogitsWarper(option["min_p"])(None, scores)
    return scores


def _arguments(option: dict) -> tuple[int, float, float]:
    return option.get("top_k", 0), option.get("top_p", 1.0), option.get("min_p", 0.0)


@pytest.mark.parametrize("option", OPTIONS)
def test_the_threshold_is_the_least_score_the_warpers_keep(option):
    scores = torch.randn(64, 151) * 3  # no ties: the kept set is Hugging Face's exactly
    kept = hugging_face_warpers(scores, option)
    threshold = truncation_threshold(scores, *_arguments(option))
    least_kept = kept.masked_fill(torch.isinf(kept), math.inf).amin(dim=-1)
    greatest_dropped = scores.masked_fill(torch.isfinite(kept), -math.inf).amax(dim=-1)
    torch.testing.assert_close(threshold, (least_kept + greatest_dropped) / 2)  # mid-gap: robust to rounding
    assert torch.equal(scores >= threshold[:, None], torch.isfinite(kept))
    assert (~torch.isfinite(kept)).any(dim=-1).all()  # each option drops something here


def test_ties_with_the_last_kept_score_are_kept():
    # top-p keeps 0.5 of the mass: one of the two tied 1.0 scores is enough, and both stay
    scores = torch.tensor([[1.0, 1.0, 0.0, -1.0]])
    threshold = truncation_threshold(scores, 0, 0.4, 0.0)
    assert threshold.item() == 0.5  # between the tied pair and the next score
    assert truncation_threshold(scores, 2, 1.0, 0.0).item() == 0.5  # top-2: both tied tokens
    assert truncation_threshold(scores, 1, 1.0, 0.0).item() == 0.5  # top-1 too: the tie cannot be split
    assert truncation_threshold(scores, 0, 0.99, 0.0).item() == -math.inf  # 0.99 of the mass: all kept
    assert truncation_threshold(scores, 0, 1.0, 0.0) is None  # nothing truncates


@pytest.mark.parametrize("option", OPTIONS)
def test_a_draws_kept_log_prob_is_the_truncated_distributions(option):
    logits = torch.randn(256, 151) * 2
    params = SamplingParams(num_generations=1, max_completion_length=4, eos_token_ids=(0,), pad_token_id=0,
                            temperature=0.7, **option)
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs, threshold, kept_logprobs = sample_tokens(logits, params, 1, torch.tensor([0]), generator,
                                                               truncation=True)
    reference = hugging_face_warpers(logits / 0.7, option).log_softmax(dim=-1)
    assert torch.isfinite(reference.gather(-1, tokens[:, None])).all()  # drawn from the kept set only
    torch.testing.assert_close(kept_logprobs, reference.gather(-1, tokens[:, None])[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logprobs, (logits / 0.7).log_softmax(-1).gather(-1, tokens[:, None])[:, 0],
                               rtol=0, atol=1e-5)  # the full distribution's, as before
    assert (kept_logprobs >= logprobs - 1e-6).all() and (kept_logprobs > logprobs + 1e-3).any()


def test_untruncated_sampling_records_nothing():
    plain = SamplingParams(num_generations=1, max_completion_length=4, eos_token_ids=(0,), pad_token_id=0)
    assert not records_truncation(plain)
    assert not records_truncation(SamplingParams(**{**plain.__dict__, "top_k": 1}))  # greedy: no draw to correct
    assert records_truncation(SamplingParams(**{**plain.__dict__, "top_p": 0.9}))
    logits = torch.randn(8, 20)
    _, logprobs, threshold, kept = sample_tokens(logits, plain, 1, torch.tensor([0]), None, truncation=True)
    assert torch.isinf(threshold).all() and (threshold < 0).all() and torch.equal(kept, logprobs)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_the_engine_records_what_an_eager_forward_gives(tokenizer):
    model = tiny_model(tokenizer, seed=3)
    prompts = [tokenizer("hello there")["input_ids"], tokenizer("abc")["input_ids"]]
    params = SamplingParams(num_generations=3, max_completion_length=12, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, temperature=0.8, top_p=0.8, top_k=40)
    output = RolloutEngine(seed=0).generate(model, prompts, params)
    assert output.logit_thresholds is not None and output.kept_logprobs is not None
    for row, ids in enumerate(output.completion_ids):
        prompt = prompts[row // 3]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1: -1].float() / 0.8
        threshold = truncation_threshold(logits, 40, 0.8, 0.0)
        torch.testing.assert_close(torch.tensor(output.logit_thresholds[row]), threshold, rtol=0, atol=1e-4)
        kept = logits.masked_fill(logits < threshold[:, None], -math.inf).log_softmax(-1)
        expected = kept.gather(-1, torch.tensor(ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(output.kept_logprobs[row]), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(output.logprobs[row]),
                                   logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None])[:, 0],
                                   rtol=0, atol=1e-4)
    untruncated = RolloutEngine(seed=0).generate(model, prompts, SamplingParams(**{**params.__dict__, "top_p": 1.0,
                                                                                  "top_k": 0}))
    assert untruncated.logit_thresholds is None and untruncated.kept_logprobs is None
