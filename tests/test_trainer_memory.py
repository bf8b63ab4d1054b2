"""Training to a memory budget: micro-batches packed by tokens give the update that row micro-batches
give, for every loss type; activation offload changes nothing but where saved tensors wait; the
trainer sizes its micro-batches to max_memory_gb (or refuses, naming it, before the first step);
`grpo-fast plan` prints the estimate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from grpo_fast.config import GRPOConfig
from grpo_fast.memory import ModelShape, estimate
from grpo_fast.model import build_tiny_model, tiny_tokenizer
from grpo_fast.rollout import Rollout, build_rollout, SamplingParams
from grpo_fast.tasks import ALPHABET, SEPARATOR
from grpo_fast.trainer import build_grad_scaler, micro_batch_rows, optimise
from tiny_lm import RecordGradients


def _rollout(tokenizer, lengths, seed=0) -> Rollout:
    """8 rows (2 prompts x 4) with completions of the given lengths (no EOS), random tokens."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9)]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    params = SamplingParams(num_generations=4, max_completion_length=max(lengths), eos_token_ids=(1,), pad_token_id=0)
    rows = [{"prompt": "p"}, {"prompt": "q"}]
    return build_rollout(rows, "prompt", prompts, completions, tokenizer, params)


def _gradients(config, rollout, seed=0):
    tokenizer = tiny_tokenizer(ALPHABET + SEPARATOR)
    model = build_tiny_model(tokenizer, seed=seed).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = RecordGradients(parameters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(len(rollout), generator=g)
    old = torch.randn(rollout.completion_ids.shape, generator=g) * 0.1 - 3.0
    ref = old + 0.1 * torch.randn(rollout.completion_ids.shape, generator=g)
    optimise(model, optimizer, scheduler, build_grad_scaler(config, model, torch.device("cpu")), rollout, advantages,
             old, ref, config, torch.device("cpu"))
    return optimizer.gradients[0]


LENGTHS = [12, 3, 7, 1, 12, 5, 2, 9]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo"])
def test_token_packing_gives_the_row_batches_update(loss_type):
    tokenizer = tiny_tokenizer(ALPHABET + SEPARATOR)
    rollout = _rollout(tokenizer, LENGTHS)
    base = GRPOConfig(loss_type=loss_type, micro_batch_size=3, num_iterations=1, max_grad_norm=0.0, beta=0.05,
                      epsilon_high=2.0 if loss_type == "cispo" else 0.28, max_completion_length=12,
                      num_generations=4, prompts_per_step=2, entropy_coef=0.01)
    packed = dataclasses.replace(base, micro_batch_tokens=40)
    groups = micro_batch_rows(rollout, packed)
    assert sorted(int(r) for g in groups for r in g) == list(range(8))  # every row once
    assert len(groups) > 1 and any(len(g) == 1 for g in groups) and any(len(g) > 2 for g in groups)
    expected, received = _gradients(base, rollout), _gradients(packed, rollout)
    for index, (a, b) in enumerate(zip(expected, received)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7, msg=f"{loss_type}: parameter {index}")


def test_packing_respects_the_token_budget():
    tokenizer = tiny_tokenizer(ALPHABET + SEPARATOR)
    rollout = _rollout(tokenizer, LENGTHS)
    config = GRPOConfig(micro_batch_tokens=40, max_completion_length=12, num_generations=4, prompts_per_step=2)
    prompt_lengths = rollout.prompt_mask.sum(1)
    for group in micro_batch_rows(rollout, config):
        width = int(prompt_lengths[group].max()) + int(rollout.completion_lengths[group].max())
        assert len(group) == 1 or len(group) * width <= 40


def test_activation_offload_keeps_the_update():
    tokenizer = tiny_tokenizer(ALPHABET + SEPARATOR)
    rollout = _rollout(tokenizer, LENGTHS)
    base = GRPOConfig(micro_batch_size=4, num_iterations=1, max_grad_norm=0.0, gradient_checkpointing=True,
                      max_completion_length=12, num_generations=4, prompts_per_step=2)
    offload = dataclasses.replace(base, activation_offload=True)
    for a, b in zip(_gradients(base, rollout), _gradients(offload, rollout)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_activation_offload_needs_checkpointing():
    with pytest.raises(ValueError, match="activation_offload: expected gradient_checkpointing: true"):
        GRPOConfig(activation_offload=True)


def test_trainer_sizes_micro_batches_to_the_budget(tmp_path, capsys):
    from grpo_fast.trainer import train

    shape = ModelShape.from_config(build_tiny_model(tiny_tokenizer(ALPHABET + SEPARATOR)).config)
    fast = dict(max_steps=1, prompts_per_step=2, num_generations=4, max_completion_length=6, progress_bar=False,
                plot=False, save_every=0, output_dir=str(tmp_path), micro_batch_size=8)
    config = GRPOConfig(run_name="sized", **fast)
    as_configured = estimate(config, shape, prompt_length=12)
    budget = as_configured.resident + as_configured.phase_bytes("rollout") * 1.01  # rows do not fit together
    sized = GRPOConfig(run_name="sized", max_memory_gb=budget / 2 ** 30, **fast)
    result = train(sized)
    assert len(result.history) == 1
    assert "micro-batches of up to" in capsys.readouterr().out
    with pytest.raises(ValueError, match="max_memory_gb: expected room for the rollout"):
        train(GRPOConfig(run_name="too-small", max_memory_gb=as_configured.resident / 2 ** 30 / 2, **fast))
    assert not (tmp_path / "too-small" / "log.jsonl").exists()  # refused before the first step


def test_a_rollout_over_the_budget_decodes_in_waves(tmp_path, capsys, monkeypatch):
    """A budget with room for one group's KV but not the step's two: the engine decodes the groups
    one at a time instead of failing (one prompt slot, refilled with the second prompt)."""
    from grpo_fast.engine import RolloutEngine
    from grpo_fast.trainer import train

    shape = ModelShape.from_config(build_tiny_model(tiny_tokenizer(ALPHABET + SEPARATOR)).config)
    fast = dict(max_steps=1, prompts_per_step=2, num_generations=4, max_completion_length=6, progress_bar=False,
                plot=False, save_every=0, output_dir=str(tmp_path), rollout_engine="engine")
    one_group = estimate(GRPOConfig(**fast), shape, prompt_length=12, rollout_rows=4)
    both = estimate(GRPOConfig(**fast), shape, prompt_length=12)
    budget = one_group.resident + one_group.phase_bytes("rollout") * 1.01
    assert budget < both.resident + both.phase_bytes("rollout")
    waves = []
    decode = RolloutEngine._decode
    monkeypatch.setattr(RolloutEngine, "_decode",
                        lambda self, *a, **k: waves.append((len(a[3]), k["slots"])) or decode(self, *a, **k))
    result = train(GRPOConfig(run_name="waves", max_memory_gb=budget / 2 ** 30, **fast))
    assert len(result.history) == 1 and waves == [(2, 1)]  # two prompts through one slot (a group of 4)
    assert "the rollout decodes 4 of a step's 8 completions at a time" in capsys.readouterr().out


@pytest.mark.parametrize("example", ["qwen2.5_7b_qlora", "gsm8k_qwen2.5_7b", "gsm8k_qwen2.5_0.5b"])
def test_plan_command_prints_the_estimate(capsys, example):
    from grpo_fast.cli import main

    assert main(["plan", "--config", f"examples/{example}.yaml"]) == 0
    out = capsys.readouterr().out
    assert "rollout KV cache" in out and "peak" in out and "longest completion that fits" in out
    assert "24 GiB:" in out
    # a named model is planned for the GPU run: the 4-bit configs keep one NF4 copy (nf4_single_copy), the
    # engine's decode copy only beside bitsandbytes' weights
    assert "NF4 decode copy" not in out
    if example != "gsm8k_qwen2.5_0.5b":  # that one is bf16
        assert main(["plan", "--config", f"examples/{example}.yaml", "--nf4_single_copy", "false"]) == 0
        assert "NF4 decode copy" in capsys.readouterr().out


def test_plan_command_sizes_to_max_memory_gb(capsys):
    """With max_memory_gb the plan says what the trainer would change: the issue's Llama-3.1-8B goal
    config frees the rollout's memory for training; the Qwen2.5-7B one keeps it and decodes in waves (both
    with bitsandbytes' layers and the engine's NF4 copy: nf4_single_copy false)."""
    from grpo_fast.cli import main

    llama = ["plan", "--model", "meta-llama/Llama-3.1-8B", "--load_in_4bit", "true", "--dtype", "bfloat16",
             "--gradient_checkpointing", "true", "--lora_r", "16", "--prompts_per_step", "1",
             "--num_generations", "8", "--max_completion_length", "20480", "--max_memory_gb", "40",
             "--nf4_single_copy", "false"]  # beside bitsandbytes' weights, the engine's NF4 copy must go
    assert main(llama) == 0
    assert "with max_memory_gb 40: rollout_memory free" in capsys.readouterr().out
    qwen = ["plan", "--config", "examples/qwen2.5_7b_qlora.yaml", "--prompts_per_step", "8",
            "--max_completion_length", "4096", "--max_memory_gb", "24", "--nf4_single_copy", "false"]
    assert main(qwen) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("with max_memory_gb 24: micro-batches of") and "rollout_memory free" not in line
    assert "the rollout in waves of" in line


def test_documented_table_is_the_memory_models():
    from pathlib import Path

    from grpo_fast.memory import readme_table

    assert readme_table() in (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()


def test_rollout_memory_free_samples_without_cuda_graphs():
    """free: the engine runs without CUDA graphs, so it frees its KV cache and repacked NF4 weights after
    each rollout (graphs would read them in place); keep and auto: with graphs."""
    from grpo_fast.trainer import rollout_sampler

    device = torch.device("cpu")
    for memory, graphs in (("free", False), ("keep", True), ("auto", True)):
        engine = rollout_sampler(GRPOConfig(rollout_engine="engine", rollout_memory=memory), device)
        assert engine.cuda_graphs is graphs


def test_plan_with_a_budget_prints_the_budgeted_plan_its_peak_and_headroom(capsys):
    """An adapted config (20,000-token completions in 24 GiB) is shown as the trainer would run it: the
    table's peak is the budgeted plan's, within the budget, and the headroom is budget - peak; GiB only."""
    import re

    from grpo_fast.cli import main

    assert main(["plan", "--config", "examples/qwen2.5_7b_qlora.yaml", "--max_completion_length", "20000",
                 "--max_memory_gb", "24"]) == 0
    out = capsys.readouterr().out
    table_peak = float(re.search(r"^  peak\s+([\d.]+) GiB", out, re.M).group(1))
    last = out.splitlines()[-1]
    stated = re.search(r"; peak ([\d.]+) GiB, headroom ([\d.]+) GiB$", last)
    assert stated, last
    peak, headroom = float(stated.group(1)), float(stated.group(2))
    assert peak == table_peak and peak <= 24 and abs(peak + headroom - 24) <= 0.011
    assert not re.search(r"\d GB\b", out), out  # one unit: GiB
