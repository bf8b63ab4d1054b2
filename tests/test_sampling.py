"""The one-pass sampling kernel (kernels/sampling.py) against the engine's torch sampling path
(``engine.sample_tokens``), and the engine with it."""

import pytest
import torch

import grpo_fast.engine as engine_module
from grpo_fast.engine import RolloutEngine, fused_sampling_supported, sample_tokens
from grpo_fast.kernels.sampling import sample_fused
from grpo_fast.rollout import SamplingParams
from helpers import DEVICE
from test_engine import assert_logprobs_are_the_models


def _params(**overrides):
    values = dict(num_generations=1, max_completion_length=4, eos_token_ids=(3, 7), pad_token_id=0)
    return SamplingParams(**{**values, **overrides})


def _tickets(rows):
    return torch.zeros(rows, dtype=torch.int32, device=DEVICE)


def _logits(rows=6, vocab=90, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * 2).to(DEVICE)


@pytest.mark.parametrize("splits", [1, 3])  # 3: the vocabulary in three slices merged by the last program
def test_greedy_tokens_and_logprobs_equal_the_torch_path(splits):
    logits = _logits()
    logits[2, 3] = 50.0  # an EOS token on top of row 2: suppressed at step 0, chosen at step 1
    logits[4, 10] = logits[4, 70] = 60.0  # a tie across slices: the lower token, as torch.argmax
    eos = torch.tensor([3, 7], device=DEVICE)
    params = _params(temperature=0.7, top_k=1, min_completion_length=1)
    for step in (0, 1):
        expected_tokens, expected_logprobs = sample_tokens(logits, params, step, eos, None)
        tickets = _tickets(6)
        tokens, logprobs = sample_fused(logits, 0.7, eos, step < 1, True, 0, step, tickets, splits=splits)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-5, atol=1e-5)
        assert not tickets.any()  # the merging programs reset them
        assert (tokens[2] == 3) == (step == 1) and tokens[4] == 10


@pytest.mark.parametrize("splits", [1, 3])
def test_sampled_logprobs_are_log_softmax_at_the_drawn_tokens(splits):
    logits = _logits(rows=32)
    logits[:, 3] = 5.0  # EOS likely when not suppressed
    eos = torch.tensor([3], device=DEVICE)
    tokens, logprobs = sample_fused(logits, 0.8, eos, True, False, 1234, 5, _tickets(32), splits=splits)
    expected = torch.log_softmax(logits.double() / 0.8, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), expected, rtol=1e-5, atol=1e-5)
    assert not (tokens == 3).any()  # suppressed; the log-prob is still the unsuppressed distribution's
    free, _ = sample_fused(logits, 0.8, eos, False, False, 1234, 5, _tickets(32), splits=splits)
    assert (free == 3).any()
    again, _ = sample_fused(logits, 0.8, eos, True, False, 1234, 5, _tickets(32), splits=splits)
    other_step, _ = sample_fused(logits, 0.8, eos, True, False, 1234, 6, _tickets(32), splits=splits)
    other_seed, _ = sample_fused(logits, 0.8, eos, True, False, 99, 5, _tickets(32), splits=splits)
    assert torch.equal(again, tokens) and not torch.equal(other_step, tokens) and not torch.equal(other_seed, tokens)


