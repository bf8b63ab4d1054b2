"""FusedGRPOTrainer under every precision set-up TRL trains in on CPU: the logits check reads the precision
the model's head product was computed in (autocast's), not the dtype its tensors are stored in; under
autocast the fused loss computes fp32 logits from the same hidden states, so it equals trl.GRPOTrainer
with ``cast_lm_head_to_fp32`` (whose fused head runs outside autocast) to fp32 rounding, and TRL's default
(logit tiles rounded to autocast's dtype) within that rounding; and a short run trains in each set-up."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from grpo_fast.integrations.trl import FusedGRPOTrainer  # noqa: E402
from grpo_fast.logits import IDENTITY, LogitTransform, autocast_dtype, check_logits  # noqa: E402
from test_trl_integration import PROMPTS, grpo_config, length_reward, loss_and_grads, make_batch  # noqa: E402
from tiny_lm import tiny_model, tiny_tokenizer  # noqa: E402


def completion_text(completion) -> str:
    """A standard completion, or a conversational one's last message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def varied_reward(prompts, completions, **columns):
    """Differs between a group's completions (random bytes from a random model), so advantages are not 0."""
    return [float(sum(completion_text(c).encode()) % 7) for c in completions]


# --------------------------------------------------------------------------------------------
# The logits check
# --------------------------------------------------------------------------------------------


def test_the_logits_check_reads_the_autocast_precision():
    """fp32 weights under bf16 autocast: fp32 tensors holding a bf16 product (accelerate converts the
    outputs to fp32). Judged as fp32 they fail the check; judged at the precision read inside the
    autocast context they pass, and a wrong transform still fails at that precision."""
    model = tiny_model(tiny_tokenizer())
    input_ids = torch.tensor([[3, 40, 90, 200, 7, 11]])
    assert autocast_dtype("cpu") is None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compute_dtype = autocast_dtype("cpu")
        outputs = model(input_ids=input_ids, output_hidden_states=True)
    assert compute_dtype == torch.bfloat16
    hidden, logits = outputs.hidden_states[-1], outputs.logits.float()
    assert hidden.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r"differ by .* \(relative, tolerance 0.001\)"):
        check_logits(model, hidden, logits, IDENTITY)  # the bf16 rounding taken for a wrong model
    check_logits(model, hidden, logits, IDENTITY, compute_dtype=compute_dtype)
    with pytest.raises(ValueError, match="the model's head computed in torch.bfloat16"):
        check_logits(model, hidden, logits, LogitTransform(scale=0.8), compute_dtype=compute_dtype)
    # The check's own product runs outside autocast: called inside one, it still passes on exact logits.
    with torch.no_grad():
        exact = model(input_ids=input_ids, output_hidden_states=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_logits(model, exact.hidden_states[-1], exact.logits, IDENTITY)


# --------------------------------------------------------------------------------------------
# Loss and gradients under autocast, against trl.GRPOTrainer on the same batch
# --------------------------------------------------------------------------------------------


def _trainers(tmp_path, model, **overrides):
    """trl.GRPOTrainer (TRL's default head), trl.GRPOTrainer with cast_lm_head_to_fp32, FusedGRPOTrainer."""
    tokenizer = tiny_tokenizer()
    common = dict(reward_funcs=[length_reward], train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                  processing_class=tokenizer)
    args = grpo_config(tmp_path, **overrides)
    return (trl.GRPOTrainer(model=copy.deepcopy(model), args=args, **common),
            trl.GRPOTrainer(model=copy.deepcopy(model), args=grpo_config(tmp_path, cast_lm_head_to_fp32=True,
                                                                         **overrides), **common),
            FusedGRPOTrainer(model=copy.deepcopy(model), args=copy.deepcopy(args), loss_backend="torch", **common))


@pytest.fixture(scope="module")
def bf16_autocast_trainers(tmp_path_factory):
    model = tiny_model(tiny_tokenizer(), bias=True)
    trainers = _trainers(tmp_path_factory.mktemp("bf16-autocast"), model, bf16=True)
    assert all(t.accelerator.native_amp and t.accelerator.mixed_precision == "bf16" for t in trainers)
    return trainers


def _assert_within(actual, expected, tolerance, name):
    """|actual - expected| <= tolerance * max |expected| (gradients are compared tensor by tensor)."""
    scale = expected.abs().max().clamp(min=1e-12)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance}"
    return error


