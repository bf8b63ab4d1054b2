"""Prompts, rollouts and reward scoring: the pieces before the loss, and their errors."""

import json

import pytest
import torch

from grpo_fast.config import GRPOConfig
from grpo_fast.data import load_prompts, prompt_indices, render_prompts, tokenize_prompts
from grpo_fast.model import build_tiny_model, tiny_tokenizer
from grpo_fast.rollout import SamplingParams, build_rollout, cut_at_eos
from grpo_fast.scoring import load_reward_functions, score
from grpo_fast.tasks import letters_dataset, letters_reward, letters_score


@pytest.fixture
def tokenizer():
    return tiny_tokenizer("abcdefgh:")


def _params(tokenizer, group_size=2, max_length=4):
    return SamplingParams(num_generations=group_size, max_completion_length=max_length,
                          eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)


# ---- data -------------------------------------------------------------------------------------


def test_local_jsonl_and_missing_prompt_column(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(3)))
    rows = load_prompts(GRPOConfig(dataset=str(path), prompt_column="question"))
    assert len(rows) == 3 and rows[1]["question"] == "q1"
    with pytest.raises(ValueError, match=r"prompt_column: expected a column 'prompt' in dataset .*received columns \['question', 'answer'\]"):
        load_prompts(GRPOConfig(dataset=str(path)))


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"dataset: expected an existing \.jsonl/\.json/\.parquet file, received .*missing.jsonl. \(not found\)"):
        load_prompts(GRPOConfig(dataset=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="dataset: module 'grpo_fast.tasks' has no attribute 'nope'"):
        load_prompts(GRPOConfig(dataset="grpo_fast.tasks:nope"))


def test_builtin_dataset_by_import_path():
    rows = load_prompts(GRPOConfig())
    assert rows == letters_dataset()
    assert all(row["prompt"] == row["letters"] + ":" for row in rows)


def test_chat_prompts_go_through_the_template(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    texts = render_prompts(["ab:", [{"role": "user", "content": "cd"}]], tokenizer)
    assert texts == ["ab:", "[user]cd>"]


def test_prompt_order_is_a_function_of_position():
    first = prompt_indices(0, 10, 7, seed=3)
    assert sorted(first[:7]) == list(range(7))  # an epoch visits every row once
    assert prompt_indices(4, 6, 7, seed=3) == first[4:]  # resuming at a position draws the same rows
    assert prompt_indices(0, 7, 7, seed=4) != first[:7]
    assert prompt_indices(5, 4, 7, seed=0, shuffle=False) == [5, 6, 0, 1]


# ---- rollouts ---------------------------------------------------------------------------------


def test_build_rollout_pads_and_flags_truncation(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [{"prompt": "ab:", "letters": "ab"}, {"prompt": "c:", "letters": "c"}]
    prompt_ids = tokenize_prompts([row["prompt"] for row in rows], tokenizer)
    a, b, c = tokenizer.convert_tokens_to_ids(["a", "b", "c"])
    completions = [[a, eos], [b, b, b, b], [c, c, eos], [a]]
    params = _params(tokenizer)
    rollout = build_rollout(rows, "prompt", prompt_ids, completions, tokenizer, params, mask_truncated=True)
    assert rollout.prompt_ids.shape == (4, 3) and rollout.completion_ids.shape == (4, 4)
    assert rollout.prompt_mask[2].tolist() == [0, 1, 1]  # left padding
    # [a]: shorter than max_completion_length without EOS, i.e. ended at a stop string: complete
    assert rollout.truncated.tolist() == [False, True, False, False]
    assert rollout.completion_lengths.tolist() == [2, 4, 3, 1]
    assert rollout.completion_mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert rollout.attention_mask[1].tolist() == [1, 1, 1, 1, 1, 1, 1]  # truncated rows still attend
    assert rollout.completions == ["a", "bbbb", "cc", "a"]
    assert rollout.columns == {"letters": ["ab", "ab", "c", "c"]}
    unmasked = build_rollout(rows, "prompt", prompt_ids, completions, tokenizer, params)
    assert unmasked.completion_mask[1].tolist() == [1, 1, 1, 1]


def test_stop_strings_end_rollouts(tokenizer):
    """stop_strings reach the sampler: every completion ends right after its first stop string, or
    runs to max_completion_length (truncated) without one."""
    from grpo_fast.trainer import generate_rollout, rollout_sampler

    config = GRPOConfig(stop_strings=["b"], max_completion_length=8, num_generations=4, temperature=1.5)
    model = build_tiny_model(tokenizer)
    rows = letters_dataset(num_prompts=4)
    rollout = generate_rollout(model, tokenizer, rows, config, rollout_sampler(config, torch.device("cpu"), tokenizer))
    stopped = 0
    for text, ids, truncated in zip(rollout.completions, rollout.completion_token_ids, rollout.truncated.tolist()):
        if "b" in text:
            assert text.index("b") == len(text) - 1 and not truncated, text
            stopped += 1
        else:
            assert len(ids) == 8 or ids[-1] == tokenizer.eos_token_id, text
            assert truncated == (ids[-1] != tokenizer.eos_token_id)
    assert stopped > 0  # the random policy writes b often: the cut was exercised


def test_hf_generate_matches_stop_strings_in_the_completion_only(tokenizer):
    """A stop string that would straddle the prompt's end (prompt "...:", completion "a...") must not
    stop the row: the completion runs on, with no padding kept as completion tokens."""
    from grpo_fast.rollout import hf_generate

    model = build_tiny_model(tokenizer)
    params = SamplingParams(num_generations=64, max_completion_length=6, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, temperature=2.0, stop_strings=(":a",))
    prompt_ids = tokenize_prompts(["ab:"], tokenizer)
    completions = hf_generate(model, prompt_ids, params, tokenizer=tokenizer)
    starts_with_a = 0
    for ids in completions:
        text = tokenizer.decode(ids)
        starts_with_a += text.startswith("a")
        if ":a" in text:
            assert text.index(":a") + 2 == len(text), text  # cut right after the first match
        else:
            assert len(ids) == 6 or ids[-1] == tokenizer.eos_token_id, text
        # a row stopped at its first token would be that token then padding
        assert not (len(ids) > 1 and all(token == tokenizer.pad_token_id for token in ids[1:])), ids
    assert starts_with_a > 0  # completions that would have matched across the prompt's end occurred


def test_completions_that_do_not_fill_the_groups(tokenizer):
    rows = [{"prompt": "ab:"}, {"prompt": "cd:"}]
    prompt_ids = tokenize_prompts(["ab:", "cd:"], tokenizer)
    with pytest.raises(ValueError, match=r"completion_token_ids: expected 2 prompts x 2 generations = 4 completions, received 3"):
        build_rollout(rows, "prompt", prompt_ids, [[5], [6], [7]], tokenizer, _params(tokenizer))


def test_cut_at_eos():
    assert cut_at_eos([4, 5, 1, 6, 1], (1,), 10) == [4, 5, 1]
    assert cut_at_eos([4, 5, 6], (1,), 2) == [4, 5]


def test_chat_prompts_give_chat_completions(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "ab:"}]}]
    rollout = build_rollout(rows, "prompt", [[3, 4]], [[5], [6]], tokenizer, _params(tokenizer))
    assert rollout.completions[0] == [{"role": "assistant", "content": tokenizer.decode([5])}]