@pytest.mark.parametrize("splits", [1, 3])
def test_rows_at_their_own_steps_draw_from_their_own_streams(splits):
    """Per-row mode (slot refill: rows at different steps): with every row at one step and rows 0..B-1
    it is the per-step mode's draw; a row's draw follows its (row, step), not its place in the batch;
    EOS is suppressed per row below min_steps."""
    logits = _logits(rows=8)
    logits[:, 3] = 9.0  # EOS likely when not suppressed
    eos = torch.tensor([3], device=DEVICE)
    rows = torch.arange(8, device=DEVICE)
    steps = torch.full((8,), 5, dtype=torch.int64, device=DEVICE)
    per_step, per_step_logprobs = sample_fused(logits, 0.8, eos, False, False, 1234, 5, _tickets(8), splits=splits)
    tokens, logprobs = sample_fused(logits, 0.8, eos, False, False, 1234, 0, _tickets(8), splits=splits, rows=rows,
                                    steps=steps, min_steps=2)
    assert torch.equal(tokens, per_step) and torch.equal(logprobs, per_step_logprobs)
    order = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4], device=DEVICE)
    moved, _ = sample_fused(logits[order], 0.8, eos, False, False, 1234, 0, _tickets(8), splits=splits,
                            rows=rows[order], steps=steps, min_steps=2)
    assert torch.equal(moved, tokens[order])
    early = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.int64, device=DEVICE)  # steps 0 and 1: below 2
    suppressed, _ = sample_fused(logits, 0.8, eos, False, False, 1234, 0, _tickets(8), splits=splits, rows=rows,
                                 steps=early, min_steps=2)
    assert not (suppressed == 3).any() and (tokens == 3).any()
    with pytest.raises(ValueError, match="rows: expected an int64 tensor of 8 rows"):
        sample_fused(logits, 0.8, eos, False, False, 1234, 0, _tickets(8), steps=steps)


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("vocab, splits, draws", [(6, 1, 1024), (64, 2, 512)])
def test_draws_follow_the_softmax_distribution(vocab, splits, draws):
    """Draws of one row's distribution at temperature 0.7 (one program per draw: the interpreter's
    cost bounds their number). The chi-square statistic (5 degrees of freedom) stays below 20 (for
    the right distribution P(> 20) ~ 0.001) and the same bound rejects the counts as draws at
    temperature 1 or uniform ones. With 64 tokens in two slices the mass sits on 6 tokens spread over
    both slices (the others 40 below)."""
    bound = 20.0
    base = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    where = torch.arange(6) if vocab == 6 else torch.tensor([1, 5, 30, 33, 40, 63])
    row = torch.full((vocab,), -40.0)
    row[where] = base
    tokens, _ = sample_fused(row.repeat(draws, 1).to(DEVICE), 0.7, torch.tensor([where[5].item()], device=DEVICE),
                             False, False, 2024, 0, _tickets(draws), splits=splits)
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    assert counts[where].sum() == draws  # nothing outside the six tokens
    counts = counts[where]
    assert _chi_square(counts, torch.softmax(base.double() / 0.7, 0)) < bound
    assert _chi_square(counts, torch.softmax(base.double(), 0)) > bound  # temperature 1: rejected
    assert _chi_square(counts, torch.full((6,), 1 / 6, dtype=torch.float64)) > bound


def test_supported_only_without_filters():
    assert fused_sampling_supported(_params()) and fused_sampling_supported(_params(top_k=1))
    for overrides in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(eos_token_ids=tuple(range(9)))):
        assert not fused_sampling_supported(_params(**overrides))


class _Fused(RolloutEngine):
    def _fused_sampling(self, params, device):
        return fused_sampling_supported(params)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from tiny_lm import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, hidden_size=64, seed=1).eval(), tokenizer


def _counting(monkeypatch):
    calls = []
    original = engine_module.sample_fused
    monkeypatch.setattr(engine_module, "sample_fused", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_engine_greedy_with_the_kernel_equals_the_torch_path(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(text) for text in ("the cat", "a b c d e f", "x")]
    params = SamplingParams(num_generations=2, max_completion_length=6, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, top_k=1, min_completion_length=2)
    expected = RolloutEngine(sync_every=2).generate(model, prompts, params)
    calls = _counting(monkeypatch)
    output = _Fused(sync_every=2).generate(model, prompts, params)
    assert calls and output.completion_ids == expected.completion_ids
    for row, values in zip(output.logprobs, expected.logprobs):
        torch.testing.assert_close(torch.tensor(row), torch.tensor(values), rtol=1e-5, atol=1e-5)


def test_engine_sampled_with_the_kernel_logprobs_match_a_full_forward_pass(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(text) for text in ("the cat", "a b c d e f", "x")]
    temperature = 0.7
    params = SamplingParams(num_generations=3, max_completion_length=5, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, temperature=temperature, min_completion_length=3)
    calls = _counting(monkeypatch)
    output = _Fused(sync_every=2).generate(model, prompts, params, seed=3)
    assert calls
    assert _Fused(sync_every=2).generate(model, prompts, params, seed=3).completion_ids == output.completion_ids
    assert _Fused(sync_every=2).generate(model, prompts, params, seed=4).completion_ids != output.completion_ids
    assert all(len(ids) >= 3 for ids in output.completion_ids)  # EOS suppressed for three steps
    assert_logprobs_are_the_models(model, prompts, output, 3, temperature, tokenizer.pad_token_id)
