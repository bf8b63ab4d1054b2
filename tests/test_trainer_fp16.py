"""``dtype: float16`` (cards without bf16): NF4 with fp16 compute + LoRA trained with loss scaling,
the scaler's state in checkpoints, full fine-tuning in fp16 refused."""

import json
import math
import shutil
import warnings

import pytest
import torch

import grpo_fast.trainer as trainer_module
from grpo_fast.config import GRPOConfig, load_config
from grpo_fast.model import build_tiny_model, completion_hidden_states, tiny_tokenizer
from grpo_fast.trainer import build_grad_scaler, optimiser_step, train

# No warm-up: the first update the scaler lets through has a learning rate above 0.
FAST = dict(max_steps=3, prompts_per_step=2, num_generations=4, max_completion_length=6, micro_batch_size=8,
            warmup_ratio=0.0, progress_bar=False, plot=False, save_every=2, save_total_limit=3)
FP16_QLORA = dict(dtype="float16", load_in_4bit=True, lora_r=4, lora_alpha=8)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _trainable(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.fixture
def overflowing_scaler(monkeypatch):
    """The trainer's scaler starting at 2**24 and growing after every step, so that a few steps
    overflow the fp16 gradients (skipped) and the scale moves every step (a resume that lost it
    would log other scales)."""
    build = trainer_module.build_grad_scaler

    def build_overflowing(*args):
        scaler = build(*args)
        scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**24, "growth_interval": 1})
        return scaler

    monkeypatch.setattr(trainer_module, "build_grad_scaler", build_overflowing)


def test_fp16_4bit_lora_trains_with_loss_scaling_and_resumes_exactly(tmp_path, overflowing_scaler):
    import bitsandbytes as bnb

    config = dict(FAST, output_dir=str(tmp_path), **FP16_QLORA)
    straight = train(GRPOConfig(run_name="straight", **config))
    model = straight.model

    # The forward runs in fp16: NF4 base weights with fp16 compute, fp16 embeddings / norms / head.
    from grpo_fast.nf4_train import NF4Linear  # the repacked layout (nf4_single_copy), bitsandbytes' compute rule

    quantised = [module for module in model.modules() if isinstance(module, NF4Linear)]
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    assert len(quantised) == 2 * 7 and all(layer.compute_dtype == torch.float16 for layer in quantised)
    assert all(layer.nf4_packed.qweight.dtype == torch.uint8 for layer in quantised)  # buffers, not parameters
    frozen = {parameter.dtype for parameter in model.parameters() if not parameter.requires_grad}
    assert frozen == {torch.float16}
    input_ids = torch.randint(3, len(straight.tokenizer), (2, 7))
    with torch.no_grad():
        hidden = completion_hidden_states(model, input_ids, torch.ones_like(input_ids), 4)
    assert hidden.dtype == torch.float16
    # The scaler relies on peft upcasting the adapters of an fp16 model (autocast_adapter_dtype).
    trained = _trainable(model)
    assert trained and all("lora_" in name for name in trained)
    assert all(parameter.dtype == torch.float32 for parameter in trained.values())
    lora_b = [parameter for name, parameter in trained.items() if "lora_B" in name]
    assert lora_b and all(parameter.abs().sum() > 0 for parameter in lora_b)  # initialised at 0, moved

    records = _log(tmp_path / "straight")
    assert all(math.isfinite(record["loss"]) for record in records)
    assert all(record["grad_scale"] is not None for record in records)
    # 2**24 and 2**23 overflow the fp16 gradients: both optimiser steps skipped, the schedule waits.
    assert records[0]["skipped_steps"] == 2 and records[0]["grad_scale"] == 2.0**22
    assert records[0]["grad_norm"] is None and records[0]["lr"] == GRPOConfig().learning_rate
    assert sum(record["skipped_steps"] for record in records) < 2 * len(records)  # the scale came down: updates
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_000002"
    saved = torch.load(checkpoint / "scaler.pt", weights_only=True)
    assert saved["scale"] == records[1]["grad_scale"] and saved["growth_interval"] == 1

    # An interrupted run: only the step-2 checkpoint and the log up to it survived.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(checkpoint, resumed_dir / "step_000002")
    (tmp_path / "resumed" / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records[:2]))
    resumed = train(GRPOConfig(run_name="resumed", resume=True, **config))

    assert [record["step"] for record in resumed.history] == [3]
    resumed_records = _log(tmp_path / "resumed")
    for key in ("data_position", "reward/mean", "loss", "grad_norm", "lr", "grad_scale", "skipped_steps"):
        assert [record[key] for record in resumed_records] == [record[key] for record in records], key
    expected, received = trained, _trainable(resumed.model)
    for name in expected:
        torch.testing.assert_close(received[name], expected[name], rtol=0, atol=0, msg=name)


