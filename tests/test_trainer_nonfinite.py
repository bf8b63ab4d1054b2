"""A NaN / inf loss or gradient norm: the run stops naming the step and the figure, with the weights
and the last checkpoint as the last good step left them; or, with on_nonfinite: skip, that optimiser
step is skipped and counted in the log."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from grpo_fast.checkpoint import list_checkpoints
from grpo_fast.config import GRPOConfig
from grpo_fast.errors import NonFiniteError
from grpo_fast.model import load_model
from grpo_fast.tasks import letters_reward
from grpo_fast.trainer import train

FAST = dict(max_steps=4, prompts_per_step=2, num_generations=4, max_completion_length=6, micro_batch_size=8,
            progress_bar=False, plot=False, save_every=1, save_total_limit=5)


def _poisoned_at_step_3(config: GRPOConfig, where: str):
    """(model, tokenizer, reward): during step 3's update only, the training forward's hidden states
    ("loss") or the gradient of one weight ("grad_norm") turn NaN / inf. The reward function, called
    once per step before the update, switches the poison on and off."""
    model, tokenizer = load_model(config)
    poisoned = {"on": False}
    if where == "loss":
        def forward_hook(module, inputs, output):
            return output * math.nan if poisoned["on"] and torch.is_grad_enabled() else output

        model.get_decoder().norm.register_forward_hook(forward_hook)
    else:
        model.lm_head.weight.register_hook(lambda grad: grad * math.inf if poisoned["on"] else grad)
    calls = []

    def letters_reward_(prompts, completions, completion_ids, **columns):
        calls.append(1)
        poisoned["on"] = len(calls) == 3
        return letters_reward(prompts, completions, completion_ids, **columns)

    return model, tokenizer, letters_reward_


@pytest.mark.parametrize("where, figure", [("loss", "loss is nan"), ("grad_norm", "grad_norm is inf")])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, where, figure):
    config = GRPOConfig(output_dir=str(tmp_path), run_name="run", **FAST)
    model, tokenizer, reward = _poisoned_at_step_3(config, where)
    with pytest.raises(NonFiniteError, match=rf"^step 3: {figure}.* in optimisation pass 1 of 2; stopped without "
                                             r"saving step 3 \(the last checkpoint, step 2, is intact\)"):
        train(config, model=model, tokenizer=tokenizer, reward_functions=[reward])
    run = tmp_path / "run"
    assert [path.name for path in list_checkpoints(run)] == ["step_000001", "step_000002"]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    saved = load_file(str(run / "checkpoints" / "step_000002" / "trainable.safetensors"))
    for name, parameter in model.named_parameters():  # step 3 changed nothing
        assert torch.equal(parameter.detach(), saved[name]), name


def test_skip_leaves_out_the_non_finite_updates_and_counts_them(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), run_name="run", on_nonfinite="skip", **FAST)
    model, tokenizer, reward = _poisoned_at_step_3(config, "loss")
    result = train(config, model=model, tokenizer=tokenizer, reward_functions=[reward])
    assert [record["nonfinite_skipped"] for record in result.history] == [0, 0, 2, 0]  # both passes of step 3
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged[2]["loss"] is None and logged[2]["grad_norm"] is None and logged[3]["loss"] is not None
    weights = [load_file(str(path / "trainable.safetensors")) for path in list_checkpoints(tmp_path / "run")]
    assert all(torch.equal(weights[2][name], weights[1][name]) for name in weights[1])  # step 3: no update
    assert any(not torch.equal(weights[3][name], weights[2][name]) for name in weights[2])  # step 4 trained
