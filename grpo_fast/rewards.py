"""Reward functions for reasoning tasks with numeric answers (GSM8K and the like).

Every reward has the signature TRL's ``GRPOTrainer`` and grpo-fast's trainer call::

    reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]

``completions`` are strings, or chat message lists (``[{"role": "assistant", "content": ...}]``);
``columns`` are the dataset's other columns repeated per completion (here ``answer``, the
reference). ``None`` means "no opinion" (the reference could not be read), which both trainers
skip when summing rewards.

The layout the format rewards check, and that the GSM8K recipe's system prompt asks for::

    <reasoning>
    ...step by step...
    </reasoning>
    <answer>
    42
    </answer>

Pieces, from the bottom up:

- ``completion_text``: the text of a completion (string or chat messages);
- ``parse_number``: ``"$1,000.50"`` -> ``1000.5``; ``"3/4"`` -> ``0.75``; ``"\\frac{1}{2}"`` -> ``0.5``;
- ``extract_answer``: the ``<answer>`` tag's content, else the last ``\\boxed{}``, else the last number;
- ``reference_answer``: ``"...#### 1,200"`` (a GSM8K solution) -> ``"1,200"``;
- ``answers_match``: numeric comparison, then (``symbolic=True``) ``math-verify`` equivalence;
- rewards: ``accuracy_reward``, ``symbolic_accuracy_reward``, ``strict_format_reward``,
  ``lenient_format_reward``, and the factories ``make_format_reward`` and
  ``make_overlong_penalty`` (DAPO's soft overlong punishment).
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, Sequence

RewardFunction = Callable[..., list]

# A number as people write it: optional sign and currency, thousands separators in groups of three
# (so "1, 2, 3" stays three numbers), an optional decimal part, or a bare ".5".
_NUMBER = r"(?:(?<![\w)])[-−])?\$?\s?(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?|(?:(?<![\w)])[-−])?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FULL_NUMBER_RE = re.compile(rf"^(?:{_NUMBER})$")
_FRACTION_RE = re.compile(r"^([-−]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")
_LATEX_FRACTION_RE = re.compile(r"^([-−]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_GSM8K_REFERENCE_RE = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


# --------------------------------------------------------------------------------------------
# Reading answers
# --------------------------------------------------------------------------------------------


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """The text of one completion: the string itself, or the last message's content.

    >>> completion_text("<answer>4</answer>")
    '<answer>4</answer>'
    >>> completion_text([{"role": "assistant", "content": "<answer>4</answer>"}])
    '<answer>4</answer>'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else None
        if isinstance(content, list):  # multimodal content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if isinstance(content, str):
            return content
    raise ValueError(
        "completions: expected each completion to be a string or a list of chat messages "
        f"({{'role': ..., 'content': str}}), received {type(completion).__name__}: {completion!r:.80}"
    )


def _strip_wrappers(text: str) -> str:
    text = text.strip()
    # LaTeX and markdown wrappers a model puts around a final number: \( 42 \), $$42$$, **42**, \text{...}
    text = re.sub(r"\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}", "", text)
    text = text.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    text = text.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", "")
    text = text.strip().strip("*").strip()
    if text.startswith("$$") and text.endswith("$$") and len(text) > 4:
        text = text[2:-2]
    text = text.strip()
    text = text.rstrip(".").rstrip("%").strip()
    return text