# ---- rewards ----------------------------------------------------------------------------------


def test_letters_reward():
    assert letters_score("abab", "ab") == 0.5  # 4 of the 8 counted characters
    assert letters_score("aaaaaaaazz", "a") == 1.0
    assert letters_reward(["ab:"], ["abxx"]) == [0.25]  # letters read from the prompt without the column


def test_score_weights_and_none():
    def first(prompts, completions, completion_ids, **columns):
        return [1.0, None, 0.5]

    def second(prompts, completions, completion_ids, **columns):
        return [2, 2, torch.tensor(2.0)]

    scores = score([first, second], [1.0, 0.5], ["p"] * 3, ["a", "b", "c"], [[1], [2], [3]])
    assert scores.total.tolist() == [2.0, 1.0, 1.5]
    assert torch.isnan(scores.per_function["first"][1])
    assert scores.per_function["second"].tolist() == [2.0, 2.0, 2.0]


def test_reward_columns_reach_the_function():
    seen = {}

    def reward(prompts, completions, completion_ids, answer, **columns):
        seen.update(answer=answer, prompts=prompts, ids=completion_ids)
        return [0.0] * len(completions)

    score([reward], None, ["p", "q"], ["a", "b"], [[1], [2]], {"answer": ["1", "2"]})
    assert seen == {"answer": ["1", "2"], "prompts": ["p", "q"], "ids": [[1], [2]]}