def _compare(trainers, inputs, setup=lambda trainer: None, context=None, scale=1.0):
    results = []
    for trainer in trainers:
        setup(trainer)
        trainer._metrics["train"].clear()
        trainer.current_gradient_accumulation_steps = 2
        with context() if context else torch.autocast("cpu", enabled=False):
            trainer.model.train()
            trainer.model.zero_grad()
            loss = trainer.compute_loss(trainer.model, inputs)
        (loss * scale).backward()
        grads = {name: p.grad / scale for name, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
        results.append((loss.detach(), grads, metrics))
    return results


# TRL's default head rounds each logit to bf16 (relative 2^-9) before the log-softmax: the loss and the
# gradients move by a few of those roundings (up to ~1e-2 of a tensor's largest gradient here). Its fp32
# head and grpo-fast's read the same hidden states and agree to fp32 rounding (~3e-7 here).
BF16_ROUNDING = 3e-2
FP32_HEAD = 1e-5


@pytest.mark.parametrize("loss_type, level, beta", [
    ("dapo", "token", 0.04), ("grpo", "sequence", 0.0), ("bnpo", "token", 0.0), ("dr_grpo", "token", 0.04),
    ("luspo", "sequence", 0.0), ("cispo", "token", 0.04), ("sapo", "token", 0.0), ("vespo", "token", 0.0)])
def test_same_loss_as_trl_under_bf16_autocast(bf16_autocast_trainers, loss_type, level, beta):
    inputs = make_batch(bf16_autocast_trainers[0], torch.Generator().manual_seed(5))

    def setup(trainer):
        trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
        trainer.epsilon_high = 1.2 if loss_type == "cispo" else 0.28

    (trl_loss, trl_grads, trl_metrics), (fp32_loss, fp32_grads, fp32_metrics), (loss, grads, metrics) = _compare(
        bf16_autocast_trainers, inputs, setup)
    assert trl_grads.keys() == fp32_grads.keys() == grads.keys() and "lm_head.weight" in grads
    torch.testing.assert_close(loss, fp32_loss, rtol=1e-4, atol=1e-6)
    _assert_within(loss, trl_loss, BF16_ROUNDING, "loss")
    head_rounding = max(_assert_within(grads[name], trl_grads[name], BF16_ROUNDING, name) for name in grads)
    for name in grads:
        _assert_within(grads[name], fp32_grads[name], FP32_HEAD, name)
    assert head_rounding > 10 * FP32_HEAD  # grpo-fast's logits are fp32: TRL's bf16 tiles are not what it computes
    assert metrics.keys() == trl_metrics.keys()
    for name in metrics:
        assert metrics[name] == pytest.approx(fp32_metrics[name], rel=1e-3, abs=1e-5, nan_ok=True), name
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=BF16_ROUNDING, abs=1e-3, nan_ok=True), name


def test_same_loss_as_trl_under_fp16_autocast_with_loss_scaling(tmp_path):
    """fp32 weights, fp16 autocast and a scaled loss: what fp16=True runs on a GPU. Accelerate runs neither
    autocast nor a GradScaler on CPU (fp16=True trains in fp32 there, see the training test), so the
    context and the scale are applied here as accelerate applies them on a GPU."""
    model = tiny_model(tiny_tokenizer(), bias=True)
    trainers = _trainers(tmp_path, model, bf16=False)
    inputs = make_batch(trainers[0], torch.Generator().manual_seed(6))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    results = _compare(trainers, inputs, context=lambda: torch.autocast("cpu", dtype=torch.float16),
                       scale=scaler.get_scale())
    (trl_loss, trl_grads, _), (fp32_loss, fp32_grads, _), (loss, grads, _) = results
    torch.testing.assert_close(loss, fp32_loss, rtol=1e-4, atol=1e-6)
    _assert_within(loss, trl_loss, 5e-3, "loss")  # fp16 rounds 8 times finer than bf16
    head_rounding = 0.0
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name
        _assert_within(grads[name], fp32_grads[name], FP32_HEAD, name)
        head_rounding = max(head_rounding, _assert_within(grads[name], trl_grads[name], 5e-3, name))
    assert head_rounding > 10 * FP32_HEAD


# --------------------------------------------------------------------------------------------
# A short run in each precision set-up
# --------------------------------------------------------------------------------------------


def train_and_check(trainer, expected_metrics=("entropy", "reward")):
    """What TRL's tests assert of a run: every trainable tensor changed, the loss is logged at every step and
    each metric at least once (rewards only at generation steps), all finite. Returns the train log entries."""
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    unchanged = [name for name, p in trainer.model.named_parameters()
                 if name in before and torch.equal(p.detach(), before[name])]
    assert before and not unchanged, f"parameters that did not change: {unchanged}"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and trainer.state.log_history[-1]["train_loss"] is not None
    assert all(torch.isfinite(torch.tensor(float(entry["loss"]))) for entry in logs), logs
    for name in expected_metrics:
        values = [float(entry[name]) for entry in logs if name in entry]
        assert values and torch.isfinite(torch.tensor(values)).all(), (name, logs)
    return logs


# set-up: (weights' dtype, GRPOConfig options). bf16=True is TRL's default (use_cpu=True lets it autocast on
# CPU). fp16=True: accelerate runs neither fp16 autocast nor a GradScaler on CPU (it trains in fp32 there);
# the loss under fp16 autocast with a scaled loss is compared with TRL above.
PRECISIONS = {
    "fp32": (torch.float32, dict(bf16=False)),
    "bf16-weights": (torch.bfloat16, dict(bf16=True)),
    "fp16-weights": (torch.float16, dict(bf16=False)),
    "fp32-weights-bf16-autocast": (torch.float32, dict(bf16=True)),
    "fp32-weights-fp16-flag": (torch.float32, dict(bf16=False, fp16=True)),
    "cast_lm_head_to_fp32": (torch.bfloat16, dict(bf16=True, cast_lm_head_to_fp32=True)),
}


@pytest.mark.parametrize("setup", list(PRECISIONS))
def test_trains_in_every_precision_setup(tmp_path, setup):
    dtype, options = PRECISIONS[setup]
    tokenizer = tiny_tokenizer()
    trainer = FusedGRPOTrainer(
        model=tiny_model(tokenizer).to(dtype), reward_funcs=[varied_reward],
        args=grpo_config(tmp_path, max_steps=1, **options),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    autocast = trainer.accelerator.native_amp
    assert autocast == options.get("bf16", False)  # the set-up is the one named
    train_and_check(trainer, ("entropy", "reward", "clip_ratio/region_mean"))
    head = trainer.model.get_output_embeddings().weight
    assert head.dtype == (torch.float32 if options.get("cast_lm_head_to_fp32") else dtype)
    assert trainer._head_compute_dtype == (torch.bfloat16 if autocast else None)