def parse_number(text: str | None) -> float | None:
    """The value of ``text`` when the whole of it is one number, else None.

    Accepts thousands separators, a currency sign, a percent sign, a trailing period,
    a decimal part, fractions and LaTeX fractions.

    >>> parse_number("$1,000.00"), parse_number("-3.5"), parse_number("1000."), parse_number("50%")
    (1000.0, -3.5, 1000.0, 50.0)
    >>> parse_number("3/4"), parse_number("\\\\frac{1}{2}")
    (0.75, 0.5)
    >>> parse_number("twelve") is None, parse_number("1, 2") is None
    (True, True)
    """
    if text is None:
        return None
    text = _strip_wrappers(text)
    if _FULL_NUMBER_RE.match(text):
        return float(text.replace("−", "-").replace("$", "").replace(",", "").replace(" ", ""))
    fraction = _FRACTION_RE.match(text)
    if fraction:
        numerator, denominator = (float(part.replace("−", "-")) for part in fraction.groups())
        return numerator / denominator if denominator else None
    latex = _LATEX_FRACTION_RE.match(text)
    if latex:
        sign, numerator, denominator = latex.groups()
        numerator, denominator = parse_number(numerator), parse_number(denominator)
        if numerator is None or not denominator:
            return None
        return (-1.0 if sign else 1.0) * numerator / denominator
    return None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (as written), or None.

    >>> last_number("She pays $1,200 then $35.50.")
    '$35.50'
    >>> last_number("no digits") is None
    True
    """
    matches = _NUMBER_RE.findall(text)
    return matches[-1].strip() if matches else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None.

    >>> last_boxed("so \\\\boxed{\\\\frac{3}{4}} and done")
    '\\\\frac{3}{4}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin - 1, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:index].strip()
    return None  # unbalanced: the completion was cut off inside the box


def answer_tag_content(text: str, tag: str = "answer") -> str | None:
    """The content of the last ``<tag>...</tag>`` pair, or None.

    >>> answer_tag_content("<answer> 7 </answer> then <answer>8</answer>")
    '8'
    """
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


def extract_answer(text: str, tag: str = "answer") -> str | None:
    """A completion's final answer, as written: the ``<answer>`` tag's content, else the last
    ``\\boxed{}``, else the last number. Inside the tag, a box or a single number is preferred
    to the surrounding words.

    >>> extract_answer("<reasoning>2+2</reasoning>\\n<answer>\\n$4\\n</answer>")
    '$4'
    >>> extract_answer("<answer>The total is 1,000 dollars.</answer>")
    '1,000'
    >>> extract_answer("thus \\\\boxed{12}"), extract_answer("so 3 + 4 = 7.")
    ('12', '7')
    """
    content = answer_tag_content(text, tag)
    if content is not None:
        boxed = last_boxed(content)
        if boxed is not None:
            return boxed
        if parse_number(content) is not None or not content:
            return content
        right_of_equals = content.rsplit("=", 1)[-1].strip()  # "x = 5"
        if parse_number(right_of_equals) is not None:
            return right_of_equals
        # Words around a number ("The total is 1,000 dollars.") give way to the number; an
        # expression ("\\frac{\\sqrt{2}}{2}", "x^2 + 1") is kept whole for the symbolic comparison.
        if "\\" in content or not re.search(r"[A-Za-z]{2,}", content):
            return content
        return last_number(content) or content
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    return last_number(text)


def reference_answer(answer: str | int | float | None) -> str | None:
    """The final answer of a reference: the part after GSM8K's ``####``, or the whole value.

    >>> reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips...\\n#### 72")
    '72'
    >>> reference_answer(72), reference_answer(None)
    ('72', None)
    """
    if answer is None:
        return None
    if isinstance(answer, (int, float)):
        return str(answer)
    match = _GSM8K_REFERENCE_RE.search(answer)
    return match.group(1) if match else answer.strip()


def answers_match(predicted: str | None, reference: str | None, *, symbolic: bool = False) -> bool:
    """Whether two answers agree: numerically when both are numbers (relative tolerance 1e-9),
    else as normalised strings; with ``symbolic=True`` also through ``math-verify`` (an extra:
    ``pip install 'grpo-fast[math]'``).

    >>> answers_match("$1,000", "1000"), answers_match("1000.0", "1,000"), answers_match("-5", "5")
    (True, True, False)
    >>> answers_match("0.5", "\\\\frac{1}{2}"), answers_match(None, "3")
    (True, False)
    """
    if predicted is None or reference is None:
        return False
    predicted_value, reference_value = parse_number(predicted), parse_number(reference)
    if predicted_value is not None and reference_value is not None:
        return math.isclose(predicted_value, reference_value, rel_tol=1e-9, abs_tol=1e-12)
    if _normalise(predicted) == _normalise(reference) and _normalise(reference):
        return True
    if symbolic:
        return _math_verify_equal(predicted, reference)
    return False


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", _strip_wrappers(text)).lower()


def _math_verify_equal(predicted: str, reference: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError as error:  # the optional extra is missing: say how to get it
        raise ImportError(
            "symbolic=True needs math-verify: pip install 'grpo-fast[math]' (or pip install math-verify)"
        ) from error

    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(text: str):
        # math-verify reads LaTeX inside math delimiters; bare expressions are wrapped for it.
        return parse(text if "$" in text or "\\boxed" in text else f"${text}$", parsing_timeout=timeout)

    try:
        return bool(verify(parsed(reference), parsed(predicted), timeout_seconds=timeout))
    except Exception:  # math-verify raises on unparsable input; that is simply "not equal"
        return False


# --------------------------------------------------------------------------------------------
# Rewards (TRL signature)
# --------------------------------------------------------------------------------------------


def _check_lengths(name: str, completions: Sequence, column: Sequence) -> None:
    if len(column) != len(completions):
        raise ValueError(
            f"{name}: expected one value per completion ({len(completions)}), received {len(column)}"
        )


def _accuracy(completions, answer, symbolic: bool) -> list[float | None]:
    if answer is None:
        raise ValueError(
            "answer: expected a reference column named 'answer' (one per completion) in the dataset, "
            "received none"
        )
    _check_lengths("answer", completions, answer)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer):
        reference = reference_answer(reference)
        if reference is None:
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        rewards.append(1.0 if answers_match(predicted, reference, symbolic=symbolic) else 0.0)
    return rewards


def accuracy_reward(prompts, completions, completion_ids=None, answer=None, **columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference (column ``answer``: a GSM8K
    solution ending in ``#### N``, or the bare answer), else 0.0; None where the reference is None.

    >>> accuracy_reward(None, ["<answer>1,000</answer>", "<answer>999</answer>", "so \\\\boxed{1000.0}"],
    ...                 answer=["... #### 1000"] * 3)
    [1.0, 0.0, 1.0]
    """
    return _accuracy(completions, answer, symbolic=False)


