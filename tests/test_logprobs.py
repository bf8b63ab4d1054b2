"""token_logprobs (forward-only path) against a float64 eager answer."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_fast import token_logprobs
from grpo_fast.reference import reference_logprobs
from helpers import DEVICE

RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(B, T, H, V, dtype, bias=False, peaked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) * (6.0 if peaked else 1.0)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    ids = torch.randint(0, V, (B, T), generator=g)
    b = torch.randn(V, generator=g) if bias else None
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), ids.to(DEVICE),
            None if b is None else b.to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape,bias,temperature,peaked", [
    ((2, 14, 24, 77), False, 1.0, False),   # several vocabulary splits and token blocks
    ((3, 5, 19, 131), True, 0.7, False),    # H and V not multiples of the tiles
    ((1, 33, 40, 50), True, 1.0, True),     # peaked distribution
])
def test_token_logprobs_matches_float64(backend, dtype, shape, bias, temperature, peaked):
    B, T, H, V = shape
    hidden, weight, ids, b = _inputs(B, T, H, V, dtype, bias, peaked)
    exact_lp, exact_ent = reference_logprobs(hidden.double(), weight.double(), ids,
                                             None if b is None else b.double(), temperature)
    eager_lp, eager_ent = reference_logprobs(hidden, weight, ids, b, temperature)
    lp, ent = token_logprobs(hidden, weight, ids, bias=b, temperature=temperature, backend=backend,
                             return_entropy=True, chunk_size=7)
    assert lp.dtype == torch.float32 and lp.shape == (B, T)
    for got, eager, exact in ((lp, eager_lp, exact_lp), (ent, eager_ent, exact_ent)):
        err = (got.double() - exact).abs().max().item()
        err_eager = (eager.double() - exact).abs().max().item()
        assert err <= err_eager + RTOL[dtype] * exact.abs().max().item() + 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_token_logprobs_mask_and_no_grad(backend):
    hidden, weight, ids, _ = _inputs(2, 6, 16, 40, torch.float32)
    hidden.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], device=DEVICE)
    lp = token_logprobs(hidden, weight, ids, completion_mask=mask, backend=backend)
    full = token_logprobs(hidden, weight, ids, backend=backend)
    assert not lp.requires_grad
    assert torch.count_nonzero(lp[mask == 0]) == 0
    torch.testing.assert_close(lp[mask == 1], full[mask == 1], rtol=1e-5, atol=1e-5)


def test_forward_kernel_splits_vocabulary():
    # the launcher splits the vocabulary across programs; a split count > 1 must give the same answer
    from grpo_fast.kernels.config import default_kernel_config
    from grpo_fast.kernels.logprob_kernel import logprobs_triton

    hidden, weight, ids, _ = _inputs(1, 40, 16, 200, torch.float32)
    cfg = default_kernel_config(DEVICE)
    lp, ent = logprobs_triton(hidden[0], weight, ids[0], None, 1.0, cfg)
    exact, exact_ent = reference_logprobs(hidden.double(), weight.double(), ids, None, 1.0)
    torch.testing.assert_close(lp.double(), exact[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), exact_ent[0], rtol=0, atol=1e-5)
