"""The built-in ``letters`` task: a procedurally generated prompt set with a verifiable, dense reward.

A prompt is a few distinct letters of a small alphabet followed by a colon, ``"bfg:"``; a good
completion writes only those letters, ``"gbbfgfbg"``. The reward is the fraction of the first
``TARGET_LENGTH`` completion characters that belong to the prompt's letters, so stopping early or
writing any other character costs reward, and every character gives signal (a dense reward a tiny,
randomly initialised model can climb by RL in a few dozen steps: it must learn to copy from the
prompt, which a 2-layer transformer's attention can do). A random policy scores about
``len(letters) / vocabulary`` x (the share of characters before it stops); a perfect one scores 1.

    rows = letters_dataset(num_prompts=4)
    letters_reward([r["prompt"] for r in rows], ["bbbb", ...], None, letters=[r["letters"] for r in rows])

The embedded default run (``grpo-fast train``) uses this with ``grpo_fast.model.build_tiny_model``,
whose character tokenizer covers ``ALPHABET`` and the colon.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

ALPHABET = "abcdefgh"  # the letters prompts draw from; the tiny tokenizer's vocabulary is these + ":" + specials
SEPARATOR = ":"  # ends every prompt
LETTERS_PER_PROMPT = 3  # distinct letters a prompt allows
TARGET_LENGTH = 8  # completion characters the reward counts


def letters_prompt(letters: str) -> str:
    return f"{letters}{SEPARATOR}"


def letters_dataset(num_prompts: int = 512, seed: int = 1234) -> list[dict[str, Any]]:
    """``num_prompts`` rows ``{"prompt": "bfg:", "letters": "bfg"}``, the same for the same seed."""
    if num_prompts <= 0:
        raise ValueError(f"num_prompts: expected a positive number, received {num_prompts}")
    generator = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        letters = "".join(sorted(generator.sample(ALPHABET, LETTERS_PER_PROMPT)))
        rows.append({"prompt": letters_prompt(letters), "letters": letters})
    return rows


def letters_score(completion: str, letters: str) -> float:
    """Fraction of the first TARGET_LENGTH characters of ``completion`` that are among ``letters``."""
    allowed = set(letters)
    return sum(character in allowed for character in completion[:TARGET_LENGTH]) / TARGET_LENGTH


def letters_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
    letters: Sequence[str] | None = None,
    **columns: Any,
) -> list[float]:
    """TRL-signature reward for the letters task; reads the ``letters`` column, or the prompt when absent."""
    if letters is None:
        letters = [prompt.rsplit(SEPARATOR, 1)[0] for prompt in prompts]
    return [letters_score(completion, allowed) for completion, allowed in zip(completions, letters)]


# --------------------------------------------------------------------------------------------
# The built-in agent task: the letters are in a vault, and only its tool opens it
# --------------------------------------------------------------------------------------------
# A prompt says nothing but "open the vault" (the user turn ":"); each row's letter stays inside the row's
# ``Vault`` environment, whose one tool, ``open_vault()``, returns it. The reward is ``vault_score`` of the final
# answer (the last assistant turn): the share of its first ``ANSWER_LENGTH`` characters that are the vault's
# letter, and nothing for an answer given without opening the vault (a guess: 1 in len(ALPHABET) otherwise,
# which a randomly initialised model would learn first and stay with). Opening it and guessing scores about
# 1 / len(ALPHABET); copying the tool's answer scores 1. ``examples/agent_tiny.yaml`` trains the tiny model.
ANSWER_LENGTH = 4


class Vault:
    """An environment (TRL's ``environment_factory``): one per rollout, reset with the row's columns."""

    def __init__(self):
        self.letters = ""
        self.opened = 0

    def reset(self, letters: str = "", **row: Any) -> None:
        self.letters, self.opened = letters, 0

    def open_vault(self) -> str:
        """
        Opens the vault and returns the letters inside it.
        """
        self.opened += 1
        return self.letters


def vault_dataset(num_prompts: int = 512, seed: int = 4321) -> list[dict[str, Any]]:
    """Rows ``{"prompt": [{"role": "user", "content": ":"}], "letters": "ffff"}``: every prompt the same, the vault
    holding one letter ``ANSWER_LENGTH`` times (the answer to copy)."""
    generator = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": SEPARATOR}], "letters": generator.choice(ALPHABET) * ANSWER_LENGTH}
            for _ in range(num_prompts)]


def final_answer(completion: Any) -> str:
    """The text of a completion's last assistant turn (a completion is text or TRL's list of messages)."""
    if isinstance(completion, str):
        return completion
    answers = [message.get("content") or "" for message in completion if message.get("role") == "assistant"]
    return answers[-1] if answers else ""


def vault_score(answer: str, letters: str) -> float:
    """The share of the first ``ANSWER_LENGTH`` characters of ``answer`` that are among ``letters``."""
    return sum(character in letters for character in answer[:ANSWER_LENGTH]) / ANSWER_LENGTH


def vault_reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids=None, letters=None,
                 **columns: Any) -> list[float]:
    """``vault_score`` of each completion's final answer against its row's vault letter; 0 for a completion
    (TRL's list of messages) that holds no tool result."""
    return [vault_score(final_answer(completion), allowed)
            if not isinstance(completion, str) and any(message.get("role") == "tool" for message in completion)
            else 0.0
            for completion, allowed in zip(completions, letters)]
