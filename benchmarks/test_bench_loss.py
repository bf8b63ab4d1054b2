"""CPU micro-benchmarks of the torch and reference paths (pytest-benchmark), not part of the test run:

    python -m pytest benchmarks --benchmark-only

Tiny shapes, so they track regressions of the Python-side overhead and the chunked PyTorch maths,
not GPU performance (that is `python -m benchmarks.loss`).
"""

from __future__ import annotations

import pytest
import torch

from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs

from .loss import make_inputs, make_weight

pytest.importorskip("pytest_benchmark")

BACKENDS = ["reference", "torch"]


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    weight = make_weight(64, 4001, torch.float32, torch.device("cpu"), train_head=False)
    return make_inputs(512, 128, weight, peaked=False, padding="random", beta=0.04, off_policy=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_forward_backward(benchmark, inputs, backend):
    x = inputs
    config = GRPOLossConfig(beta=0.04, epsilon_high=0.28)

    def step():
        x.hidden.grad = None
        out = grpo_loss(x.hidden, x.weight, x.ids, x.mask, advantages=x.advantages, old_logps=x.old_logps,
                        ref_logps=x.ref_logps, config=config, backend=backend)
        out.loss.backward()
        return out.loss

    assert torch.isfinite(benchmark(step))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs(benchmark, inputs, backend):
    x = inputs
    logps = benchmark(lambda: token_logprobs(x.hidden, x.weight, x.ids, completion_mask=x.mask, backend=backend))
    assert logps.shape == x.ids.shape
