"""The loss's edges on every backend: NaN / inf inputs at active positions give a non-finite loss,
masked positions are never read (a NaN there, or TRL's padding id -100, changes nothing), and
empty batches (B = 0, T = 0, every token masked) give a zero loss with zero gradients."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs
from helpers import DEVICE

BACKENDS = ["reference", "torch", "triton"]
B, T, H, V = 4, 3, 8, 11

# (loss options, with old_logps): the row kernel's inline policies, and the whole-batch pre-pass
CASES = {
    "dapo-on-policy": (dict(), False),
    "grpo-off-policy": (dict(loss_type="grpo"), True),
    "dapo-delta": (dict(delta=1.5), True),
    "cispo": (dict(loss_type="cispo", epsilon_high=5.0), True),
    "sapo": (dict(loss_type="sapo"), False),
    "sequence": (dict(importance_sampling_level="sequence"), True),
    "vespo": (dict(loss_type="vespo"), True),
}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[1, 2] = mask[3, 1:] = 0
    return dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g) * 0.5,
                ids=torch.randint(0, V, (B, T), generator=g), mask=mask,
                old=torch.randn(B, T, generator=g) * 0.1 - 2.0, advantages=torch.randn(B, generator=g))


def _loss(inputs, backend, options, with_old, **overrides):
    values = {**inputs, **overrides}
    hidden = values["hidden"].detach().clone().to(DEVICE).requires_grad_(True)
    out = grpo_loss(hidden, values["weight"].to(DEVICE), values["ids"].to(DEVICE), values["mask"].to(DEVICE),
                    advantages=values["advantages"].to(DEVICE),
                    old_logps=values["old"].to(DEVICE) if with_old else None,
                    config=GRPOLossConfig(**options), backend=backend)
    out.loss.backward()
    return out, hidden.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_hidden_state_makes_the_loss_non_finite(backend, case, bad):
    options, with_old = CASES[case]
    inputs = _inputs()
    hidden = inputs["hidden"].clone()
    hidden[2, 1, 0] = bad  # an active position
    out, _ = _loss(inputs, backend, options, with_old, hidden=hidden)
    assert not math.isfinite(float(out.loss)), f"{backend}/{case}: loss {float(out.loss)} with {bad} in hidden"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["grpo-off-policy", "dapo-delta", "cispo"])
def test_a_nan_old_logp_at_an_active_position_makes_the_loss_nan(backend, case):
    options, _ = CASES[case]
    inputs = _inputs()
    old = inputs["old"].clone()
    old[0, 0] = math.nan
    out, _ = _loss(inputs, backend, options, True, old=old)
    assert math.isnan(float(out.loss)), f"{backend}/{case}: loss {float(out.loss)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["dapo-on-policy", "grpo-off-policy", "sequence", "vespo"])
def test_masked_positions_are_never_read(backend, case):
    """NaN hidden states and old log-probs and ids of -100 where the mask is 0 give the loss, log-probs
    and gradients of the same call with ordinary values there."""
    options, with_old = CASES[case]
    inputs = _inputs()
    clean, clean_grad = _loss(inputs, backend, options, with_old)
    masked = ~inputs["mask"].bool()
    poisoned = dict(hidden=inputs["hidden"].masked_fill(masked[..., None], math.nan),
                    old=inputs["old"].masked_fill(masked, math.nan), ids=inputs["ids"].masked_fill(masked, -100))
    out, grad = _loss(inputs, backend, options, with_old, **poisoned)
    assert torch.equal(out.loss, clean.loss), (float(out.loss), float(clean.loss))
    assert torch.equal(out.logps, clean.logps)
    assert torch.equal(grad, clean_grad) and not grad[masked.to(DEVICE)].any()
    logps = token_logprobs(poisoned["hidden"].to(DEVICE), inputs["weight"].to(DEVICE), poisoned["ids"].to(DEVICE),
                           completion_mask=inputs["mask"].to(DEVICE), backend=backend)
    torch.testing.assert_close(logps, clean.logps, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_of_minus_100_are_refused_at_active_positions(backend):
    inputs = _inputs()
    ids = inputs["ids"].clone()
    ids[0, 1] = -100
    with pytest.raises(ValueError, match=r"completion_ids: expected ids in \[0, 11\) .*got -100"):
        _loss(inputs, backend, {}, False, ids=ids)


def _empty_call(backend, b, t, loss_type):
    hidden = torch.randn(b, t, H, device=DEVICE, requires_grad=True)
    mask = torch.zeros(b, t, device=DEVICE) if b * t else torch.ones(b, t, device=DEVICE)
    out = grpo_loss(hidden, torch.randn(V, H, device=DEVICE), torch.zeros(b, t, dtype=torch.long, device=DEVICE), mask,
                    advantages=torch.randn(b, device=DEVICE), config=GRPOLossConfig(loss_type=loss_type),
                    backend=backend)
    out.loss.backward()
    return out, hidden.grad


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (2, 3)], ids=["B=0", "T=0", "all-masked"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "luspo", "vespo"])
def test_empty_batches_give_a_zero_loss_on_every_backend(shape, loss_type):
    outputs = {backend: _empty_call(backend, *shape, loss_type) for backend in BACKENDS}
    for backend, (out, grad) in outputs.items():
        assert float(out.loss) == 0.0, backend
        assert out.logps.shape == shape and out.entropy.shape == shape, backend
        assert grad is not None and grad.shape == (*shape, H) and not grad.any(), backend
    reference = outputs["reference"][0].metrics
    for backend in ("torch", "triton"):
        metrics = outputs[backend][0].metrics
        assert metrics.keys() == reference.keys(), backend
        for name, value in metrics.items():
            torch.testing.assert_close(value.float().cpu(), reference[name].float().cpu(), equal_nan=True,
                                       msg=f"{backend} {name}")
