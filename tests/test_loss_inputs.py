"""Bad input: a ValueError that names the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

from grpo_fast import GRPOLoss, GRPOLossConfig, compute_advantages, grpo_loss, token_logprobs


def _good(B=4, T=5, H=8, V=11):
    return dict(
        hidden=torch.randn(B, T, H),
        weight=torch.randn(V, H),
        completion_ids=torch.randint(0, V, (B, T)),
        completion_mask=torch.ones(B, T),
        advantages=torch.randn(B),
    )


def _call(**overrides):
    kwargs = _good()
    kwargs.update(overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not _DROP}
    return grpo_loss(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("completion_ids"),
                     kwargs.pop("completion_mask"), backend=kwargs.pop("backend", "torch"), **kwargs)


_DROP = object()


@pytest.mark.parametrize("overrides,pattern", [
    (dict(hidden=torch.randn(4, 5)), r"hidden: expected shape \[B, T, H\], got \(4, 5\)"),
    (dict(hidden=torch.randn(4, 5, 8, dtype=torch.float64)), r"hidden: expected dtype .*got torch.float64"),
    (dict(weight=torch.randn(11, 9)), r"weight: expected shape \[V, 8\].*got \(11, 9\)"),
    (dict(weight=torch.randn(11, 8, dtype=torch.bfloat16)), r"weight: expected dtype torch.float32.*got torch.bfloat16"),
    (dict(weight=[[0.0]]), r"weight: expected a torch.Tensor, got list"),
    (dict(completion_ids=torch.randint(0, 11, (4, 6))), r"completion_ids: expected shape \(4, 5\), got \(4, 6\)"),
    (dict(completion_ids=torch.rand(4, 5)), r"completion_ids: expected an integer tensor.*float32"),
    (dict(completion_ids=torch.full((4, 5), 11)), r"completion_ids: expected ids in \[0, 11\).*got 11"),
    (dict(completion_ids=torch.full((4, 5), -1)), r"completion_ids: expected ids in \[0, 11\).*got -1"),
    (dict(completion_mask=torch.ones(4, 4)), r"completion_mask: expected shape \(4, 5\), got \(4, 4\)"),
    (dict(advantages=torch.randn(3)), r"advantages: expected shape \(4,\), got \(3,\)"),
    (dict(advantages=_DROP), r"advantages / rewards: expected exactly one of them, got neither"),
    (dict(rewards=torch.randn(4), group_size=2), r"advantages / rewards: expected exactly one of them, got both"),
    (dict(advantages=_DROP, rewards=torch.randn(4)), r"group_size: required with rewards, got None"),
    (dict(advantages=_DROP, rewards=torch.randn(4), group_size=3), r"group_size: expected a divisor of the batch size 4, got 3"),
    (dict(advantages=_DROP, rewards=torch.randn(4), group_size=0), r"group_size: expected a positive int, got 0"),
    (dict(config=GRPOLossConfig(beta=0.1)), r"ref_logps: required when config.beta != 0"),
    (dict(old_logps=torch.randn(4, 6)), r"old_logps: expected shape \(4, 5\), got \(4, 6\)"),
    (dict(ref_logps=torch.zeros(4, 5, dtype=torch.long)), r"ref_logps: expected a floating-point tensor"),
    (dict(bias=torch.randn(12)), r"bias: expected shape \(11,\), got \(12,\)"),
    (dict(backend="cuda"), r"backend: expected one of 'auto', 'triton', 'torch', 'reference', got 'cuda'"),
    (dict(config={"beta": 0.1}), r"config: expected a GRPOLossConfig, got dict"),
])
def test_bad_input_names_the_argument(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(**overrides)


def test_device_mismatch_is_named():
    meta_weight = torch.randn(11, 8, device="meta")
    with pytest.raises(ValueError, match=r"weight: expected a tensor on cpu .*got one on meta"):
        _call(weight=meta_weight)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend: 'triton' needs CUDA tensors"):
        _call(backend="triton")


@pytest.mark.parametrize("field,value,pattern", [
    ("loss_type", "ppo", r"loss_type: expected one of 'dapo', 'grpo', 'bnpo', 'dr_grpo', 'cispo', 'sapo', 'luspo', 'vespo', got 'ppo'"),
    ("importance_sampling_level", "seq", r"importance_sampling_level: expected one of 'token', 'sequence', got 'seq'"),
    ("scale_rewards", True, r"scale_rewards: expected one of 'group', 'batch', 'none', got True"),
    ("beta", -0.1, r"beta: expected a value >= 0.0, got -0.1"),
    ("epsilon_low", 1.5, r"epsilon_low: expected a value in \[0, 1\), got 1.5"),
    ("epsilon_high", float("nan"), r"epsilon_high: expected a finite number, got nan"),
    ("delta", 0.5, r"delta: expected a value > 1"),
    ("temperature", 0.0, r"temperature: expected a value > 0"),
    ("max_completion_length", 0, r"max_completion_length: expected a positive int or None, got 0"),
    ("chunk_size", 2.5, r"chunk_size: expected a positive int or None, got 2.5"),
    ("num_items_in_batch", 0, r"num_items_in_batch: expected a value > 0"),
])
def test_bad_config_names_the_field(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        GRPOLossConfig(**{field: value})


def test_module_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend: expected one of"):
        GRPOLoss(backend="fast")


def test_token_logprobs_bad_input():
    good = _good()
    with pytest.raises(ValueError, match=r"completion_ids: expected ids in \[0, 11\)"):
        token_logprobs(good["hidden"], good["weight"], torch.full((4, 5), 99))
    with pytest.raises(ValueError, match=r"temperature: expected a value > 0"):
        token_logprobs(good["hidden"], good["weight"], good["completion_ids"], temperature=0.0)


def test_compute_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = compute_advantages(rewards, group_size=4)
    std = (1.0 / 3.0) ** 0.5  # Bessel-corrected std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([std + 1e-4] * 4 + [1e-4] * 4)
    torch.testing.assert_close(adv, expected)
    centred = compute_advantages(rewards, group_size=4, scale_rewards="none")
    torch.testing.assert_close(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch = compute_advantages(rewards, group_size=4, scale_rewards="batch")
    torch.testing.assert_close(batch, centred / (rewards.std() + 1e-4))
    with pytest.raises(ValueError, match="needs groups of at least 2"):
        compute_advantages(rewards, group_size=1)
