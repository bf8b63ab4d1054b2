"""TRL 1.16's other loss types and options, every fused backend against the float64 oracle.

cispo, sapo, luspo, vespo; the entropy bonus (entropy_coef); the top-entropy token mask
(top_entropy_quantile); the off-policy sequence mask (off_policy_mask_threshold, from the sampler's
log-probs); the sampler importance-sampling correction (importance_sampling_ratio, per token or per
sequence). The rule is tests/test_loss.py's: a backend's error against a float64 answer (the eager
reference, which follows TRL's statements, run in double precision) may not exceed the eager
reference's in the same dtype, plus a small tolerance; loss, log-probs, d_hidden, d_weight and
every metric.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from grpo_fast import GRPOLossConfig, grpo_loss
from grpo_fast.reference import reference_grpo_loss
from test_loss import FUSED, assert_close_to_oracle, make_case


def _extras(case, kind: str):
    """The sampler inputs of a case: log-probs near the old ones, and an IS ratio per token or sequence."""
    g = torch.Generator().manual_seed(11)
    B, T = case.ids.shape
    out = {}
    if "sampled" in kind:
        out["sampling_logps"] = (case.old + 0.4 * torch.randn(B, T, generator=g).to(case.old.device)).float()
    if "is_token" in kind:  # 1 at padding, as TRL computes it (the masked log-ratio difference is 0 there)
        ratio = (0.5 + torch.rand(B, T, generator=g)).to(case.old.device)
        out["importance_sampling_ratio"] = torch.where(case.mask.bool(), ratio, torch.ones_like(ratio))
    if "is_sequence" in kind:
        out["importance_sampling_ratio"] = (0.5 + torch.rand(B, 1, generator=g)).to(case.old.device)
    return out


def run(case, config, backend, extras, train_head=False):
    as64 = backend == "float64"
    conv = (lambda t: t.double()) if as64 else (lambda t: t)
    hidden = conv(case.hidden).detach().requires_grad_(True)
    weight = conv(case.weight).detach().requires_grad_(train_head)
    if as64:
        out = reference_grpo_loss(
            hidden, weight, case.ids, case.mask.bool(), case.advantages.double(),
            None if case.old is None else case.old.double(), None if case.ref is None else case.ref.double(), None,
            config, **{k: v.double() for k, v in extras.items()})
    else:
        out = grpo_loss(hidden, weight, case.ids, case.mask, advantages=case.advantages, old_logps=case.old,
                        ref_logps=case.ref, config=config, backend=backend, **extras)
    out.loss.backward()
    res = {"loss": out.loss.detach().double(), "logps": out.logps.double() * case.mask,
           "d_hidden": hidden.grad.double()}
    if train_head:
        res["d_weight"] = weight.grad.double()
    for name, value in out.metrics.items():
        res["metric/" + name] = value.double()
    return res


CONFIGS = {
    # name: (config, extras kind, make_case kwargs)
    "cispo": (GRPOLossConfig(loss_type="cispo", epsilon_high=1.3), "", {}),
    "cispo-seq-kl": (GRPOLossConfig(loss_type="cispo", epsilon_high=1.3, importance_sampling_level="sequence",
                                    beta=0.05, kl_bias_correction=True), "", {}),
    "sapo": (GRPOLossConfig(loss_type="sapo", beta=0.04), "", {}),
    "sapo-seq": (GRPOLossConfig(loss_type="sapo", importance_sampling_level="sequence", sapo_temperature_pos=2.0,
                                sapo_temperature_neg=0.5), "", {}),
    "luspo-seq": (GRPOLossConfig(loss_type="luspo", importance_sampling_level="sequence", epsilon_high=0.28), "", {}),
    "luspo-token-kl": (GRPOLossConfig(loss_type="luspo", beta=0.1, kl_bias_correction=True), "", {}),
    "vespo": (GRPOLossConfig(loss_type="vespo"), "", {}),
    "vespo-is-kl": (GRPOLossConfig(loss_type="vespo", beta=0.05, vespo_k_pos=1.5, vespo_lambda_neg=2.5), "is_token", {}),
    "entropy-bonus": (GRPOLossConfig(entropy_coef=0.05), "", {}),
    "entropy-bonus-grpo-bias": (GRPOLossConfig(loss_type="grpo", entropy_coef=0.1, temperature=0.8), "",
                                dict(with_bias=True)),
    "top-entropy": (GRPOLossConfig(top_entropy_quantile=0.4, beta=0.04), "", {}),
    "top-entropy-bonus-seq": (GRPOLossConfig(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=0.05,
                                             importance_sampling_level="sequence"), "", {}),
    "off-policy-mask": (GRPOLossConfig(off_policy_mask_threshold=0.1), "sampled", {}),
    "off-policy-mask-old": (GRPOLossConfig(loss_type="bnpo", off_policy_mask_threshold=0.05), "", {}),
    "is-token": (GRPOLossConfig(beta=0.04), "is_token", {}),
    "is-sequence-cispo": (GRPOLossConfig(loss_type="cispo", epsilon_high=2.0), "is_sequence", {}),
    "everything": (GRPOLossConfig(loss_type="dapo", beta=0.04, kl_bias_correction=True, entropy_coef=0.02,
                                  top_entropy_quantile=0.6, off_policy_mask_threshold=0.2, delta=1.6),
                   "sampled+is_token", {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", FUSED)
def test_backend_matches_reference(backend, name, dtype):
    config, kind, case_kwargs = CONFIGS[name]
    config = replace(config, chunk_size=5)  # several chunks, boundaries inside sequences
    case = make_case(dtype=dtype, **case_kwargs)
    extras = _extras(case, kind)
    train_head = "bias" in name or name == "sapo"
    exact = run(case, config, "float64", extras, train_head)
    eager = run(case, config, "reference", extras, train_head)
    fused = run(case, config, backend, extras, train_head)
    assert_close_to_oracle(fused, eager, exact, dtype, f"{backend}/{name}")


@pytest.mark.parametrize("backend", FUSED)
def test_fp16_entropy_bonus(backend):
    config = GRPOLossConfig(loss_type="sapo", entropy_coef=0.05, chunk_size=6)
    case = make_case(dtype=torch.float16)
    exact = run(case, config, "float64", {}, train_head=True)
    eager = run(case, config, "reference", {}, train_head=True)
    fused = run(case, config, backend, {}, train_head=True)
    assert_close_to_oracle(fused, eager, exact, torch.float16, "fp16")


@pytest.mark.parametrize("backend", FUSED)
def test_options_change_the_answer(backend):
    # each option really acts: the loss or gradient differs from the plain dapo loss on the same case
    case = make_case()
    base = run(case, GRPOLossConfig(), backend, {})
    for name, (config, kind, _) in CONFIGS.items():
        if name.startswith("luspo-token") or name.startswith("is-sequence") or name == "off-policy-mask-old":
            continue  # the same answer here by construction (covered against the oracle above)
        got = run(case, config, backend, _extras(case, kind))
        assert (got["d_hidden"] - base["d_hidden"]).abs().max() > 1e-4 or abs(got["loss"] - base["loss"]) > 1e-4, name


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_off_policy_mask_drops_negative_sequences_far_from_the_sampler(backend):
    case = make_case(B=4)
    with torch.no_grad():
        logps = grpo_loss(case.hidden, case.weight, case.ids, case.mask, advantages=case.advantages,
                          backend="reference").logps
    negative = case.advantages < 0  # make_case alternates signs: rows 1 and 3
    sampled = logps + 1.0 * negative[:, None]  # mean KL 1 for negative rows, 0 for the others
    hidden = case.hidden.clone().requires_grad_(True)
    grpo_loss(hidden, case.weight, case.ids, case.mask, advantages=case.advantages, sampling_logps=sampled,
              config=GRPOLossConfig(off_policy_mask_threshold=0.5), backend=backend).loss.backward()
    assert torch.count_nonzero(hidden.grad[negative]) == 0
    active_positive = case.mask.bool() & ~negative[:, None]
    assert torch.count_nonzero(hidden.grad[active_positive].abs().sum(-1)) == int(active_positive.sum())


def test_entropy_threshold_fn_is_used():
    # a distributed trainer passes the threshold over every process's tokens
    case = make_case()
    seen = []

    def threshold(entropies, q):
        seen.append(q)
        return entropies.max()  # only the highest-entropy token keeps its policy term

    out = grpo_loss(case.hidden, case.weight, case.ids, case.mask, advantages=case.advantages, old_logps=case.old,
                    config=GRPOLossConfig(top_entropy_quantile=0.3), entropy_threshold_fn=threshold, backend="torch")
    assert seen == [pytest.approx(0.7)] and math.isfinite(out.loss.item())


@pytest.mark.parametrize("field,value,message", [
    ("loss_type", "ppo", "loss_type: expected one of"),
    ("sapo_temperature_neg", 0.0, "sapo_temperature_neg: expected a value > 0"),
    ("vespo_k_pos", -1.0, "vespo_k_pos: expected a value >= 0"),
    ("top_entropy_quantile", 1.5, "top_entropy_quantile: expected a value in [0, 1]"),
    ("entropy_coef", float("nan"), "entropy_coef: expected a finite number"),
    ("off_policy_mask_threshold", -0.1, "off_policy_mask_threshold: expected a value >= 0"),
])
def test_bad_options_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GRPOLossConfig(**{field: value})


def test_bad_sampler_inputs_name_the_argument():
    case = make_case()
    kwargs = dict(advantages=case.advantages, backend="torch")
    with pytest.raises(ValueError, match="importance_sampling_ratio: expected shape"):
        grpo_loss(case.hidden, case.weight, case.ids, case.mask, importance_sampling_ratio=torch.ones(3, 2), **kwargs)
    with pytest.raises(ValueError, match="sampling_logps: expected shape"):
        grpo_loss(case.hidden, case.weight, case.ids, case.mask, sampling_logps=torch.ones(3, 2), **kwargs)