def _linear_step_state(scale: float):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    return layer, optimizer, scheduler, scaler


def test_an_overflowing_step_is_skipped_and_the_schedule_waits():
    layer, optimizer, scheduler, scaler = _linear_step_state(2.0**10)
    parameters = list(layer.parameters())
    inputs = torch.randn(3, 4)
    before = [parameter.detach().clone() for parameter in parameters]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaler.scale(layer(inputs).square().mean()).backward()
        layer.weight.grad[0, 0] = math.inf  # an fp16 overflow, as the scaler finds it
        assert optimiser_step(optimizer, scheduler, scaler, parameters, max_grad_norm=1.0) is None
        assert all(torch.equal(parameter, old) for parameter, old in zip(parameters, before))
        assert all(parameter.grad is None for parameter in parameters)
        assert scaler.get_scale() == 2.0**9 and scheduler.last_epoch == 0

        layer(inputs).square().mean().backward()  # the real gradients, for the logged norm
        expected = float(torch.cat([parameter.grad.flatten() for parameter in parameters]).norm())
        layer.zero_grad(set_to_none=True)
        scaler.scale(layer(inputs).square().mean()).backward()
        norm = optimiser_step(optimizer, scheduler, scaler, parameters, max_grad_norm=0.0)
    assert not any("lr_scheduler.step()" in str(warning.message) for warning in caught)  # after optimizer.step()
    assert norm == pytest.approx(expected, rel=1e-6)
    assert scheduler.last_epoch == 1 and scaler.get_scale() == 2.0**9
    assert all(not torch.equal(parameter, old) for parameter, old in zip(parameters, before))


def test_a_disabled_scaler_steps_exactly_as_the_plain_loop():
    """bf16 / fp32 runs: the scaler is disabled and the step is bit-identical to clip + step + schedule."""
    inputs = torch.randn(3, 4)
    layer, optimizer, scheduler, _ = _linear_step_state(1.0)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    plain_layer, plain_optimizer, plain_scheduler, _ = _linear_step_state(1.0)
    for _ in range(3):
        disabled.scale(layer(inputs).square().mean()).backward()
        norm = optimiser_step(optimizer, scheduler, disabled, list(layer.parameters()), max_grad_norm=0.1)
        plain_layer(inputs).square().mean().backward()
        plain_norm = float(torch.nn.utils.clip_grad_norm_(plain_layer.parameters(), 0.1))
        plain_optimizer.step()
        plain_scheduler.step()
        plain_optimizer.zero_grad(set_to_none=True)
        assert norm == plain_norm
    for parameter, plain in zip(layer.parameters(), plain_layer.parameters()):
        assert torch.equal(parameter, plain)
    assert scheduler.last_epoch == plain_scheduler.last_epoch == 3


@pytest.mark.parametrize("overrides", [[], ["--use_lora", "false"]], ids=["default", "use_lora_false"])
def test_float16_full_fine_tuning_is_refused_by_the_config(overrides):
    with pytest.raises(ValueError, match=r"^dtype: expected bfloat16, float32 or auto for full fine-tuning, "
                                         r"received 'float16'.*use_lora: true or load_in_4bit: true"):
        load_config(None, ["--dtype", "float16", *overrides])


def test_float16_with_lora_is_accepted():
    assert GRPOConfig(dtype="float16", use_lora=True).dtype == "float16"
    assert GRPOConfig(dtype="float16", load_in_4bit=True).dtype == "float16"


def test_fp16_trainable_weights_are_refused_before_training(tmp_path):
    """A model passed in with fp16 trainable weights (which the config cannot see) fails before any rollout."""
    config = GRPOConfig(output_dir=str(tmp_path), dtype="float16", use_lora=True, **FAST)
    tokenizer = tiny_tokenizer("abc:")
    model = build_tiny_model(tokenizer).half()
    with pytest.raises(ValueError, match=r"^model: expected fp32 trainable parameters with dtype float16"):
        build_grad_scaler(config, model, torch.device("cpu"))
    with pytest.raises(ValueError, match="loss scaling cannot unscale fp16 gradients"):
        train(config, model=model, tokenizer=tokenizer, generate=lambda *args: pytest.fail("rolled out"))
