"""Truncated sampling (top-k / top-p / min-p): log-probs over the kept set {v : z_v / T >= threshold}
plus the sampled token, on every backend against the eager reference (a float64 run of it is the
oracle), training and no-grad passes alike.

Each batch mixes the three kinds of token a trainer meets: a threshold that keeps a few tokens
(the target inside or outside them: a policy that moved), one above every logit (only the target
is left: log-prob 0) and -inf (not truncated). Thresholds lie midway in a wide gap between two
logits, so that no rounding of the logits moves a token across one.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs
from grpo_fast.reference import reference_grpo_loss, reference_logprobs
from helpers import DEVICE, wide_interpreter_tiles  # noqa: F401 (fixture)

RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
SOME, TARGET_ONLY, FULL = 0, 1, 2  # the kinds of token, cycled through the batch


def make_case(B=3, T=6, H=24, V=77, dtype=torch.float32, temperature=1.0, seed=0, max_kept=8):
    """(hidden, weight, ids, thresholds [B, T] fp32, kinds [B, T]); the thresholds from the float64
    logits of the rounded inputs, at least 0.05 from every logit (bf16 logits are off by ~0.01)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H) * 2.0).to(dtype)
    z = (hidden.double() @ weight.double().T) / temperature
    ranked = z.sort(-1, descending=True).values
    gaps = ranked[..., :max_kept] - ranked[..., 1:max_kept + 1]  # gap after the k-th largest, k = 1..max_kept
    k = gaps[..., 1:].argmax(-1) + 1  # keep at least two tokens
    gap = gaps.gather(-1, k[..., None]).squeeze(-1)
    some = ranked.gather(-1, k[..., None]).squeeze(-1) + gap / 2
    kinds = (torch.arange(T)[None, :] + torch.arange(B)[:, None]) % 3
    thresholds = torch.where(kinds == SOME, some, torch.where(kinds == TARGET_ONLY, ranked[..., 0] + 1.0, -math.inf))
    assert (gap[kinds == SOME] / 2 > 0.05).all(), "premise: thresholds far from every logit"
    # targets: half of the truncated tokens inside the kept set (the sampler drew them), half outside
    ids = torch.randint(0, V, (B, T), generator=g)
    top = z.argsort(-1, descending=True)[..., 0]
    ids = torch.where((torch.arange(T)[None, :] % 2 == 0) & (kinds == SOME), top, ids)
    outside = (z.gather(-1, ids[..., None]).squeeze(-1) < thresholds) & (kinds == SOME)
    assert outside.any() and ((kinds == SOME) & ~outside).any(), "premise: targets on both sides"
    return (hidden.to(DEVICE), weight.to(DEVICE), ids.to(DEVICE), thresholds.float().to(DEVICE), kinds.to(DEVICE))


def _within_eager(got, eager, exact, dtype, what):
    err = (got.double() - exact).abs().max().item()
    err_eager = (eager.double() - exact).abs().max().item()
    tol = RTOL[dtype] * exact.abs().max().item() + 1e-6
    assert err <= err_eager + tol, f"{what}: error {err:.3e} > eager {err_eager:.3e} + {tol:.1e}"


# ----------------------------------------------------------------------------------------------
# no-grad log-probs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ["torch", "triton", "on_chip", "reference"])
def test_token_logprobs_over_the_kept_set(backend, dtype):
    hidden, weight, ids, thresholds, kinds = make_case(dtype=dtype, temperature=0.7)
    exact, exact_entropy = reference_logprobs(hidden.double(), weight.double(), ids, None, 0.7,
                                              logit_threshold=thresholds)
    eager, _ = reference_logprobs(hidden, weight, ids, None, 0.7, logit_threshold=thresholds)
    kwargs = dict(temperature=0.7, backend="triton" if backend == "on_chip" else backend, return_entropy=True,
                  chunk_size=5, on_chip=backend == "on_chip")
    logps, entropy = token_logprobs(hidden, weight, ids, logit_threshold=thresholds, **kwargs)
    full, full_entropy = token_logprobs(hidden, weight, ids, **kwargs)
    _within_eager(logps, eager, exact, dtype, "logps")
    # the oracle itself: a truncation raises every log-prob it keeps (the same logit, fewer terms)
    untruncated, _ = reference_logprobs(hidden.double(), weight.double(), ids, None, 0.7)
    assert (exact[kinds == SOME] > untruncated[kinds == SOME] + 1e-3).all()
    # the target alone: log 1; no truncation: the untruncated log-prob
    assert logps[kinds == TARGET_ONLY].abs().max() <= 1e-6
    torch.testing.assert_close(logps[kinds == FULL], full[kinds == FULL], rtol=0, atol=1e-6)
    # the entropy describes the model, not the sampler: the full distribution's, threshold or not
    torch.testing.assert_close(entropy, full_entropy, rtol=0, atol=1e-6)
    _within_eager(entropy, full_entropy, exact_entropy, dtype, "entropy")