def symbolic_accuracy_reward(
    prompts, completions, completion_ids=None, answer=None, **columns
) -> list[float | None]:
    """``accuracy_reward`` that, where the numeric comparison fails, also accepts answers that
    ``math-verify`` finds equivalent (``\\frac{\\sqrt{2}}{2}`` and ``1/\\sqrt{2}``). Needs the
    ``math`` extra; raises ImportError naming it otherwise.

    >>> symbolic_accuracy_reward(None, ["<answer>\\\\frac{\\\\sqrt{2}}{2}</answer>"], answer=["1/\\\\sqrt{2}"])
    [1.0]
    """
    return _accuracy(completions, answer, symbolic=True)


def make_format_reward(
    *, strict: bool = True, reasoning_tag: str = "reasoning", answer_tag: str = "answer", value: float = 1.0
) -> RewardFunction:
    """A reward of ``value`` for completions in the reasoning/answer tag layout, else 0.0.

    strict: the whole completion is exactly ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>``
    (surrounding whitespace allowed, one of each tag, both non-empty).
    lenient: a ``<reasoning>...</reasoning>`` block followed (after whitespace) by a non-empty
    ``<answer>...</answer>`` block somewhere in the completion.

    >>> strict, lenient = make_format_reward(strict=True), make_format_reward(strict=False)
    >>> text = "<reasoning>2 + 2 = 4</reasoning> <answer>4</answer>"
    >>> strict(None, [text]), lenient(None, [text])
    ([0.0], [1.0])
    """
    if not reasoning_tag or not answer_tag:
        raise ValueError(
            f"reasoning_tag/answer_tag: expected non-empty tag names, received {reasoning_tag!r}/{answer_tag!r}"
        )
    r, a = re.escape(reasoning_tag), re.escape(answer_tag)
    if strict:
        body = r"(?:(?!<{t}>|</{t}>).)+"  # no nested or repeated tag inside a block
        pattern = re.compile(
            rf"^\s*<{r}>\n{body.format(t=r)}\n</{r}>\n<{a}>\n{body.format(t=a)}\n</{a}>\s*$", re.DOTALL
        )
        matcher = pattern.match
    else:
        pattern = re.compile(rf"<{r}>.*?</{r}>\s*<{a}>\s*\S.*?</{a}>", re.DOTALL)
        matcher = pattern.search

    def format_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
        return [value if matcher(completion_text(c)) else 0.0 for c in completions]

    format_reward.__name__ = format_reward.__qualname__ = f"{'strict' if strict else 'lenient'}_format_reward"
    return format_reward


strict_format_reward = make_format_reward(strict=True)
lenient_format_reward = make_format_reward(strict=False)


def make_overlong_penalty(max_completion_length: int, soft_cache_length: int) -> RewardFunction:
    """DAPO's soft overlong punishment, a reward in [-1, 0] from the completion's token count L:
    0 while ``L <= max_completion_length - soft_cache_length``, then falling linearly to -1 at
    ``max_completion_length``, and -1 beyond. Needs ``completion_ids`` (both trainers pass them).

    >>> penalty = make_overlong_penalty(max_completion_length=100, soft_cache_length=20)
    >>> penalty(None, ["a", "b", "c"], completion_ids=[[0] * 80, [0] * 90, [0] * 100])
    [0.0, -0.5, -1.0]
    """
    if not isinstance(max_completion_length, int) or max_completion_length <= 0:
        raise ValueError(
            f"max_completion_length: expected a positive int, received {max_completion_length!r}"
        )
    if not isinstance(soft_cache_length, int) or not 0 < soft_cache_length <= max_completion_length:
        raise ValueError(
            f"soft_cache_length: expected an int in (0, max_completion_length={max_completion_length}], "
            f"received {soft_cache_length!r}"
        )
    free_length = max_completion_length - soft_cache_length

    def overlong_penalty(prompts, completions, completion_ids=None, **columns) -> list[float]:
        if completion_ids is None:
            raise ValueError(
                "completion_ids: expected the completions' token ids (one list per completion), received None"
            )
        _check_lengths("completion_ids", completions, completion_ids)
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= free_length:
                rewards.append(0.0)
            elif length <= max_completion_length:
                rewards.append((free_length - length) / soft_cache_length)
            else:
                rewards.append(-1.0)
        return rewards

    return overlong_penalty


__all__ = [
    "accuracy_reward",
    "answer_tag_content",
    "answers_match",
    "completion_text",
    "extract_answer",
    "last_boxed",
    "last_number",
    "lenient_format_reward",
    "make_format_reward",
    "make_overlong_penalty",
    "parse_number",
    "reference_answer",
    "strict_format_reward",
    "symbolic_accuracy_reward",
]
