"""Checkpoints: resume continues exactly; an interrupted save leaves the previous one loadable."""

import json
import shutil

import pytest
import torch

import grpo_fast.checkpoint as checkpoint_module
from grpo_fast.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from grpo_fast.config import GRPOConfig
from grpo_fast.model import load_model
from grpo_fast.trainer import build_optimizer, build_scheduler, train
from helpers import needs_bnb_cpu_repack

FAST = dict(max_steps=4, prompts_per_step=2, num_generations=4, max_completion_length=6, micro_batch_size=4,
            progress_bar=False, plot=False, save_every=2, save_total_limit=3)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _trainable(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


ADAPTIVE = {"loss_type": "cispo", "epsilon_high": 5.0, "use_adaptive_entropy": True, "entropy_coef": 0.01,
            "entropy_target": 10.0, "entropy_coef_delta": 0.01, "rollout_engine": "engine",
            "importance_sampling_correction": "token_truncate"}


@pytest.mark.parametrize("extra", [{}, {"load_in_4bit": True, "lora_r": 4, "beta": 0.05}, ADAPTIVE],
                         ids=["full", "qlora", "adaptive-entropy-engine"])
def test_resume_matches_an_uninterrupted_run(tmp_path, extra):
    config = dict(FAST, output_dir=str(tmp_path), **extra)
    straight = train(GRPOConfig(run_name="straight", **config))
    assert [path.name for path in list_checkpoints(tmp_path / "straight")] == ["step_000002", "step_000004"]

    # An interrupted run: only the step-2 checkpoint and the log up to it survived.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_000002", resumed_dir / "step_000002")
    (tmp_path / "resumed" / "log.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in _log(tmp_path / "straight")[:2]))
    resumed = train(GRPOConfig(run_name="resumed", resume=True, **config))

    assert [record["step"] for record in resumed.history] == [3, 4]
    straight_log, resumed_log = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
    assert [record["step"] for record in resumed_log] == [1, 2, 3, 4]
    assert "grad_scale" not in straight_log[0]  # no loss scaling outside dtype float16
    assert not list((tmp_path / "straight" / "checkpoints").glob("*/scaler.pt"))
    keys = ["data_position", "reward/mean", "completions/mean_length", "loss", "lr"]
    if extra is ADAPTIVE:  # the controller's coefficient moved every step and resumed where it was
        keys.append("entropy_coef")
        assert [record["entropy_coef"] for record in straight_log] == pytest.approx([0.03, 0.05, 0.07, 0.09])
    for key in keys:
        assert [record[key] for record in resumed_log] == [record[key] for record in straight_log], key
    expected, received = _trainable(straight.model), _trainable(resumed.model)
    assert set(expected) == set(received)
    for name in expected:
        torch.testing.assert_close(received[name], expected[name], rtol=0, atol=0, msg=name)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="resume: expected a complete checkpoint under"):
        train(GRPOConfig(output_dir=str(tmp_path), run_name="empty", resume=True, **dict(FAST, max_steps=1)))


def _state(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), **FAST)
    model, tokenizer = load_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    return model, tokenizer, optimizer, scheduler


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, tokenizer, optimizer, scheduler = _state(tmp_path)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, tokenizer, data_position=2)
    saved = _trainable(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)

    def crash(*args, **kwargs):  # dies after the weights are written, before the run's state
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint_module, "rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, tokenizer, data_position=4)
    monkeypatch.undo()

    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_000001"]
    assert latest_checkpoint(tmp_path).name == "step_000001"
    state = load_checkpoint(latest_checkpoint(tmp_path), model, optimizer, scheduler)
    assert state["step"] == 1 and state["data_position"] == 2
    for name, parameter in _trainable(model).items():
        assert torch.equal(parameter, saved[name]), name


def test_a_half_written_folder_is_never_taken_for_a_checkpoint(tmp_path, monkeypatch):
    model, tokenizer, optimizer, scheduler = _state(tmp_path)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, tokenizer, data_position=2)
    # A process killed without cleanup (SIGKILL) leaves its temporary folder behind.
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", lambda *args, **kwargs: None)
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, tokenizer, data_position=4)
    monkeypatch.undo()
    leftovers = [path.name for path in (tmp_path / "checkpoints").iterdir()]
    assert any(name.startswith(".tmp-step_000002") for name in leftovers)
    assert latest_checkpoint(tmp_path).name == "step_000001"
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, tokenizer, data_position=6)  # cleans the leftover
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000003"]


def test_keep_last(tmp_path):
    model, tokenizer, optimizer, scheduler = _state(tmp_path)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, tokenizer, data_position=step, keep_last=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_loading_into_a_different_model_is_an_error(tmp_path):
    model, tokenizer, optimizer, scheduler = _state(tmp_path)
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, tokenizer, data_position=2)
    lora, _ = load_model(GRPOConfig(use_lora=True, lora_r=2))
    with pytest.raises(ValueError, match="checkpoint: expected the model's trainable parameters"):
        load_checkpoint(folder, lora)


@needs_bnb_cpu_repack
def test_saving_leaves_a_4bit_model_unchanged(tmp_path):
    """A checkpoint must not perturb the live model: on CPUs with AVX512-BF16, bitsandbytes repacks
    NF4 weights in an eval-mode forward and re-quantises them when the module's state_dict is taken.
    (The trainer stops the repacking; a model used for inference first may still be repacked.)"""
    config = GRPOConfig(output_dir=str(tmp_path), load_in_4bit=True, lora_r=4, **FAST)
    model, tokenizer = load_model(config)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    input_ids = torch.randint(0, len(tokenizer), (2, 7))
    model.eval()
    with torch.no_grad():
        before = model(input_ids).logits
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, tokenizer, data_position=2)
        after = model(input_ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # The Hugging Face adapter folder still holds every LoRA weight, by PEFT's names.
    from safetensors.torch import load_file

    adapter = load_file(str(latest_checkpoint(tmp_path) / "model" / "adapter_model.safetensors"))
    lora = {name.replace(".default", ""): value for name, value in _trainable(model).items()}
    assert set(adapter) == set(lora)
    for name, value in lora.items():
        assert torch.equal(adapter[name], value), name
