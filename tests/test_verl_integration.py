"""grpo_fast.integrations.verl: the drop-in for verl's fused log-prob function, TRL's loss types as verl
policy losses, and their installation into verl's modules.

verl itself is not a test dependency (verl 0.9.1 pins transformers < 5.11 and pulls Ray); where it
is installed, the fused function is also compared with verl's own torch implementation, loaded from
its source file (importing the ``verl`` package needs Ray). Without it the oracle is a float64
eager statement of the same function: log_softmax(h @ W.T / temperature) at the targets, its entropy,
and autograd's gradients w.r.t. h and W.
"""

import importlib.util
import os
import sys
import types

import pytest
import torch

from grpo_fast.integrations import verl as gv
from grpo_fast.loss import LOSS_TYPES
from grpo_fast.reference import reference_grpo_loss, reference_logprobs


def eager(hidden, weight, ids, temperature):
    logits = (hidden.double() @ weight.double().T) / temperature
    log_p = torch.log_softmax(logits, -1)
    return log_p.gather(-1, ids[..., None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def verl_torch_functional():
    """verl's own torch_functional module, from its source file (None without verl)."""
    spec = importlib.util.find_spec("verl")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "utils", "experimental", "torch_functional.py")
    module_spec = importlib.util.spec_from_file_location("verl_torch_functional_under_test", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def inputs(shape, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, H, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    ids = torch.randint(0, V, shape, generator=g)
    d_logp = torch.randn(shape, generator=g)
    d_ent = torch.randn(shape, generator=g)
    return hidden, weight, ids, d_logp, d_ent


def grads(fn, hidden, weight, ids, d_logp, d_ent, temperature):
    if fn is eager:  # the oracle's leaves are float64 copies, so are its gradients
        hidden = hidden.detach().double().requires_grad_(hidden.requires_grad)
        weight = weight.detach().double().requires_grad_(weight.requires_grad)
    logp, ent = fn(hidden, weight, ids, temperature)
    (logp.double() * d_logp).sum().add((ent.double() * d_ent).sum()).backward()
    out = (logp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(2, 7), (9,)])  # verl's [B, T, H] and [T, H]; 14 tokens in chunks of 3
def test_fused_linear_matches_fp64_fp32(backend, shape):
    hidden, weight, ids, d_logp, d_ent = inputs(shape, 24, 37, torch.float32)
    module = gv.FusedLinearForPPO(chunk_size=3, backend=backend)
    logp, ent, dh, dw = grads(module, hidden, weight, ids, d_logp, d_ent, 0.7)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == ids.shape
    ref = grads(eager, hidden, weight, ids, d_logp, d_ent, 0.7)
    for got, want in zip((logp, ent, dh, dw), ref):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_low_precision_matches_fp64(dtype):
    # fp32 logits from the bf16 / fp16 inputs: the log-probs are the fp64 ones of the same inputs to fp32's
    # precision; the gradients are fp32 until their one rounding to the input dtype (fp16: scaled first)
    hidden, weight, ids, d_logp, d_ent = inputs((3, 5), 32, 50, dtype, seed=1)
    logp, ent, dh, dw = grads(gv.FusedLinearForPPO(chunk_size=4, backend="torch"), hidden, weight, ids,
                              d_logp, d_ent, 1.3)
    ref = grads(eager, hidden, weight, ids, d_logp, d_ent, 1.3)
    torch.testing.assert_close(logp.double(), ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref[1], atol=1e-5, rtol=0)
    assert dh.dtype == dw.dtype == dtype
    torch.testing.assert_close(dh.double(), ref[2], atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(dw.double(), ref[3], atol=1e-3, rtol=1e-2)


def test_fused_linear_one_output_and_frozen_head():
    hidden, weight, ids, d_logp, _ = inputs((2, 4), 16, 29, torch.float32, seed=2)
    weight.requires_grad_(False)
    logp, ent = gv.FusedLinearForPPO(backend="torch")(hidden, weight, ids)
    (logp * d_logp).sum().backward()  # the entropy's gradient arrives as None
    assert weight.grad is None
    ref_h = hidden.detach().double().requires_grad_()
    ref_logp, _ = eager(ref_h, weight.double(), ids, 1.0)
    (ref_logp * d_logp).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), ref_h.grad, atol=1e-5, rtol=1e-4)
    hidden.grad = None
    logp, ent = gv.FusedLinearForPPO(backend="torch")(hidden, weight, ids)
    ent.sum().backward()  # and the log-probs' here
    ref_h.grad = None
    eager(ref_h, weight.double(), ids, 1.0)[1].sum().backward()
    torch.testing.assert_close(hidden.grad.double(), ref_h.grad, atol=1e-5, rtol=1e-4)


def test_fused_linear_errors_name_the_argument():
    hidden, weight, ids, _, _ = inputs((2, 3), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="input_ids: expected shape"):
        gv.FusedLinearForPPO()(hidden, weight, ids[:, :2])
    with pytest.raises(ValueError, match=r"completion_ids: expected ids in \[0, 11\)"):
        gv.FusedLinearForPPO()(hidden, weight, ids + 11)
    with pytest.raises(ValueError, match="temperature"):
        gv.FusedLinearForPPO()(hidden, weight, ids, 0.0)
    with pytest.raises(ValueError, match="impl_backend"):
        gv.FusedLinearForPPO(impl_backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed")
def test_fused_linear_matches_verls_torch_function():
    verl_tf = verl_torch_functional()
    hidden, weight, ids, d_logp, d_ent = inputs((2, 6), 24, 33, torch.float32, seed=3)
    ours = grads(gv.FusedLinearForPPO(chunk_size=5, backend="torch"), hidden, weight, ids, d_logp, d_ent, 0.6)
    theirs = grads(verl_tf.FusedLinearForPPO(chunk_size=5), hidden, weight, ids, d_logp, d_ent, 0.6)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want.to(got.dtype), atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# the policy losses
# ----------------------------------------------------------------------------------------------


def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    """verl's agg_loss as its docstring states it, for one process."""
    mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    per_seq = (loss_mat * mask).sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1)
    loss = per_seq.mean()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / loss_mat.shape[-1]
    return loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_losses_are_trls(loss_type):
    B, T, H, V = 4, 6, 16, 23
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    old = reference_logprobs(hidden, weight, ids, None, 1.0)[0] + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    is_weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    config = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "tau_pos": 1.0, "tau_neg": 1.05,
              "global_batch_info": {}}
    trl = gv.loss_config(loss_type, config)  # TRL's options from verl's names
    assert trl.resolved_epsilon_high == (1.28 if loss_type == "cispo" else 0.28)

    h = hidden.clone().requires_grad_()
    out = reference_grpo_loss(h, weight, ids, mask.bool(), advantages, old, None, None, trl,
                              importance_sampling_ratio=is_weights)
    out.loss.backward()

    h2 = hidden.clone().requires_grad_()
    log_prob = reference_logprobs(h2, weight, ids, None, 1.0)[0]
    log_prob = torch.where(mask.bool(), log_prob, torch.full_like(log_prob, float("nan")))  # padding unread
    fn = gv.make_policy_loss(loss_type, agg_loss)
    loss, metrics = fn(old_log_prob=old, log_prob=log_prob, advantages=advantages[:, None].expand(B, T),
                       response_mask=mask, loss_agg_mode=gv.LOSS_AGG_MODES[loss_type], config=config,
                       rollout_is_weights=is_weights)
    loss.backward()
    torch.testing.assert_close(loss, out.loss, atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(h2.grad, h.grad, atol=1e-10, rtol=1e-7)
    if loss_type not in ("cispo", "vespo", "sapo"):
        assert metrics["actor/clip_ratio/region_mean"] == pytest.approx(float(out.metrics["clip_ratio/region_mean"]))
    with pytest.raises(ValueError, match="loss_agg_mode: .*expected"):
        fn(old, log_prob, advantages[:, None].expand(B, T), mask, "token-sum", config)


def test_install_patches_verls_modules(monkeypatch):
    registry = {}
    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    core_algos.register_policy_loss = lambda name: (lambda fn: registry.setdefault(name, fn))
    core_algos.agg_loss = agg_loss
    torch_functional = types.ModuleType("verl.utils.experimental.torch_functional")
    modules = {"verl": types.ModuleType("verl"), "verl.trainer": types.ModuleType("verl.trainer"),
               "verl.trainer.ppo": types.ModuleType("verl.trainer.ppo"), "verl.trainer.ppo.core_algos": core_algos,
               "verl.utils": types.ModuleType("verl.utils"),
               "verl.utils.experimental": types.ModuleType("verl.utils.experimental"),
               "verl.utils.experimental.torch_functional": torch_functional}
    modules["verl.trainer.ppo"].core_algos = core_algos
    modules["verl.utils.experimental"].torch_functional = torch_functional
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    names = gv.install()
    assert sorted(registry) == sorted(names) == sorted(f"grpo_fast_{t}" for t in LOSS_TYPES)
    assert torch_functional.FusedLinearForPPO is gv.FusedLinearForPPO
    assert torch_functional.FusedLinearForPPOFunction is gv.FusedLinearForPPOFunction


@pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed")
def test_verls_model_forward_runs_the_patched_function(monkeypatch):
    # verl's own forward for use_fused_kernels with impl_backend=torch (dense_common.py), on a stand-in model:
    # after patch_fused_linear() its per-call import finds grpo-fast's function (fp32 entropy from bf16)
    from transformers.modeling_outputs import BaseModelOutputWithPast

    verl_tf = verl_torch_functional()
    root = os.path.dirname(importlib.util.find_spec("verl").origin)
    spec = importlib.util.spec_from_file_location("verl_dense_common_under_test",
                                                  os.path.join(root, "models", "transformers", "dense_common.py"))
    dense_common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dense_common)
    experimental = types.ModuleType("verl.utils.experimental")
    experimental.torch_functional = verl_tf
    for name, module in {"verl": types.ModuleType("verl"), "verl.utils": types.ModuleType("verl.utils"),
                         "verl.utils.experimental": experimental,
                         "verl.utils.experimental.torch_functional": verl_tf}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(verl_tf, "FusedLinearForPPO", verl_tf.FusedLinearForPPO)  # restored after the test
    monkeypatch.setattr(verl_tf, "FusedLinearForPPOFunction", verl_tf.FusedLinearForPPOFunction)
    gv.patch_fused_linear()

    hidden, weight, ids, _, _ = inputs((1, 9), 16, 31, torch.bfloat16, seed=5)
    model = types.SimpleNamespace(model=lambda **kwargs: BaseModelOutputWithPast(last_hidden_state=hidden), lm_head=types.SimpleNamespace(weight=weight),
                                  config=types.SimpleNamespace(output_attentions=False, output_hidden_states=False),
                                  _verl_fused_kernels_backend="torch")
    out = dense_common.forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=0.8)
    assert out.log_probs.dtype == out.entropy.dtype == torch.float32
    want_logp, want_ent = eager(hidden, weight, torch.roll(ids, -1, -1), 0.8)
    torch.testing.assert_close(out.log_probs.double(), want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy.double(), want_ent, atol=1e-5, rtol=0)


def test_the_verl_integration_imports_neither_transformers_nor_peft():
    """docs/verl.md installs grpo-fast into verl's environment with --no-deps (verl pins an older
    transformers): the integration must not need transformers or peft."""
    import subprocess
    import sys

    code = ("import sys, grpo_fast.integrations.verl; "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
