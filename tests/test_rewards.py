"""Reward library: answer extraction, numeric comparison, format and length rewards on tricky strings."""

import doctest
import importlib.util

import pytest

import grpo_fast.rewards as rewards
from grpo_fast.rewards import (
    accuracy_reward,
    answers_match,
    completion_text,
    extract_answer,
    lenient_format_reward,
    make_format_reward,
    make_overlong_penalty,
    parse_number,
    reference_answer,
    strict_format_reward,
    symbolic_accuracy_reward,
)

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


def test_docstring_examples():
    failures, _ = doctest.testmod(rewards, optionflags=doctest.ELLIPSIS)
    if not HAS_MATH_VERIFY:
        pytest.skip("math-verify not installed: the symbolic example cannot run")
    assert failures == 0


@pytest.mark.parametrize(
    "text, value",
    [
        ("1000", 1000.0), ("1,000", 1000.0), ("1000.0", 1000.0), ("$1000", 1000.0), ("$1,000.00", 1000.0),
        ("-7", -7.0), ("−7", -7.0), ("-$7", -7.0), ("0.25", 0.25), (".5", 0.5), ("18.", 18.0), (" 42 ", 42.0),
        ("50%", 50.0), ("3/4", 0.75), ("-3/4", -0.75), ("\\frac{3}{4}", 0.75), ("\\dfrac{10}{4}", 2.5),
        ("**42**", 42.0), ("\\(42\\)", 42.0), ("$$42$$", 42.0), ("12,345,678", 12345678.0),
        ("1, 2", None), ("1,00", None), ("twelve", None), ("", None), ("1/0", None), ("4 apples", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("<reasoning>3 + 4</reasoning>\n<answer>\n7\n</answer>", "7"),
        ("<answer>first</answer> ... <answer>$1,200</answer>", "$1,200"),  # the last tag wins
        ("<answer>The total is 1,000 dollars.</answer>", "1,000"),
        ("<answer>\\boxed{-3}</answer>", "-3"),
        ("<answer>x = 5</answer>", "5"),
        ("<answer>x^2 + 2x + 1</answer>", "x^2 + 2x + 1"),
        ("<answer>\\frac{\\sqrt{2}}{2}</answer>", "\\frac{\\sqrt{2}}{2}"),
        ("The answer is \\boxed{\\frac{1}{2}} (check: 0.5)", "\\frac{1}{2}"),  # box beats a later number
        ("Steps: 12 - 5 = 7. So she has 7 apples.", "7"),
        ("ranges 5-10", "10"),  # a hyphen between numbers is not a minus sign
        ("It is -10 degrees", "-10"),
        ("costs $3.50.", "$3.50"),
        ("no number at all", None),
        ("<answer></answer> 5", ""),  # an empty tag is an (empty) answer, not a fallback to the text
        ("cut off \\boxed{12", "12"),  # an unclosed box falls back to the last number
    ],
)
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


def test_reference_answer_gsm8k():
    solution = "He buys 3*4=<<3*4=12>>12 eggs.\nHe has 12+1,000=<<12+1000=1012>>1012.\n#### 1,012"
    assert reference_answer(solution) == "1,012"
    assert reference_answer("#### -4") == "-4"
    assert reference_answer("  18 ") == "18"


@pytest.mark.parametrize(
    "predicted, reference, equal",
    [
        ("1,000", "1000", True), ("1000.0", "1000", True), ("$1000", "1,000", True), ("1000.00001", "1000", False),
        ("-5", "5", False), ("0.1", "0.10", True), ("3/4", "0.75", True), ("1e3", "1000", False),
        ("Paris", " paris ", True), ("", "", False), (None, "1", False), ("1", None, False),
    ],
)
def test_answers_match(predicted, reference, equal):
    assert answers_match(predicted, reference) is equal


def test_accuracy_reward_strings_and_chat():
    references = ["Work...\n#### 1000"] * 5 + [None]
    completions = [
        "<reasoning>..</reasoning>\n<answer>\n1,000\n</answer>",
        "<answer>$1000.00</answer>",
        "blah \\boxed{1000}",
        "so the total is 1000.",
        "<answer>100</answer> but maybe 1000",  # the tag is the answer, not the last number
        "<answer>1</answer>",
    ]
    expected = [1.0, 1.0, 1.0, 1.0, 0.0, None]
    assert accuracy_reward(["q"] * 6, completions, answer=references) == expected
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    # extra columns the trainers pass (trainer_state, log_metric, ...) are ignored
    assert accuracy_reward(["q"] * 6, chat, answer=references, trainer_state=None, log_metric=print) == expected


def test_accuracy_reward_bad_input():
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(["q"], ["<answer>1</answer>"])
    with pytest.raises(ValueError, match="answer.*2.*1"):
        accuracy_reward(["q", "q"], ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="completions"):
        accuracy_reward(["q"], [42], answer=["1"])


def test_completion_text_multimodal_parts():
    message = [{"role": "assistant", "content": [{"type": "text", "text": "<answer>"}, {"type": "text", "text": "3</answer>"}]}]
    assert completion_text(message) == "<answer>3</answer>"
    assert completion_text([]) == ""


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify not installed")
def test_symbolic_accuracy():
    completions = ["<answer>\\frac{\\sqrt{2}}{2}</answer>", "<answer>x^2 + 2x + 1</answer>", "<answer>2</answer>"]
    references = ["1/\\sqrt{2}", "(x+1)^2", "#### 2.0"]
    assert symbolic_accuracy_reward(None, completions, answer=references) == [1.0, 1.0, 1.0]
    assert accuracy_reward(None, completions, answer=references) == [0.0, 0.0, 1.0]
    assert symbolic_accuracy_reward(None, ["<answer>\\sqrt{3}</answer>"], answer=["1/\\sqrt{2}"]) == [0.0]


GOOD = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>"


@pytest.mark.parametrize(
    "completion, strict, lenient",
    [
        (GOOD, 1.0, 1.0),
        ("  " + GOOD + "\n", 1.0, 1.0),
        ("<reasoning>2 + 2 = 4</reasoning><answer>4</answer>", 0.0, 1.0),  # no newlines
        ("Sure! " + GOOD, 0.0, 1.0),  # chatter before
        (GOOD + " Hope that helps", 0.0, 1.0),  # chatter after
        ("<reasoning>\n\n</reasoning>\n<answer>\n4\n</answer>", 0.0, 1.0),  # empty reasoning
        ("<reasoning>\nx\n</reasoning>\n<answer>\n\n</answer>", 0.0, 0.0),  # empty answer
        ("<answer>\n4\n</answer>\n<reasoning>\nx\n</reasoning>", 0.0, 0.0),  # wrong order
        ("<reasoning>\nx\n</reasoning>\n<answer>\n4\n</answer>\n<answer>\n5\n</answer>", 0.0, 1.0),
        ("<reasoning>\nx\n<answer>\n4\n</answer>", 0.0, 0.0),  # unclosed reasoning
        ("4", 0.0, 0.0),
    ],
)
def test_format_rewards(completion, strict, lenient):
    assert strict_format_reward(None, [completion]) == [strict]
    assert lenient_format_reward(None, [completion]) == [lenient]
    assert strict_format_reward(None, [[{"role": "assistant", "content": completion}]]) == [strict]


def test_format_reward_custom_tags_and_names():
    think = make_format_reward(strict=False, reasoning_tag="think", value=0.5)
    assert think(None, ["<think>hm</think><answer>1</answer>", GOOD]) == [0.5, 0.0]
    assert strict_format_reward.__name__ == "strict_format_reward"  # TRL logs rewards by __name__
    assert lenient_format_reward.__name__ == "lenient_format_reward"
    with pytest.raises(ValueError, match="reasoning_tag"):
        make_format_reward(reasoning_tag="")


def test_overlong_penalty():
    penalty = make_overlong_penalty(max_completion_length=10, soft_cache_length=4)
    ids = [[1] * n for n in (0, 6, 7, 8, 10, 11)]
    assert penalty(None, ["x"] * 6, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert penalty.__name__ == "overlong_penalty"
    with pytest.raises(ValueError, match="completion_ids"):
        penalty(None, ["x"])
    with pytest.raises(ValueError, match="soft_cache_length"):
        make_overlong_penalty(10, 11)
    with pytest.raises(ValueError, match="max_completion_length"):
        make_overlong_penalty(0, 1)
