"""GSM8K recipe and evaluation: the adapter on local files, scoring and JSONL records, and
`grpo-fast eval` end to end on a tiny model (with and without a LoRA adapter) saved by the test."""

import json
from pathlib import Path

import pytest
import torch

from grpo_fast.cli import main as cli_main
from grpo_fast.evaluation import EvalResult, evaluate, main as eval_main, prompt_text
from grpo_fast.recipes import GSM8K_SYSTEM_PROMPT, gsm8k_example, gsm8k_reward_functions, load_gsm8k
from tiny_lm import save_tiny_model, tiny_tokenizer

ROOT_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "A store sells 1,200 pens a week. How many in 3 weeks?", "answer": "1200*3=3600\n#### 3,600"},
    {"question": "The temperature fell from 5 to -3 degrees. What is the final temperature?", "answer": "#### -3"},
    {"question": "What is 7 + 8?", "answer": "7+8=15\n#### 15"},
]


@pytest.fixture
def gsm8k_jsonl(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_example_shape():
    example = gsm8k_example(ROWS[0])
    assert example["prompt"] == [
        {"role": "system", "content": GSM8K_SYSTEM_PROMPT},
        {"role": "user", "content": ROWS[0]["question"]},
    ]
    assert example["answer"] == "72" and example["question"] == ROWS[0]["question"]
    assert "<reasoning>" in GSM8K_SYSTEM_PROMPT and "<answer>" in GSM8K_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="question"):
        gsm8k_example({"problem": "x", "solution": "y"})


def test_load_local_jsonl_and_parquet(tmp_path, gsm8k_jsonl):
    dataset = load_gsm8k(gsm8k_jsonl, split="test")
    assert len(dataset) == 5 and set(dataset.column_names) == {"prompt", "question", "answer"}
    assert dataset["answer"] == ["72", "10", "3,600", "-3", "15"]

    import datasets

    folder = tmp_path / "gsm8k"
    folder.mkdir()
    datasets.Dataset.from_list([dict(row, extra=i) for i, row in enumerate(ROWS)]).to_parquet(str(folder / "train.parquet"))
    dataset = load_gsm8k(folder, split="train", offset=1, limit=2, system_prompt="")
    assert dataset["answer"] == ["10", "3,600"] and "extra" not in dataset.column_names
    assert dataset[0]["prompt"] == [{"role": "user", "content": ROWS[1]["question"]}]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="source.*not found"):
        load_gsm8k(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="test.jsonl"):
        load_gsm8k(tmp_path, split="test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1", "solution": "2"}) + "\n")
    with pytest.raises(ValueError, match="question"):
        load_gsm8k(bad)
    with pytest.raises(ValueError, match="limit"):
        load_gsm8k(bad, limit=0)


def test_reward_functions_score_references(gsm8k_jsonl):
    dataset = load_gsm8k(gsm8k_jsonl, split="test")
    accuracy, fmt = gsm8k_reward_functions()
    completions = [f"<reasoning>\nwork\n</reasoning>\n<answer>\n{a}\n</answer>" for a in ["72", "$10.00", "3600", "-3", "16"]]
    assert accuracy(dataset["prompt"], completions, answer=dataset["answer"]) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert fmt(dataset["prompt"], completions) == [1.0] * 5


class ScriptedModel(torch.nn.Module):
    """Answers each prompt with a canned completion (chosen by the prompt's length), so the
    scoring, the batching order and the JSONL records can be checked exactly."""

    def __init__(self, tokenizer, completions_by_length):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.completions_by_length = tokenizer, completions_by_length

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] is False and (attention_mask[:, -1] == 1).all()  # greedy, left padded
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.completions_by_length[int(mask.sum())]
            new = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens] + [self.tokenizer.eos_token_id]
            rows.append(torch.cat([ids, torch.tensor(new)]))
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        return torch.stack([torch.cat([row, torch.full((width - len(row),), pad)]) for row in rows])


