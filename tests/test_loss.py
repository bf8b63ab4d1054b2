"""Every fused backend against the eager reference, with a float64 answer as the oracle.

Rule (STYLE.md): a backend's error against the float64 answer may not exceed the error of the
eager reference run in the same dtype, plus a small tolerance. The Triton backend runs under
TRITON_INTERPRET=1 on CPU (tests/conftest.py), with tiny blocks so odd V and H span several tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

from grpo_fast import GRPOLoss, GRPOLossConfig, grpo_loss
from grpo_fast.reference import reference_grpo_loss
from helpers import DEVICE

FUSED = ["torch", "triton"]
RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


@dataclass
class Case:
    hidden: torch.Tensor  # [B, T, H] in the test dtype
    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]
    ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]


def make_case(B=4, T=7, H=24, V=77, dtype=torch.float32, seed=0, peaked=False, with_bias=False,
              with_old=True, with_ref=True, empty_row=True, full_rows=False) -> Case:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)
    ids = torch.randint(0, V, (B, T), generator=g)
    if peaked:
        # a trained model's softmax is peaked: scale the logits up and make most targets the argmax
        hidden = hidden * 6.0
        top = (hidden @ weight.T).argmax(-1)
        take_top = torch.rand(B, T, generator=g) < 0.7
        ids = torch.where(take_top, top, ids)
    lengths = torch.randint(min(4, T), T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if full_rows:
        mask[:] = True
    if empty_row and B > 1:
        mask[1] = False
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    # Old / ref log-probs placed at fixed log-ratio offsets from the exact log-probs, far from
    # the clip bounds (log 0.8, log 1.2, log 1.5), so that rounding never flips a clip decision.
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)
        exact = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    offsets = torch.tensor([-0.5, -0.05, 0.05, 0.5], dtype=torch.float64)
    pick = (torch.arange(T)[None, :] + torch.arange(B)[:, None]) % 4  # every offset in every row
    old = (exact - offsets[pick]).float() if with_old else None
    ref = (exact + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_ref else None
    signs = torch.tensor([1.0, -1.0]).repeat(B)[:B]  # both signs: both clip sides are exercised
    advantages = (torch.rand(B, generator=g) + 0.2) * signs
    rewards = torch.randint(0, 3, (B,), generator=g).float()
    def dev(t):
        return None if t is None else t.to(DEVICE)

    return Case(dev(hidden), dev(weight), dev(bias), dev(ids), dev(mask), dev(advantages), dev(rewards),
                dev(old), dev(ref))


def run(case: Case, config: GRPOLossConfig, backend: str, train_head=False, use_rewards=False,
        group_size=2, dtype=None):
    """Loss, logps, gradients and metrics of one backend; backend 'float64' is the oracle."""
    as64 = backend == "float64"
    conv = (lambda t: t.double()) if as64 else (lambda t: t)
    hidden = conv(case.hidden).detach().requires_grad_(True)
    weight = conv(case.weight).detach().requires_grad_(train_head)
    bias = None if case.bias is None else conv(case.bias).detach().requires_grad_(train_head)
    kwargs = dict(old_logps=case.old, ref_logps=case.ref)
    if use_rewards:
        kwargs.update(rewards=case.rewards, group_size=group_size)
    else:
        kwargs.update(advantages=case.advantages)
    if as64:
        from grpo_fast.loss import compute_advantages

        adv = (compute_advantages(case.rewards, group_size, config.scale_rewards) if use_rewards
               else case.advantages)
        out = reference_grpo_loss(hidden, weight, case.ids, case.mask.bool(), adv.double(),
                                  None if case.old is None else case.old.double(),
                                  None if case.ref is None else case.ref.double(), bias, config)
    else:
        out = grpo_loss(hidden, weight, case.ids, case.mask, bias=bias, config=config, backend=backend, **kwargs)
    out.loss.backward()
    res = {
        "loss": out.loss.detach().double(),
        "logps": out.logps.double() * case.mask,
        "d_hidden": hidden.grad.double(),
        "advantages": out.advantages.double(),
    }
    if train_head:
        res["d_weight"] = weight.grad.double()
        if bias is not None:
            res["d_bias"] = bias.grad.double()
    for name in METRICS:
        if name in out.metrics:
            res["metric/" + name] = out.metrics[name].double()
    return res


def assert_close_to_oracle(fused, eager, exact, dtype, what=""):
    assert fused.keys() == eager.keys() == exact.keys(), (fused.keys(), exact.keys())
    for key in exact:
        scale = exact[key].abs().max().item() if exact[key].numel() else 0.0
        tol = RTOL[dtype] * scale + 1e-7
        err_fused = (fused[key] - exact[key]).abs().max().item() if exact[key].numel() else 0.0
        err_eager = (eager[key] - exact[key]).abs().max().item() if exact[key].numel() else 0.0
        assert math.isfinite(err_fused), f"{what} {key}: non-finite"
        assert err_fused <= err_eager + tol, (
            f"{what} {key}: fused error {err_fused:.3e} > eager error {err_eager:.3e} + tol {tol:.1e}"
        )


CONFIGS = {
    "dapo-onpolicy": (GRPOLossConfig(), dict(with_old=False, with_ref=False)),
    "grpo-old-kl": (GRPOLossConfig(loss_type="grpo", beta=0.04), {}),
    "bnpo-asym-delta": (GRPOLossConfig(loss_type="bnpo", epsilon_high=0.28, delta=1.5), {}),
    "drgrpo-temp-bias": (GRPOLossConfig(loss_type="dr_grpo", max_completion_length=10, temperature=0.7),
                         dict(with_bias=True)),
    "dapo-items": (GRPOLossConfig(num_items_in_batch=37.0, beta=0.1), {}),
    "ref-beta0": (GRPOLossConfig(loss_type="grpo"), {}),
    "seq-grpo-kl": (GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.1), {}),
    "seq-dapo-onpolicy-delta": (GRPOLossConfig(importance_sampling_level="sequence", delta=1.4),
                                dict(with_old=False, with_ref=False)),
    "seq-bnpo-bias": (GRPOLossConfig(loss_type="bnpo", importance_sampling_level="sequence", temperature=1.3),
                      dict(with_bias=True)),
    # TRL's use_bias_correction_kl: the KL times the (differentiable) ratio, before the delta cap
    "klcorr-dapo-delta": (GRPOLossConfig(beta=0.1, delta=1.4, kl_bias_correction=True), {}),
    "klcorr-grpo-onpolicy": (GRPOLossConfig(loss_type="grpo", beta=0.2, kl_bias_correction=True), dict(with_old=False)),
    "seq-klcorr-grpo": (GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.1,
                                       kl_bias_correction=True), {}),
    "seq-klcorr-bnpo-onpolicy": (GRPOLossConfig(loss_type="bnpo", importance_sampling_level="sequence", beta=0.3,
                                                kl_bias_correction=True), dict(with_old=False)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", FUSED)
def test_backend_matches_reference(backend, name, dtype):
    config, case_kwargs = CONFIGS[name]
    config = replace(config, chunk_size=5)  # several chunks, boundaries inside sequences
    train_head = "bias" in name or name == "grpo-old-kl"
    case = make_case(dtype=dtype, **case_kwargs)
    exact = run(case, config, "float64", train_head)
    eager = run(case, config, "reference", train_head)
    fused = run(case, config, backend, train_head)
    assert_close_to_oracle(fused, eager, exact, dtype, f"{backend}/{name}")


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("backend", FUSED)
def test_rewards_to_advantages(backend, scale_rewards):
    config = GRPOLossConfig(scale_rewards=scale_rewards, loss_type="grpo")
    case = make_case(B=6)
    exact = run(case, config, "float64", use_rewards=True, group_size=3)
    eager = run(case, config, "reference", use_rewards=True, group_size=3)
    fused = run(case, config, backend, use_rewards=True, group_size=3)
    assert_close_to_oracle(fused, eager, exact, torch.float32, scale_rewards)


@pytest.mark.parametrize("backend", FUSED)
def test_fp16(backend):
    config = GRPOLossConfig(loss_type="bnpo", beta=0.05, chunk_size=6)
    case = make_case(dtype=torch.float16, with_bias=True)
    exact = run(case, config, "float64", train_head=True)
    eager = run(case, config, "reference", train_head=True)
    fused = run(case, config, backend, train_head=True)
    assert_close_to_oracle(fused, eager, exact, torch.float16, "fp16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FUSED)
def test_peaked_logits(backend, dtype):
    config = GRPOLossConfig(loss_type="grpo", beta=0.04, chunk_size=8)
    case = make_case(dtype=dtype, peaked=True, B=3, T=9)
    exact = run(case, config, "float64", train_head=True)
    eager = run(case, config, "reference", train_head=True)
    fused = run(case, config, backend, train_head=True)
    assert_close_to_oracle(fused, eager, exact, dtype, "peaked")
    # the distribution really is peaked: most target tokens get most of the mass
    assert exact["logps"][case.mask].exp().median().item() > 0.5


@pytest.mark.parametrize("backend", FUSED)
def test_odd_shapes_and_long_sequences(backend):
    # V and H not powers of two, a sequence longer than several chunks
    config = GRPOLossConfig(loss_type="grpo", beta=0.02, chunk_size=13)
    case = make_case(B=2, T=61, H=19, V=131, full_rows=True, empty_row=False)
    exact = run(case, config, "float64", train_head=True)
    eager = run(case, config, "reference", train_head=True)
    fused = run(case, config, backend, train_head=True)
    assert_close_to_oracle(fused, eager, exact, torch.float32, "odd")


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_all_tokens_masked(backend):
    case = make_case(B=2, T=5)
    case.mask[:] = False
    hidden = case.hidden.clone().requires_grad_(True)
    out = grpo_loss(hidden, case.weight, case.ids, case.mask, advantages=case.advantages,
                    old_logps=case.old, ref_logps=case.ref, config=GRPOLossConfig(beta=0.1), backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0
    assert torch.count_nonzero(out.logps) == 0
    for name in METRICS:
        assert out.metrics[name].item() == 0.0


@pytest.mark.parametrize("backend", FUSED)
def test_masked_positions_get_no_gradient(backend):
    case = make_case()
    hidden = case.hidden.clone().requires_grad_(True)
    # on-policy: no token is clipped, so every active token has a gradient
    out = grpo_loss(hidden, case.weight, case.ids, case.mask, advantages=case.advantages, backend=backend)
    out.loss.backward()
    assert torch.count_nonzero(hidden.grad[~case.mask]) == 0
    assert torch.count_nonzero(hidden.grad[case.mask].abs().sum(-1)) == int(case.mask.sum())


@pytest.mark.parametrize("backend", FUSED)
def test_no_grad_pass_matches_grad_pass(backend):
    # under no_grad the forward-only kernel runs; it must give the same loss, logps and metrics
    config = GRPOLossConfig(loss_type="grpo", beta=0.1)
    case = make_case()
    kwargs = dict(advantages=case.advantages, old_logps=case.old, ref_logps=case.ref, config=config, backend=backend)
    with torch.no_grad():
        a = grpo_loss(case.hidden, case.weight, case.ids, case.mask, **kwargs)
    b = grpo_loss(case.hidden.clone().requires_grad_(True), case.weight, case.ids, case.mask, **kwargs)
    torch.testing.assert_close(a.loss, b.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.logps, b.logps, rtol=1e-5, atol=1e-5)
    for name in METRICS:
        torch.testing.assert_close(a.metrics[name], b.metrics[name], rtol=1e-5, atol=1e-6)


def test_gradient_scales_with_upstream_gradient():
    case = make_case()
    h1 = case.hidden.clone().requires_grad_(True)
    h2 = case.hidden.clone().requires_grad_(True)
    kwargs = dict(advantages=case.advantages, old_logps=case.old, backend="torch")
    grpo_loss(h1, case.weight, case.ids, case.mask, **kwargs).loss.backward()
    (3.0 * grpo_loss(h2, case.weight, case.ids, case.mask, **kwargs).loss).backward()
    torch.testing.assert_close(h2.grad, 3.0 * h1.grad)


def test_module_form_matches_function():
    case = make_case()
    config = GRPOLossConfig(loss_type="bnpo")
    module = GRPOLoss(config, backend="torch")
    a = module(case.hidden, case.weight, case.ids, case.mask, advantages=case.advantages)
    b = grpo_loss(case.hidden, case.weight, case.ids, case.mask, advantages=case.advantages, config=config,
                  backend="torch")
    assert torch.equal(a.loss, b.loss)
    assert "bnpo" in repr(module)


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    import grpo_fast.loss as loss_mod

    assert loss_mod._resolve_backend("auto", torch.device("cpu")) == "torch"
