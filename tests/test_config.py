"""GRPOConfig: YAML + command-line overrides, and errors that name the key."""

import pytest

from grpo_fast.config import GRPOConfig, load_config, parse_overrides


def test_defaults_are_the_demo_and_valid():
    config = GRPOConfig()
    assert config.model == "tiny"
    assert config.generation_batch_size == config.prompts_per_step * config.num_generations


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1.0e-5\nmax_steps: 7\nreward_functions: ['a:b', 'c:d']\n"
                    "reward_weights: [1, 0.5]\nepsilon_high: null\n")
    config = load_config(path, ["--max_steps", "9", "--seed=3", "--load_in_4bit", "--lora_target_modules", "q_proj,v_proj"])
    assert config.learning_rate == 1e-5 and config.max_steps == 9 and config.seed == 3
    assert config.reward_functions == ["a:b", "c:d"] and config.reward_weights == [1, 0.5]
    assert config.epsilon_high is None and config.load_in_4bit is True
    assert config.lora_target_modules == ["q_proj", "v_proj"]


def test_override_values_are_parsed_by_type():
    values = parse_overrides(["--temperature", "0.7", "--shuffle", "false", "--epsilon_high", "none",
                              "--reward_weights", "[1, 2.5]", "--run-name", "x"])
    assert values == {"temperature": 0.7, "shuffle": False, "epsilon_high": None, "reward_weights": [1.0, 2.5],
                      "run_name": "x"}


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 1.0e-5\n")
    with pytest.raises(ValueError, match=r"learning_rat: unknown config key .*did you mean 'learning_rate'"):
        load_config(path)


def test_unknown_key_on_command_line_names_it():
    with pytest.raises(ValueError, match="num_generation: unknown config key"):
        load_config(None, ["--num_generation", "4"])


@pytest.mark.parametrize("overrides, message", [
    (["--max_steps", "ten"], "max_steps: expected int, received 'ten'"),
    (["--shuffle", "maybe"], "shuffle: expected bool"),
    (["--loss_type", "ppo"], r"loss_type: expected one of \['dapo'"),
    (["--num_generations", "1"], "num_generations: expected at least 2"),
    (["--top_p", "1.5"], r"top_p: expected a value in \(0, 1\]"),
    (["--reward_weights", "1,2"], "reward_weights: expected one weight per reward function"),
    (["--load_in_4bit", "--use_lora", "false"], "use_lora: expected True or None"),
    (["--learning_rate"], "learning_rate: expected a value after --learning_rate"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_yaml_value_of_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("micro_batch_size: '8'\n")
    with pytest.raises(ValueError, match="micro_batch_size: expected int, received '8'"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ValueError, match="config: expected an existing YAML file"):
        load_config("/nonexistent/run.yaml")


def test_example_yaml_loads_and_its_reward_imports(monkeypatch):
    from pathlib import Path

    from grpo_fast.scoring import load_reward_functions

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))
    config = load_config(root / "examples" / "qwen2.5_7b_qlora.yaml")
    assert config.load_in_4bit and config.model == "Qwen/Qwen2.5-7B-Instruct"
    (reward,) = load_reward_functions(config.reward_functions)
    assert reward(["p", "p"], ["word " * 40, ""], None) == [1.0, 0.0]


def test_loss_options_reach_the_loss():
    from grpo_fast.trainer import loss_config

    config = GRPOConfig(beta=0.1, kl_bias_correction=True, delta=1.5, importance_sampling_level="sequence")
    settings = loss_config(config, 10.0)
    assert (settings.beta, settings.kl_bias_correction, settings.delta, settings.importance_sampling_level,
            settings.num_items_in_batch) == (0.1, True, 1.5, "sequence", 10.0)
