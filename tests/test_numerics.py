"""The dtype paths the trainer runs (bf16, fp16), at realistic vocabulary and logit sizes.

fp32 tests cannot see what low precision does on a GPU: logits rounded to bf16, fp16 gradients
flushed to zero or overflowed by a loss scale, exp overflowing in an unused KL term, per-chunk
rounding of an accumulated gradient. Each test here fails on code that has one of these defects.
The Triton backend runs under the CPU interpreter (exact for fp32 / fp16 dots and bf16 loads cast
to fp32), so these are CPU checks of the same arithmetic the compiled kernels do.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.logprob_accuracy import realistic_head as _realistic_head
from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs
from grpo_fast.reference import reference_grpo_loss, reference_logprobs
from helpers import DEVICE, wide_interpreter_tiles  # noqa: F401 (fixture)

FUSED = ["torch", "triton"]


def realistic_head(n: int, H: int, V: int, max_logit: float, dtype: torch.dtype, seed: int = 0):
    """A trained model's logits (row maxima near `max_logit`, a few contenders, sampled targets):
    benchmarks.logprob_accuracy.realistic_head on the test device."""
    return _realistic_head(n, H, V, max_logit, dtype, seed=seed, device=DEVICE)


# ----------------------------------------------------------------------------------------------
# 1. one log-prob path: the training pass's log-probs are the no-grad pass's
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("max_logit", [18.0, 32.0])
@pytest.mark.parametrize("backend", FUSED)
def test_training_logps_equal_no_grad_logps(backend, max_logit, dtype, wide_interpreter_tiles):
    hidden, weight, ids = realistic_head(24, 64, 2000, max_logit, dtype)
    mask = torch.ones_like(ids)
    config = GRPOLossConfig(beta=0.04, chunk_size=5)
    with torch.no_grad():
        old = token_logprobs(hidden, weight, ids, backend=backend, chunk_size=config.chunk_size)
        other_chunks = token_logprobs(hidden, weight, ids, backend=backend, chunk_size=7)
    h = hidden.clone().requires_grad_(True)
    out = grpo_loss(h, weight, ids, mask, advantages=torch.ones(1, device=DEVICE), old_logps=old, ref_logps=old,
                    config=config, backend=backend)
    out.loss.backward()
    # the same chunks: the same fp32 logits read by the same code, so the ratio is exactly 1...
    assert torch.equal(out.logps, old)
    assert out.metrics["kl"].item() == 0.0 and out.metrics["clip_ratio/region_mean"].item() == 0.0
    # ...and other chunk boundaries change only the fp32 summation order of the product
    assert (out.logps - other_chunks).abs().max().item() <= 1e-5
    # both are fp32 log-probs of the low-precision inputs, not of logits rounded to `dtype`
    exact, _ = reference_logprobs(hidden.double(), weight.double(), ids, None, 1.0)
    assert (out.logps.double() - exact).abs().max().item() <= 1e-4


def test_default_chunks_are_whole_gemm_tiles_within_the_budget():
    from grpo_fast.kernels.chunked import chunk_tokens
    from grpo_fast.kernels.config import KernelConfig

    budget = KernelConfig().chunk_bytes
    for vocab in (152064, 151936, 128256, 32000):
        for bytes_per_logit in (4, 12):  # triton (fp32 chunk), torch (with its fp32 temporaries)
            chunk = chunk_tokens(10 ** 6, vocab, bytes_per_logit, KernelConfig(), None)
            assert chunk % 128 == 0, (vocab, bytes_per_logit, chunk)
            # the largest multiple of 128 tokens the budget holds: its meaning is unchanged
            assert chunk * vocab * bytes_per_logit <= budget < (chunk + 128) * vocab * bytes_per_logit
    # a budget of at most one tile is taken as it is, and fewer tokens than a chunk are one chunk
    assert chunk_tokens(10 ** 6, 1000, 4, KernelConfig(chunk_bytes=100 * 1000 * 4), None) == 100
    assert chunk_tokens(300, 152064, 4, KernelConfig(), None) == 300
    assert chunk_tokens(300, 152064, 4, KernelConfig(), 7) == 7


@pytest.mark.parametrize("backend", FUSED)
def test_default_chunking_is_the_same_in_training_and_no_grad_passes(backend):
    from dataclasses import replace

    from grpo_fast.kernels import LossSpec, TokenInputs, forward_logprobs, fused_grpo_loss
    from grpo_fast.kernels.chunked import _bytes_per_logit, chunk_tokens
    from grpo_fast.kernels.config import default_kernel_config

    n, H, V = 200, 8, 64
    hidden, weight, ids = realistic_head(n, H, V, 18.0, torch.bfloat16, seed=4)
    hidden, targets = hidden.reshape(n, H), ids.reshape(n)
    # a budget of 200 tokens: rounded down to one tile of 128, so the tokens span two chunks (one
    # vocabulary tile per row keeps the interpreter's 200 programs cheap)
    cfg = replace(default_kernel_config(DEVICE), chunk_bytes=n * V * _bytes_per_logit(backend), row_block_v=V)
    assert chunk_tokens(n, V, _bytes_per_logit(backend), cfg, None) == 128
    spec = LossSpec(beta=0.04)
    no_grad, _ = forward_logprobs(hidden, weight, targets, None, spec, backend, cfg)
    ones = torch.ones(n, device=DEVICE)
    inputs = TokenInputs(targets=targets, token_weight=ones / n, advantages=ones, seq_index=torch.zeros_like(targets),
                         num_sequences=1, old_logps=no_grad, ref_logps=no_grad)
    result = fused_grpo_loss(hidden.clone().requires_grad_(True), weight, None, inputs, spec, backend, cfg)
    assert torch.equal(result.logp, no_grad)  # the same chunks: the same fp32 logits, read by the same code
    assert result.kl.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_on_chip_logps_close_to_training_logps(dtype, wide_interpreter_tiles):
    hidden, weight, ids = realistic_head(24, 64, 2000, 32.0, dtype, seed=6)
    on_chip = token_logprobs(hidden, weight, ids, backend="triton", on_chip=True)
    out = grpo_loss(hidden.clone().requires_grad_(True), weight, ids, torch.ones_like(ids),
                    advantages=torch.ones(1, device=DEVICE), backend="triton")
    assert (out.logps - on_chip).abs().max().item() <= 3e-5


@pytest.mark.parametrize("backend", FUSED)
def test_fused_logps_beat_rounded_logits(backend, wide_interpreter_tiles):
    # TRL's path (logits rounded to bf16, then log-softmax) against grpo-fast's (fp32 logits)
    hidden, weight, ids = realistic_head(32, 64, 3000, 32.0, torch.bfloat16, seed=1)
    exact, _ = reference_logprobs(hidden.double(), weight.double(), ids, None, 1.0)
    rounded, _ = reference_logprobs(hidden, weight, ids, None, 1.0)  # eager: bf16 logits
    fused = token_logprobs(hidden, weight, ids, backend=backend)
    err_rounded = (rounded.double() - exact).abs().max().item()
    err_fused = (fused.double() - exact).abs().max().item()
    assert err_rounded > 1e-2  # bf16 logits of size 32 are off by up to 0.125
    assert err_fused < err_rounded / 100


# ----------------------------------------------------------------------------------------------
# 2. fp16 gradients survive any loss scale
# ----------------------------------------------------------------------------------------------


def _fp16_d_hidden_errors(backend: str, scales):
    """Relative max error of d_hidden (divided by the loss scale) against float64, fp16 inputs,
    V = 32000 and a dapo normaliser of 4096 tokens (a GRPO batch), per loss scale."""
    hidden, weight, ids = realistic_head(12, 32, 32000, 12.0, torch.float16, seed=2)
    mask = torch.ones_like(ids)
    advantages = torch.tensor([0.7], device=DEVICE)
    config = GRPOLossConfig(num_items_in_batch=4096.0, chunk_size=5)
    h64 = hidden.double().requires_grad_(True)
    reference_grpo_loss(h64, weight.double(), ids, mask.bool(), advantages.double(), None, None, None,
                        config).loss.backward()
    exact = h64.grad
    errors = []
    for scale in scales:
        h = hidden.clone().requires_grad_(True)
        loss = grpo_loss(h, weight, ids, mask, advantages=advantages, config=config, backend=backend).loss
        (loss * scale).backward()
        assert h.grad.dtype == torch.float16
        got = h.grad.double() / scale
        errors.append(((got - exact).abs().max() / exact.abs().max()).item())
    return errors


SCALES = [1.0, 2.0 ** 8, 2.0 ** 16, 2.0 ** 24]


@pytest.mark.parametrize("backend", FUSED)
def test_fp16_gradients_no_worse_than_eager_at_every_loss_scale(backend, wide_interpreter_tiles):
    eager = _fp16_d_hidden_errors("reference", SCALES)
    fused = _fp16_d_hidden_errors(backend, SCALES)
    for scale, e, f in zip(SCALES, eager, fused):
        assert math.isfinite(f), f"loss scale {scale:g}: non-finite fused gradient"
        assert f <= (e if math.isfinite(e) else math.inf) + 2e-3, f"loss scale {scale:g}: fused {f:.3g} > eager {e:.3g}"
    # with a loss scale (what GradScaler does) the fused gradients are as good as fp16 allows
    assert max(fused[1:]) <= 2e-3


# ----------------------------------------------------------------------------------------------
# 3. an unused KL term cannot poison the loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_beta_zero_ignores_overflowing_reference(backend):
    hidden, weight, ids = realistic_head(10, 32, 500, 30.0, torch.float32, seed=3)
    mask = torch.ones_like(ids)
    ref = torch.full(ids.shape, 0.0, device=DEVICE)
    ref[0, ::2] = 200.0  # exp(ref - logp) overflows fp32
    kwargs = dict(advantages=torch.tensor([1.0], device=DEVICE), config=GRPOLossConfig(beta=0.0), backend=backend)
    h1 = hidden.clone().requires_grad_(True)
    with_ref = grpo_loss(h1, weight, ids, mask, ref_logps=ref, **kwargs)
    with_ref.loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    without = grpo_loss(h2, weight, ids, mask, **kwargs)
    without.loss.backward()
    assert torch.isfinite(with_ref.loss) and torch.isfinite(h1.grad).all()
    torch.testing.assert_close(with_ref.loss, without.loss)
    torch.testing.assert_close(h1.grad, h2.grad)


# ----------------------------------------------------------------------------------------------
# 5. a trained lm_head: one fp32 accumulator, no per-chunk [V, H] temporaries
# ----------------------------------------------------------------------------------------------


class _CountLarge(TorchDispatchMode):
    """Counts new buffers of at least `numel` elements made by ATen ops run under it (views,
    in-place and out= results share an input's storage and are not counted)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                given.add(t.untyped_storage().data_ptr())
                if t.untyped_storage().nbytes() // t.element_size() >= self.numel:
                    self.count += 1
        return out


@pytest.mark.parametrize("backend", FUSED)
def test_trained_head_makes_no_per_chunk_weight_copies(backend):
    hidden, weight, ids = realistic_head(16, 24, 300, 10.0, torch.bfloat16, seed=4)
    mask = torch.ones_like(ids)

    def count(chunk_size):
        w = weight.clone().requires_grad_(True)
        with _CountLarge(weight.numel()) as spy:
            out = grpo_loss(hidden, w, ids, mask, advantages=torch.ones(1, device=DEVICE),
                            config=GRPOLossConfig(chunk_size=chunk_size), backend=backend)
            out.loss.backward()
        return spy.count

    # forward and backward: 8 chunks make no more [V, H] buffers than 1 (the fp32 accumulator, the
    # gradient in the weight's dtype, and on CPU one fp32 copy of the head for the fp32 products)
    assert count(2) == count(16) <= 3


@pytest.mark.parametrize("backend", FUSED)
def test_trained_head_gradient_accumulates_in_fp32(backend):
    # 64 chunks of one token: rounding each chunk's share of d_weight to bf16 before the sum would
    # make the fused gradient worse than eager autograd, which rounds once
    hidden, weight, ids = realistic_head(64, 16, 200, 8.0, torch.bfloat16, seed=5)
    mask = torch.ones_like(ids)
    advantages = torch.tensor([1.0], device=DEVICE)
    config = GRPOLossConfig(chunk_size=1)
    grads = {}
    for name in ("exact", "eager", "fused"):
        w = (weight.double() if name == "exact" else weight).clone().requires_grad_(True)
        if name == "exact":
            out = reference_grpo_loss(hidden.double(), w, ids, mask.bool(), advantages.double(), None, None, None,
                                      config)
        else:
            out = grpo_loss(hidden, w, ids, mask, advantages=advantages, config=config,
                            backend="reference" if name == "eager" else backend)
        out.loss.backward()
        grads[name] = w.grad.double()
    err = {k: (grads[k] - grads["exact"]).abs().max().item() for k in ("eager", "fused")}
    assert err["fused"] <= err["eager"] * 1.01 + 1e-9, err


def test_d_weight_accumulation_in_vocabulary_slices():
    # the fallback where cuBLAS cannot add bf16 products into an fp32 accumulator: a few rows at a time
    from grpo_fast.kernels.matmul import accumulate_in_slices

    g = torch.Generator().manual_seed(7)
    d_logits = torch.randn(9, 50, generator=g).to(torch.bfloat16)
    hidden = torch.randn(9, 12, generator=g).to(torch.bfloat16)
    acc = torch.randn(50, 12, generator=g)
    expected = acc + 0.5 * (d_logits.double().T @ hidden.double()).float()
    accumulate_in_slices(acc, d_logits, hidden, alpha=0.5, slice_bytes=7 * 12 * 4)  # slices of 7 rows
    torch.testing.assert_close(acc, expected, rtol=1e-6, atol=1e-6)