def _raises(prompts, completions, completion_ids, **columns):
    raise KeyError("answer")


def _short(prompts, completions, completion_ids, **columns):
    return [1.0]


def _text(prompts, completions, completion_ids, **columns):
    return [1.0, "high"]


def _nan(prompts, completions, completion_ids, **columns):
    return [float("nan"), 1.0]


def _fails_on_b(prompts, completions, completion_ids, **columns):
    return [1.0 / (completion != "b") for completion in completions]


@pytest.mark.parametrize("function, message", [
    (_raises, r"reward function '_raises' raised KeyError: 'answer' on completion 0: 'a'"),
    (_fails_on_b, r"reward function '_fails_on_b' raised ZeroDivisionError: float division by zero on completion 1: 'b'"),
    (_short, r"reward function '_short': expected 2 values \(one per completion\), received 1"),
    (_text, r"reward function '_text': expected a finite number or None for completion 1, received 'high'"),
    (_nan, r"reward function '_nan': expected a finite number or None for completion 0, received nan"),
])
def test_reward_failures_name_the_function_and_item(function, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        score([function], None, ["p", "p"], ["a", "b"], [[1], [2]])


def test_reward_functions_by_import_path():
    assert load_reward_functions(["grpo_fast.tasks:letters_reward"]) == [letters_reward]
    with pytest.raises(ValueError, match=r"reward_functions\[0\]: expected an import path 'module:function'"):
        load_reward_functions(["letters_reward"])
    with pytest.raises(ValueError, match=r"reward_functions\[1\]: cannot import module 'no_such_module'"):
        load_reward_functions(["grpo_fast.tasks:letters_reward", "no_such_module:f"])
    with pytest.raises(ValueError, match=r"reward_functions\[0\]: expected a callable"):
        load_reward_functions(["grpo_fast.tasks:ALPHABET"])


def test_sampling_ignores_the_model_generation_defaults():
    # A hub model's generation_config (here: no_repeat_ngram_size=1, top_k=1) must not change the
    # sampling distribution the loss assumes.
    from grpo_fast.model import build_tiny_model
    from grpo_fast.rollout import hf_generate

    tokenizer = tiny_tokenizer("abcdefgh:")
    model = build_tiny_model(tokenizer)
    model.generation_config.no_repeat_ngram_size = 1  # would forbid any token seen before in the row
    model.generation_config.top_k = 1
    params = SamplingParams(num_generations=8, max_completion_length=8, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, top_k=0)
    prompt = tokenize_prompts(["abc:"], tokenizer)[0]
    completions = hf_generate(model, [prompt], params)
    assert len(completions) == 8 and len({tuple(ids) for ids in completions}) > 1
    assert any(len(set(prompt + ids)) < len(prompt + ids) for ids in completions)  # repeats happen when sampling
    assert model.generation_config.no_repeat_ngram_size == 1  # restored afterwards
