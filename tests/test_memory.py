"""The chunked torch backend never allocates a [tokens, vocab] tensor (the reference does)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor produced by any ATen op run under it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _inputs(B=8, T=16, H=12, V=97):
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    return hidden, weight, ids, mask


def _largest(backend, config, grad=True, forward_only=False):
    hidden, weight, ids, mask = _inputs()
    with LargestAllocation() as spy:
        if forward_only:
            token_logprobs(hidden, weight, ids, backend=backend, chunk_size=config.chunk_size)
        else:
            out = grpo_loss(hidden, weight, ids, mask, advantages=torch.randn(8), config=config, backend=backend)
            if grad:
                out.loss.backward()
    return spy.largest


def test_torch_backend_never_holds_full_logits():
    tokens, vocab = 8 * 16, 97
    full = tokens * vocab
    config = GRPOLossConfig(chunk_size=16, beta=0.0)
    # the detector sees the eager reference materialise the logits...
    assert _largest("reference", config) >= full
    # ...and the chunked backend, forward+backward and forward-only, stays at one chunk
    assert _largest("torch", config) <= 16 * vocab
    assert _largest("torch", GRPOLossConfig(chunk_size=16, importance_sampling_level="sequence")) <= 16 * vocab
    assert _largest("torch", config, forward_only=True) <= 16 * vocab