# ----------------------------------------------------------------------------------------------
# the training pass: values and gradients
# ----------------------------------------------------------------------------------------------


def _loss_inputs(dtype, seed=0, B=4, T=6):
    hidden, weight, ids, thresholds, kinds = make_case(B=B, T=T, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    exact, _ = reference_logprobs(hidden.double(), weight.double(), ids, None, 1.0, logit_threshold=thresholds)
    # old / ref at fixed offsets from the truncated log-probs, far from the clip bounds
    offsets = torch.tensor([-0.5, -0.05, 0.05, 0.5], dtype=torch.float64)
    pick = (torch.arange(T)[None, :] + torch.arange(B)[:, None]) % 4
    old = (exact.cpu() - offsets[pick]).float()
    ref = (exact.cpu() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    advantages = torch.tensor([1.0, -0.7, 0.4, -1.2])[:B]
    return dict(hidden=hidden, weight=weight, ids=ids, thresholds=thresholds, kinds=kinds, mask=mask.to(DEVICE),
                old=old.to(DEVICE), ref=ref.to(DEVICE), advantages=advantages.to(DEVICE))


def _run(case, config, backend, train_head):
    as64 = backend == "float64"
    hidden = (case["hidden"].double() if as64 else case["hidden"]).detach().requires_grad_(True)
    weight = (case["weight"].double() if as64 else case["weight"]).detach().requires_grad_(train_head)
    if as64:
        out = reference_grpo_loss(hidden, weight, case["ids"], case["mask"], case["advantages"].double(),
                                  case["old"].double(), case["ref"].double(), None, config,
                                  logit_threshold=case["thresholds"])
    else:
        out = grpo_loss(hidden, weight, case["ids"], case["mask"], advantages=case["advantages"],
                        old_logps=case["old"], ref_logps=case["ref"], config=config, backend=backend,
                        logit_threshold=case["thresholds"])
    out.loss.backward()
    res = {"loss": out.loss.detach().double(), "logps": out.logps.double(), "d_hidden": hidden.grad.double(),
           "kl": out.metrics["kl"].double(), "entropy": out.metrics["entropy"].double()}
    if train_head:
        res["d_weight"] = weight.grad.double()
    return res


CONFIGS = {
    "grpo-kl-head": (GRPOLossConfig(loss_type="grpo", beta=0.04, chunk_size=5), True),
    "dapo-entropy-bonus": (GRPOLossConfig(epsilon_high=0.28, entropy_coef=0.05, chunk_size=7), False),
    "seq-bnpo-kl": (GRPOLossConfig(loss_type="bnpo", importance_sampling_level="sequence", beta=0.1, chunk_size=5),
                    False),
}


# every config in fp32; bf16 (inputs loaded as fp32) and fp16 (the row kernel's two launches, the
# kept set's log-sum-exp passed between them) with the trained head, fp16 also with the entropy bonus
CASES = [(name, torch.float32) for name in CONFIGS] + [
    ("grpo-kl-head", torch.bfloat16), ("grpo-kl-head", torch.float16), ("dapo-entropy-bonus", torch.float16)]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_and_gradients_match_reference(backend, name, dtype):
    config, train_head = CONFIGS[name]
    case = _loss_inputs(dtype)
    exact = _run(case, config, "float64", train_head)
    eager = _run(case, config, "reference", train_head)
    fused = _run(case, config, backend, train_head)
    for key in exact:
        _within_eager(fused[key], eager[key], exact[key], dtype, f"{backend}/{name}/{key}")
    if config.entropy_coef == 0.0:
        # a token whose kept set is the target alone has log-prob 0 whatever the logits: no gradient
        alone = (case["kinds"] == TARGET_ONLY) & case["mask"]
        assert alone.any()
        # (0 on CPU; a compiled kernel may fuse z / T - lse' into one rounding: ~1e-7 of a row's scale)
        assert fused["d_hidden"][alone].abs().max() <= 1e-6 * fused["d_hidden"].abs().max()
    else:  # the entropy bonus acts on the full distribution, also there
        assert torch.count_nonzero(fused["d_hidden"][case["kinds"] == TARGET_ONLY].abs().sum(-1)) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_logps_equal_no_grad_logps(backend, dtype, wide_interpreter_tiles):
    """At a realistic vocabulary with top-p thresholds (the kept set's smallest logit itself, ties
    kept), the training pass reads the same fp32 logits with the same code: a first iteration's
    ratio is exactly 1, so the KL and the clip fractions are exactly 0."""
    from benchmarks.logprob_accuracy import realistic_head

    hidden, weight, ids = realistic_head(24, 64, 2000, 25.0, dtype, seed=1, device=DEVICE)
    with torch.no_grad():
        z = (hidden.float() @ weight.float().T)[0]
        sorted_z, order = z.sort(-1, descending=True)
        cumulative = torch.softmax(sorted_z, -1).cumsum(-1)
        last = (cumulative < 0.8).sum(-1).clamp(max=z.shape[-1] - 1)  # top-p 0.8: through the token crossing 0.8
        thresholds = sorted_z.gather(-1, last[:, None]).reshape(ids.shape)
        thresholds[0, ::5] = -math.inf
    mask = torch.ones_like(ids)
    config = GRPOLossConfig(beta=0.04, chunk_size=5)
    with torch.no_grad():
        old = token_logprobs(hidden, weight, ids, backend=backend, chunk_size=5, logit_threshold=thresholds)
        untruncated = token_logprobs(hidden, weight, ids, backend=backend, chunk_size=5)
    h = hidden.clone().requires_grad_(True)
    out = grpo_loss(h, weight, ids, mask, advantages=torch.ones(1, device=DEVICE), old_logps=old, ref_logps=old,
                    config=config, backend=backend, logit_threshold=thresholds)
    out.loss.backward()
    assert torch.equal(out.logps, old)
    assert out.metrics["kl"].item() == 0.0 and out.metrics["clip_ratio/region_mean"].item() == 0.0
    truncated = torch.isfinite(thresholds)
    assert (old[truncated] > untruncated[truncated]).any()  # the thresholds do truncate
    # the whole-batch path (a pre-pass of every log-prob, then the chunks) reads them alike too
    seq = grpo_loss(hidden.clone().requires_grad_(True), weight, ids, mask, advantages=torch.ones(1, device=DEVICE),
                    old_logps=old, config=replace(config, importance_sampling_level="sequence", beta=0.0), backend=backend,
                    logit_threshold=thresholds)
    assert torch.equal(seq.logps, old)


# ----------------------------------------------------------------------------------------------
# verl's fused function and bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_verl_function_passes_the_threshold(backend):
    from grpo_fast.integrations.verl import FusedLinearForPPOFunction

    hidden, weight, ids, thresholds, _ = make_case(B=2, T=5)
    g = torch.Generator().manual_seed(3)
    d_logp, d_entropy = torch.randn(2, 5, generator=g).to(DEVICE), torch.randn(2, 5, generator=g).to(DEVICE)
    results = []
    for as64 in (True, False):
        h = (hidden.double() if as64 else hidden).clone().requires_grad_(True)
        w = (weight.double() if as64 else weight).clone().requires_grad_(True)
        if as64:
            logp, entropy = reference_logprobs(h, w, ids, None, 1.0, logit_threshold=thresholds)
        else:
            logp, entropy = FusedLinearForPPOFunction.apply(h, w, ids, 1.0, 4, backend, thresholds)
        ((logp * d_logp).sum() + (entropy * d_entropy).sum()).backward()
        results.append((logp.detach(), entropy.detach(), h.grad, w.grad))
    for exact, got in zip(*results):
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6)


def test_bad_thresholds_are_refused():
    from grpo_fast.integrations.verl import FusedLinearForPPOFunction

    hidden, weight, ids, thresholds, _ = make_case(B=2, T=4)
    mask = torch.ones(2, 4, device=DEVICE)
    nan = thresholds.clone()
    nan[1, 2] = math.nan
    bad = {
        "got (2, 3)": thresholds[:, :3],
        "float64": thresholds.double(),
        "bfloat16": thresholds.bfloat16(),
        "meta": torch.empty(2, 4, device="meta"),
        "NaN": nan,
        "Tensor": thresholds.tolist(),
    }
    calls = {
        "grpo_loss": lambda t: grpo_loss(hidden, weight, ids, mask, advantages=torch.ones(2, device=DEVICE),
                                         backend="torch", logit_threshold=t),
        "token_logprobs": lambda t: token_logprobs(hidden, weight, ids, backend="torch", logit_threshold=t),
        "verl": lambda t: FusedLinearForPPOFunction.apply(hidden, weight, ids, 1.0, None, "torch", t),
    }
    for what, value in bad.items():
        for name, call in calls.items():
            with pytest.raises(ValueError, match="logit_threshold") as caught:
                call(value)
            assert what in str(caught.value), (name, str(caught.value))
    # a NaN where the mask is 0 is never read, as any other input there
    mask[1, 2] = 0
    grpo_loss(hidden, weight, ids, mask, advantages=torch.ones(2, device=DEVICE), backend="torch", logit_threshold=nan)
    token_logprobs(hidden, weight, ids, backend="torch", completion_mask=mask, logit_threshold=nan)
