"""Held-out evaluation inside training: config checks, what is logged, that the logged score is the
model's greedy score, and that evaluating leaves training unchanged."""

import json

import pytest
import torch

from grpo_fast.config import GRPOConfig
from grpo_fast.tasks import letters_dataset, letters_score
from grpo_fast.trainer import train

FAST = dict(max_steps=3, prompts_per_step=2, num_generations=4, max_completion_length=6, micro_batch_size=4,
            progress_bar=False, save_every=0, plot=False, sample_every=0)


# Held-out rows through an import path (local files and hub ids load through the same load_rows as training).
HELD_OUT = "grpo_fast.tasks:letters_dataset"


@pytest.mark.parametrize("overrides, key", [
    (dict(eval_every=-1), "eval_every"),
    (dict(eval_limit=0), "eval_limit"),
    (dict(eval_batch_size=0), "eval_batch_size"),
    (dict(eval_max_completion_length=0), "eval_max_completion_length"),
])
def test_bad_eval_settings_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"^{key}: expected"):
        GRPOConfig(**overrides)


def test_evaluation_logs_the_greedy_score_of_the_model(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), run_name="eval", eval_every=2, eval_dataset=HELD_OUT,
                        eval_limit=4, eval_batch_size=3, **FAST)
    result = train(config)
    run = tmp_path / "eval"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # every eval_every steps and at the end
    assert ["eval/reward/mean" in record for record in records] == [False, True, True]
    examples = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [example["step"] for example in examples] == [2] * 4 + [3] * 4

    # The last evaluation ran on the final model: recompute its greedy completions independently.
    rows = letters_dataset()[:4]
    model, tokenizer = result.model.eval(), result.tokenizer
    scores, lengths = [], []
    for row in rows:
        ids = torch.tensor([tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=config.max_completion_length,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = output[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        lengths.append(len(new))
        scores.append(letters_score(tokenizer.decode(new, skip_special_tokens=True), row["letters"]))
    final = records[-1]
    assert final["eval/reward/mean"] == pytest.approx(sum(scores) / len(scores))
    assert final["eval/reward/letters_reward/mean"] == pytest.approx(sum(scores) / len(scores))
    assert final["eval/completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert [example["reward"] for example in examples[4:]] == pytest.approx(scores)


def test_evaluating_does_not_change_training(tmp_path):
    plain = train(GRPOConfig(output_dir=str(tmp_path), run_name="plain", **FAST))
    evaluated = train(GRPOConfig(output_dir=str(tmp_path), run_name="evaluated", eval_every=1,
                                 eval_dataset=HELD_OUT, eval_limit=4, **FAST))
    for key in ("reward/mean", "loss", "grad_norm", "completions/mean_length"):
        assert [record[key] for record in evaluated.history] == [record[key] for record in plain.history], key
    assert all("eval/reward/mean" in record for record in evaluated.history)


def test_eval_every_needs_held_out_rows(tmp_path):
    with pytest.raises(ValueError, match="^eval_dataset: expected held-out rows"):
        train(GRPOConfig(output_dir=str(tmp_path), eval_every=2, **FAST))


def test_eval_dataset_argument(tmp_path):
    result = train(GRPOConfig(output_dir=str(tmp_path), run_name="argument", eval_every=3, **dict(FAST, max_steps=3)),
                   eval_dataset=letters_dataset(num_prompts=3, seed=5))
    assert "eval/reward/mean" in result.history[-1]
    with pytest.raises(ValueError, match="prompt_column"):
        train(GRPOConfig(output_dir=str(tmp_path), run_name="bad", **FAST), eval_dataset=[{"question": "x"}])
    with pytest.raises(ValueError, match="^eval_dataset: expected at least one held-out row"):
        train(GRPOConfig(output_dir=str(tmp_path), run_name="empty", **FAST), eval_dataset=[])
