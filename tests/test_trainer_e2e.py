"""End-to-end training runs on tiny models built in code: full precision, 4-bit + LoRA, the CLI,
the built-in task learning, the hidden-state alignment the loss relies on."""

import json

import pytest
import torch

from grpo_fast.cli import main
from grpo_fast.config import GRPOConfig
from grpo_fast.model import load_model
from grpo_fast.rollout import hf_generate
from grpo_fast.trainer import batch_logprobs, generate_rollout, train
from helpers import needs_bnb_cpu_repack

FAST = dict(max_steps=3, prompts_per_step=2, num_generations=4, max_completion_length=6, micro_batch_size=3,
            progress_bar=False, save_every=0)

STEP_KEYS = {"step", "data_position", "reward/mean", "reward/std", "reward/letters_reward/mean", "frac_reward_zero_std",
             "completions/mean_length", "completions/min_length", "completions/max_length",
             "completions/clipped_ratio", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "loss", "grad_norm", "lr", "time/generation", "time/scoring",
             "time/training", "tokens_per_second", "peak_memory_gb"}


def _trainable(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_full_precision_run_writes_log_plot_checkpoint(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), run_name="full", sample_every=2, **FAST)
    before = _trainable(load_model(config)[0])
    result = train(config)
    run = tmp_path / "full"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    assert STEP_KEYS <= set(records[0]), STEP_KEYS - set(records[0])
    assert records[-1]["data_position"] == 6
    assert (run / "reward_length.png").stat().st_size > 1000
    assert json.loads((run / "samples.jsonl").read_text().splitlines()[0])["step"] == 2
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step_000003"]
    assert (run / "checkpoints" / "step_000003" / "model" / "model.safetensors").exists()
    after = _trainable(result.model)
    assert set(after) == set(before) and any(not torch.equal(before[name], after[name]) for name in before)


def test_4bit_lora_run_with_reference_kl(tmp_path):
    import bitsandbytes as bnb
    config = GRPOConfig(output_dir=str(tmp_path), run_name="qlora", load_in_4bit=True, lora_r=4, lora_alpha=8,
                        beta=0.1, gradient_checkpointing=True, **FAST)
    result = train(config)
    model = result.model
    from grpo_fast.nf4_train import NF4Linear

    # q, k, v, o, gate, up, down in each of the 2 blocks, in the repacked layout (nf4_single_copy)
    quantised = [module for module in model.modules() if isinstance(module, NF4Linear)]
    assert len(quantised) == 2 * 7 and not any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    assert all(layer.gradient_checkpointing for layer in model.get_decoder().layers)
    trainable = _trainable(model)
    assert trainable and all("lora_" in name for name in trainable)
    assert any(name.endswith("lora_B.default.weight") and parameter.abs().sum() > 0 for name, parameter in trainable.items())
    records = [json.loads(line) for line in (tmp_path / "qlora" / "log.jsonl").read_text().splitlines()]
    assert all(record["kl"] is not None and record["kl"] >= 0 for record in records)
    assert records[-1]["kl"] > 0  # the adapter has moved the policy off the reference
    adapter = tmp_path / "qlora" / "checkpoints" / "step_000003" / "model"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()


