"""A new user's mistakes through the CLI: each is one line on stderr naming the key or file, with a
non-zero exit code, and comes before any model loads (``--debug`` shows the traceback)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

import grpo_fast.trainer as trainer_module
from grpo_fast.cli import main
from grpo_fast.config import GRPOConfig, config_to_dict

FILES = {
    "bad.yaml": "model: tiny\nlearning_rate: [1e-5\n",
    "typo.yaml": "learning_rat: 1.0e-5\n",
    "list.yaml": "- learning_rate\n- 1.0e-5\n",
    "empty.jsonl": "",
    "broken.jsonl": '{"prompt": "ab:"}\n{"prompt": "cd:"\n',
    "numbers.jsonl": '{"prompt": 3}\n{"prompt": "ab:"}\n',
    "cli_rows_none.py": "def make():\n    return None\n",
    "cli_rows_raise.py": "def make():\n    raise KeyError('question')\n",
    "cli_rows_syntax.py": "def make(:\n    return []\n",
    "a_file": "not a folder\n",
}

# (extra arguments, what the one line must name); every case runs with --output_dir runs
CASES = [
    (["--config", "bad.yaml"], ["config:", "bad.yaml", "line 3"]),
    (["--config", "typo.yaml"], ["learning_rat: unknown config key", "typo.yaml", "learning_rate"]),
    (["--config", "list.yaml"], ["config:", "list.yaml", "mapping"]),
    (["--config", "missing.yaml"], ["config:", "missing.yaml"]),
    (["--learning_rte", "1e-4"], ["learning_rte: unknown config key"]),
    (["--max_steps", "ten"], ["max_steps:", "'ten'"]),
    (["--save_every", "-1"], ["save_every:", "-1"]),
    (["--sample_every", "-1"], ["sample_every:", "-1"]),
    (["--max_grad_norm", "-1"], ["max_grad_norm:", "-1"]),
    (["--max_grad_norm", "nan"], ["max_grad_norm:", "nan"]),
    (["--epsilon_high", "-1"], ["epsilon_high:", "-1"]),
    (["--beta", "nan"], ["beta:", "nan"]),
    (["--learning_rate", "nan"], ["learning_rate:", "nan"]),
    (["--learning_rate", "0"], ["learning_rate:", "positive"]),
    (["--seed", "-1"], ["seed:", "-1"]),
    (["--lora_alpha", "0", "--use_lora", "true"], ["lora_alpha:", "0"]),
    (["--run_name", "../x"], ["run_name:", "'../x'"]),
    (["--resume", "--overwrite"], ["overwrite:", "resume"]),
    (["--dtype", "float16"], ["dtype:", "float16"]),
    (["--eval_every", "5"], ["eval_dataset:", "eval_every"]),
    (["--resume"], ["resume:", "taken", "before its first save"]),
    (["--resume", "--output_dir", "no_runs"], ["resume:", "no_runs"]),
    (["--run_name", "taken"], ["run_name:", "taken", "overwrite"]),
    (["--run_name", "old", "--resume", "--learning_rate", "0.1"], ["learning_rate:", "0.003", "0.1"]),
    (["--run_name", "old", "--resume", "--max_steps", "2"], ["max_steps:", "step 2"]),
    (["--output_dir", "a_file/runs"], ["output_dir:", "a_file"]),
    (["--dataset", "empty.jsonl"], ["dataset:", "empty.jsonl", "empty file"]),
    (["--dataset", "broken.jsonl"], ["dataset:", "broken.jsonl", "JSON parse error"]),
    (["--dataset", "numbers.jsonl"], ["dataset:", "numbers.jsonl", "row 0", "int"]),
    (["--dataset", "missing.jsonl"], ["dataset:", "missing.jsonl", "not found"]),
    (["--dataset", "cli_rows_none:make"], ["dataset:", "cli_rows_none:make", "NoneType"]),
    (["--dataset", "cli_rows_raise:make"], ["dataset:", "cli_rows_raise:make", "KeyError"]),
    (["--dataset", "cli_rows_syntax:make"], ["dataset:", "cli_rows_syntax.py:1", "SyntaxError"]),
    (["--prompt_column", "question"], ["prompt_column:", "'question'"]),
    (["--reward_functions", "cli_no_such_module:f"], ["reward_functions[0]:", "cli_no_such_module"]),
    (["--reward_functions", "grpo_fast.tasks:ALPHABET"], ["reward_functions[0]:", "callable"]),
    (["--eval_every", "1", "--eval_dataset", "missing_eval.jsonl"], ["eval_dataset:", "missing_eval.jsonl"]),
    (["--model", "./no-such-model"], ["model:", "./no-such-model", "no such folder"]),
    (["--model", "a_file"], ["model:", "a_file"]),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    # a run that exists, and a run with a checkpoint at step 2 written with the default config
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "log.jsonl").write_text('{"step": 1}\n')
    checkpoint = tmp_path / "runs" / "old" / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    saved = config_to_dict(GRPOConfig(output_dir="runs", run_name="old"))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "data_position": 16, "config": saved}))
    for path in (checkpoint / "trainer_state.json", tmp_path / "runs" / "old"):  # "taken" was written last
        os.utime(path, (time.time() - 600, time.time() - 600))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input error was found")

    monkeypatch.setattr(trainer_module, "load_model", no_model)
    return tmp_path


@pytest.mark.parametrize("arguments, named", CASES, ids=[" ".join(case[0]) for case in CASES])
def test_a_bad_input_is_one_line_naming_it(workdir, capsys, arguments, named):
    if "--output_dir" not in arguments:
        arguments = [*arguments, "--output_dir", "runs"]
    code = main(["train", *arguments, "--progress_bar", "false"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("grpo-fast train: error: "), lines[0]
    for text in named:
        assert text in lines[0], (text, lines[0])


def test_nothing_is_written_for_a_refused_run(workdir, capsys):
    before = sorted(path.relative_to(workdir) for path in workdir.rglob("*"))
    for arguments in (["--save_every", "-1"], ["--run_name", "taken"], ["--dataset", "broken.jsonl"],
                      ["--model", "./no-such-model"]):
        assert main(["train", *arguments, "--output_dir", "runs"]) == 2
    assert sorted(path.relative_to(workdir) for path in workdir.rglob("*") if "__pycache__" not in str(path)) == [
        path for path in before if "__pycache__" not in str(path)]
    assert (workdir / "runs" / "taken" / "log.jsonl").read_text() == '{"step": 1}\n'  # the old run untouched


def test_debug_shows_the_traceback(workdir, monkeypatch):
    with pytest.raises(ValueError, match="save_every: expected >= 0"):
        main(["train", "--save_every", "-1", "--debug"])
    monkeypatch.setenv("GRPO_FAST_DEBUG", "1")
    with pytest.raises(ValueError, match="run_name: expected a folder name"):
        main(["train", "--run_name", "../x"])


def test_every_config_key_is_validated_before_the_model_loads():
    """Each key has a value the config refuses at construction (the table above covers the CLI
    path): the refusal never waits for torch or peft to choke on it."""
    refused = {"output_dir": "", "run_name": "a/b", "seed": 2**32, "max_steps": 0, "resume": "yes", "overwrite": 1,
               "model": "", "dtype": "fp8", "load_in_4bit": "no", "nf4_single_copy": "yes", "use_lora": "no", "lora_r": 0, "lora_alpha": -1,
               "lora_dropout": 1.0, "lora_target_modules": [], "gradient_checkpointing": None,
               "attn_implementation": "", "trust_remote_code": "yes", "dataset": " ", "dataset_config": "",
               "dataset_split": "", "prompt_column": "", "shuffle": "no", "prompts_per_step": 0,
               "num_generations": 1, "max_completion_length": 0, "temperature": 0.0, "top_p": 0.0, "top_k": -1,
               "min_p": 1.5, "replay_truncation": "yes", "stop_strings": [""], "mask_truncated_completions": 0, "rollout_engine": "vllm",
               "rollout_memory": "offload",
               "reward_functions": [], "reward_weights": [float("inf")], "tools": "calc:add",
               "environment": ["my_env:Env"], "max_tool_calling_iterations": -1, "tool_timeout": 0.0, "loss_type": "ppo", "beta": -0.1,
               "epsilon_low": 1.0, "epsilon_high": float("nan"), "delta": 0.5, "kl_bias_correction": "yes",
               "importance_sampling_level": "batch", "sapo_temperature_pos": 0.0, "sapo_temperature_neg": -1.0,
               "vespo_k_pos": -1.0, "vespo_lambda_pos": float("inf"), "vespo_k_neg": -2.0, "vespo_lambda_neg": -1.0,
               "entropy_coef": float("nan"), "use_adaptive_entropy": "on", "entropy_coef_min": -1.0,
               "entropy_coef_max": float("inf"), "entropy_coef_delta": -0.1, "entropy_target": float("nan"),
               "top_entropy_quantile": 1.5, "off_policy_mask_threshold": -1.0,
               "importance_sampling_correction": "sequence", "importance_sampling_clip_min": -1.0,
               "importance_sampling_clip_max": float("nan"), "scale_rewards": "std", "num_iterations": 0,
               "micro_batch_size": 0, "micro_batch_tokens": 0, "max_memory_gb": float("nan"),
               "activation_offload": "yes", "loss_backend": "cuda", "loss_chunk_size": 0, "optimizer": "sgd",
               "learning_rate": -1e-5, "weight_decay": -0.1, "adam_beta1": 1.0, "adam_beta2": -0.5,
               "warmup_ratio": 1.0, "lr_scheduler": "linear", "max_grad_norm": float("inf"),
               "on_nonfinite": "ignore", "eval_every": -1, "eval_dataset": "", "eval_dataset_split": "",
               "eval_dataset_config": "", "eval_limit": 0, "eval_batch_size": 0, "eval_max_completion_length": 0,
               "sample_every": -5, "num_samples": 0, "tensorboard": "yes", "progress_bar": "no", "plot": 2,
               "save_every": -20, "save_total_limit": 0}
    assert set(refused) == {item.name for item in dataclasses.fields(GRPOConfig)}
    for key, value in refused.items():
        with pytest.raises(ValueError, match=rf"^{key}: expected"):
            GRPOConfig(**{key: value})


def test_a_reward_function_that_raises_is_one_line_naming_it_and_the_completion(workdir, monkeypatch, capsys):
    from grpo_fast.model import load_model

    monkeypatch.setattr(trainer_module, "load_model", load_model)  # this mistake shows only once training runs
    (workdir / "cli_picky_reward.py").write_text(
        "TARGET = []\n\n"
        "def picky(prompts, completions, completion_ids, **columns):\n"
        "    TARGET.append(TARGET[0] if TARGET else completions[-1])\n"
        "    if TARGET[0] in completions:\n"
        "        raise KeyError('answer')\n"
        "    return [0.0] * len(completions)\n")
    code = main(["train", "--output_dir", "runs", "--reward_functions", "cli_picky_reward:picky", "--max_steps", "1",
                 "--prompts_per_step", "2", "--num_generations", "2", "--progress_bar", "false"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    import cli_picky_reward

    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("grpo-fast train: stopped: reward function 'picky' raised KeyError: 'answer' on "
                               "completion "), lines[0]
    assert lines[0].endswith(f": {cli_picky_reward.TARGET[0]!r}"), lines[0]


def test_whitespace_stop_strings_are_accepted():
    """A blank line is a common stop string: only the empty string is refused there."""
    assert GRPOConfig(stop_strings=["\n\n", " "]).stop_strings == ["\n\n", " "]
    with pytest.raises(ValueError, match="^model: expected"):
        GRPOConfig(model="  ")