def test_evaluate_scores_and_records(tmp_path, gsm8k_jsonl):
    tokenizer = tiny_tokenizer()
    dataset = load_gsm8k(gsm8k_jsonl, split="test")
    canned = [
        "<reasoning>\n48 + 24\n</reasoning>\n<answer>\n72\n</answer>",  # right, formatted
        "She earned $10.",  # right, unformatted
        "<reasoning>\nx\n</reasoning>\n<answer>\n3,601\n</answer>",  # wrong, formatted
        "<reasoning>cold</reasoning><answer>-3</answer>",  # right, lenient format only
        "I think \\boxed{15}",  # right
    ]
    lengths = [len(tokenizer(prompt_text(p, tokenizer), add_special_tokens=False)["input_ids"]) for p in dataset["prompt"]]
    assert len(set(lengths)) == 5
    model = ScriptedModel(tokenizer, dict(zip(lengths, canned)))
    model.train()
    output = tmp_path / "out" / "eval.jsonl"
    result = evaluate(model, tokenizer, dataset, batch_size=2, max_new_tokens=64, output_path=output, progress=False)
    assert isinstance(result, EvalResult) and model.training  # the mode is given back
    assert (result.accuracy, result.format_rate, result.num_examples) == (0.8, 0.4, 5)
    assert result.metrics()["eval/accuracy"] == 0.8
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["completion"] for r in records] == canned  # in dataset order despite length-sorted batches
    assert [r["predicted"] for r in records] == ["72", "$10", "3,601", "-3", "15"]
    assert [r["correct"] for r in records] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert records[2]["reference"] == "3,600" and records[0]["question"] == ROWS[0]["question"]

    from grpo_fast.rewards import lenient_format_reward

    lenient = evaluate(model, tokenizer, dataset, batch_size=5, max_new_tokens=64, format_reward=lenient_format_reward,
                       progress=False)
    assert lenient.format_rate == 0.6


def test_eval_cli_end_to_end(tmp_path, gsm8k_jsonl, capsys):
    """A tiny random model saved to disk, then a LoRA adapter on it, through `grpo-fast eval`."""
    model_dir = save_tiny_model(tmp_path / "model")
    output = tmp_path / "eval.jsonl"
    argv = ["--model", str(model_dir), "--dataset", str(gsm8k_jsonl), "--split", "test", "--batch-size", "2",
            "--max-new-tokens", "6", "--output", str(output), "--dtype", "float32", "--device", "cpu", "--no-progress"]
    assert cli_main(["eval", *argv]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_examples"] == 5 and 0.0 <= summary["accuracy"] <= 1.0 and summary["format_rate"] == 0.0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 5 and all(1 <= r["completion_tokens"] <= 6 for r in records)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert eval_main(argv + ["--adapter", str(tmp_path / "adapter"), "--limit", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_examples"] == 2
    assert cli_main(["eval", *argv, "--adapter", str(tmp_path / "nowhere")]) == 2  # bad input: exit code 2
    assert "adapter: expected a folder" in capsys.readouterr().err


def test_prepare_writes_prompt_jsonl(tmp_path, gsm8k_jsonl):
    from grpo_fast.recipes import main as recipes_main

    source = tmp_path / "raw"
    source.mkdir()
    (source / "train.jsonl").write_text(gsm8k_jsonl.read_text())
    assert recipes_main(["--output-dir", str(tmp_path / "prepared"), "--source", str(source), "--splits", "train"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "prepared" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["prompt"][1]["role"] == "user" and rows[2]["answer"] == "3,600"
    again = load_gsm8k(tmp_path / "prepared", split="train")  # prepared files load as GSM8K too
    assert again["answer"] == [row["answer"] for row in rows] and again[0]["prompt"] == rows[0]["prompt"]


def test_recipe_config_trains_then_evaluates(tmp_path, gsm8k_jsonl, capsys):
    """The 0.5B recipe YAML through `grpo-fast`'s trainer (tiny local model and data in place of
    the Hub ones), then `grpo-fast eval` on the checkpoint's LoRA adapter."""
    from grpo_fast.config import load_config
    from grpo_fast.recipes import prepare_gsm8k
    from grpo_fast.trainer import train

    model_dir = save_tiny_model(tmp_path / "model")
    (train_file,) = prepare_gsm8k(tmp_path / "data", gsm8k_jsonl, ("test",))
    config = load_config(ROOT_EXAMPLES / "gsm8k_qwen2.5_0.5b.yaml", {
        "model": str(model_dir), "dataset": str(train_file), "output_dir": str(tmp_path / "runs"), "max_steps": 2,
        "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8, "micro_batch_size": 4,
        "dtype": "float32", "plot": False, "progress_bar": False, "sample_every": 0,
        "eval_every": 2, "eval_dataset": str(train_file), "eval_limit": 3, "eval_max_completion_length": 4,
    })
    result = train(config)
    assert len(result.history) == 2 and "reward/accuracy_reward/mean" in result.history[-1]
    assert "eval/reward/accuracy_reward/mean" in result.history[-1]
    assert "eval/reward/strict_format_reward/mean" in result.history[-1]
    adapter = result.run_dir / "checkpoints" / "step_000002" / "model"
    assert (adapter / "adapter_config.json").exists()
    argv = ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--dataset", str(gsm8k_jsonl), "--split",
            "test", "--max-new-tokens", "4", "--output", str(tmp_path / "eval.jsonl"), "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_examples"] == 5
