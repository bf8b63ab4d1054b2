"""The first hour's rough edges, as a new user met them: each is one line naming what to change, with
the exit code of its kind (2: a bad input; docs/training.md, "Exit codes")."""

from __future__ import annotations

import json

import pytest

import grpo_fast.trainer as trainer_module
from grpo_fast.cli import main

PROMPTS = [{"prompt": "Name a prime number."}, {"prompt": "Name a colour."}]
REWARDS = "def short(prompts, completions, completion_ids, **columns):\n    return [float(len(c) < 8) for c in completions]\n"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    (tmp_path / "first_hour_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_dataset_without_its_reward_functions_is_refused(workdir, capsys, monkeypatch):
    """The default reward scores the demo's letters only: training prompts.jsonl on it would be silent nonsense."""
    monkeypatch.setattr(trainer_module, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["train", "--dataset", "prompts.jsonl", "--output_dir", "runs"]) == 2
    line = _one_line(capsys)
    assert line.startswith("grpo-fast train: error: reward_functions:") and "prompts.jsonl" in line
    assert not (workdir / "runs").exists() or not any((workdir / "runs").iterdir())


def test_the_demo_rows_keep_their_reward(workdir):
    from grpo_fast.config import GRPOConfig
    from grpo_fast.tasks import letters_dataset

    trainer_module.check_rewards_fit_the_data(GRPOConfig(), letters_dataset(4), rewards_given=False)
    rows = [{"prompt": "ab:", "letters": "ab"}]  # a dataset of the demo's kind, from a file
    trainer_module.check_rewards_fit_the_data(GRPOConfig(dataset="mine.jsonl"), rows, rewards_given=False)
    with pytest.raises(ValueError, match="reward_functions:"):
        trainer_module.check_rewards_fit_the_data(GRPOConfig(dataset="mine.jsonl"), PROMPTS, rewards_given=False)
    trainer_module.check_rewards_fit_the_data(GRPOConfig(dataset="mine.jsonl"), PROMPTS, rewards_given=True)
    with pytest.raises(ValueError, match="^reward_functions: .* the dataset argument's rows"):  # rows from Python
        trainer_module.check_rewards_fit_the_data(GRPOConfig(), PROMPTS, rewards_given=False, dataset_given=True)


def test_fewer_prompts_than_a_step_takes_is_said(workdir, capsys):
    code = main(["train", "--dataset", "prompts.jsonl", "--reward_functions", "first_hour_rewards:short",
                 "--max_steps", "1", "--num_generations", "2", "--max_completion_length", "4",
                 "--output_dir", "runs", "--progress_bar", "false", "--plot", "false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "the dataset has 2 prompts, fewer than prompts_per_step 8" in out


def test_an_unreachable_hub_fails_at_once_with_one_line(workdir, capsys, monkeypatch):
    """One short probe of the Hub's endpoint (here a closed local port), then the line; transformers'
    retries never start."""
    import huggingface_hub
    import transformers
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: pytest.fail("transformers tried the Hub after the probe failed"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    arguments = ["--model", "someorg/some-model", "--dataset", "prompts.jsonl",
                 "--reward_functions", "first_hour_rewards:short", "--output_dir", "runs"]
    assert main(["train", *arguments]) == 2
    line = _one_line(capsys)
    assert line.startswith("grpo-fast train: error: model:") and "someorg/some-model" in line
    assert "cannot be reached" in line and "local folder" in line
    # cached: the advice is the offline switch
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    assert main(["train", *arguments]) == 2
    assert "in the local cache: set HF_HUB_OFFLINE=1" in _one_line(capsys)
    # the same check and exit code in grpo-fast eval, naming its flag
    assert main(["eval", "--model", "someorg/some-model", "--dataset", "prompts.jsonl"]) == 2
    assert _one_line(capsys).startswith("grpo-fast eval: error: --model:")


@pytest.mark.parametrize("arguments, flag", [
    (["--model", "./no-such-model"], "--model:"),
    (["--model", "tiny", "--dataset", "missing.jsonl"], "--dataset:"),
    (["--model", "tiny", "--adapter", "no-adapter"], "--adapter:"),
])
def test_eval_bad_inputs_exit_2_naming_the_flag_like_train(workdir, capsys, arguments, flag):
    assert main(["eval", *arguments]) == 2
    assert _one_line(capsys).startswith(f"grpo-fast eval: error: {flag}")


def test_eval_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: openai/gsm8k" in out and "(default: test)" in out and "(default: 512)" in out


def test_resuming_a_run_that_does_not_exist_suggests_starting_it(workdir, capsys):
    assert main(["train", "--resume", "--run_name", "never-ran", "--output_dir", "runs"]) == 2
    line = _one_line(capsys)
    assert "resume:" in line and "start the run without resume" in line and "overwrite" not in line
