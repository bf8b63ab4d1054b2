"""A custom reward for ``examples/qwen2.5_7b_qlora.yaml``: summaries of about TARGET_WORDS words.

Any function with TRL's reward signature works; the config names it by import path
(``examples.tldr_rewards:length_reward``, importable when ``grpo-fast`` runs from the repository
root, which the CLI puts on ``sys.path`` like ``python -m`` does).
"""

TARGET_WORDS = 40


def length_reward(prompts, completions, completion_ids, **columns):
    """1.0 at TARGET_WORDS words, falling linearly to 0 at 0 or 2 x TARGET_WORDS words."""
    return [max(0.0, 1.0 - abs(len(text.split()) - TARGET_WORDS) / TARGET_WORDS) for text in completions]