def test_cli_runs_a_yaml_config_with_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"output_dir: {tmp_path}\nrun_name: cli\nmax_steps: 5\nprompts_per_step: 2\n"
                    "num_generations: 4\nmax_completion_length: 6\nprogress_bar: false\n")
    assert main(["train", "--config", str(path), "--max_steps", "2", "--loss_type", "grpo"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {tmp_path / 'cli'}" in out
    records = (tmp_path / "cli" / "log.jsonl").read_text().splitlines()
    assert len(records) == 2
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["loss_type"] == "grpo"


def test_cli_errors_name_the_key(tmp_path, capsys):
    assert main(["train", "--output_dir", str(tmp_path), "--learning_rte", "1e-4"]) == 2
    assert "learning_rte: unknown config key" in capsys.readouterr().err
    assert main(["train", "--output_dir", str(tmp_path), "--prompt_column", "question", "--max_steps", "1"]) == 2
    assert "prompt_column: expected a column 'question'" in capsys.readouterr().err


def test_builtin_task_reward_rises(tmp_path):
    # The embedded default, shortened: a randomly initialised model starts near 0.2.
    result = train(GRPOConfig(output_dir=str(tmp_path), max_steps=30, progress_bar=False, save_every=0, plot=False))
    rewards = [record["reward/mean"] for record in result.history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # Seeds 0-5 give first-5 means of 0.27-0.30 and last-5 means of 0.63-0.81.
    assert rewards[0] < 0.3 and last > first + 0.25, (rewards[0], first, last)


def test_hidden_states_align_with_the_model_logits():
    # The trainer's fused log-probs (decoder hidden states -> token_logprobs) must equal
    # log_softmax of the model's own logits at the position before each completion token,
    # with left-padded prompts of different lengths.
    config = GRPOConfig(**FAST)
    model, tokenizer = load_model(config)
    rows = [{"prompt": "abc:"}, {"prompt": "h:"}]
    rollout = generate_rollout(model, tokenizer, rows, config, hf_generate)
    logps = batch_logprobs(model, rollout, config, torch.device("cpu"))
    attention_mask = rollout.attention_mask
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    width = rollout.prompt_ids.shape[1]
    expected = torch.log_softmax(logits[:, width - 1:-1].float(), -1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(logps[mask], expected[mask], atol=1e-4, rtol=1e-4)


def test_custom_generate_with_wrong_count_is_an_error(tmp_path):
    def generate(model, prompt_ids, params):
        return [[5]] * (len(prompt_ids) * params.num_generations - 1)

    config = GRPOConfig(output_dir=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="completion_token_ids: expected 2 prompts x 4 generations = 8 completions, received 7"):
        train(config, generate=generate)


def test_8bit_optimizer_updates_lora(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), use_lora=True, lora_r=4, optimizer="paged_adamw_8bit",
                        **dict(FAST, max_steps=2))
    result = train(config)
    lora_b = [parameter for name, parameter in result.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(parameter.abs().sum() > 0 for parameter in lora_b)  # initialised at 0, moved


@needs_bnb_cpu_repack
def test_eval_mode_passes_keep_4bit_gradients():
    """An eval-mode no-grad pass (rollouts, log-probs) must not switch bitsandbytes to its CPU inference
    layout, whose kernel has no autograd: LoRA gradients stay those of a model never run in eval mode."""
    config = GRPOConfig(load_in_4bit=True, lora_r=4, nf4_single_copy=False, **FAST)  # bitsandbytes' layers
    input_ids = torch.randint(0, 10, (2, 7))

    def lora_grads(eval_pass_first):
        torch.manual_seed(0)  # the same LoRA initialisation
        model, _ = load_model(config)
        if eval_pass_first:
            model.eval()
            with torch.no_grad():
                model(input_ids)
        model.train()
        model(input_ids).logits.float().square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    expected, received = lora_grads(False), lora_grads(True)
    for name in expected:
        torch.testing.assert_close(received[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@needs_bnb_cpu_repack
def test_training_a_model_already_repacked_for_inference_is_an_error(tmp_path):
    from grpo_fast.model import keep_nf4_layout_for_training

    config = GRPOConfig(load_in_4bit=True, lora_r=4, nf4_single_copy=False, output_dir=str(tmp_path), **FAST)
    model, tokenizer = load_model(config)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on a freshly built layer
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 10, (1, 5)))
    with pytest.raises(ValueError, match="^model: expected NF4 layers in bitsandbytes' standard layout"):
        keep_nf4_layout_for_training(model)
    with pytest.raises(ValueError, match="repacked for its CPU inference kernel"):
        train(config, model=model, tokenizer=tokenizer)
