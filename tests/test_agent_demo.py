"""The built-in agent demo learns: a short run of ``examples/agent_tiny.yaml`` (the tiny model, the Vault task
whose answer only its tool gives, the rollout engine's multi-turn rollouts on CPU) calls the tool more and
scores more at its end than at its start."""

from pathlib import Path

import pytest

pytest.importorskip("transformers.utils.chat_parsing")

from grpo_fast.config import load_config  # noqa: E402
from grpo_fast.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, WINDOW = 60, 8


def _mean(records, key):
    return sum(record[key] for record in records) / len(records)


def test_the_agent_demo_learns_to_call_the_tool(tmp_path):
    config = load_config(ROOT / "examples" / "agent_tiny.yaml",
                         {"max_steps": STEPS, "output_dir": str(tmp_path), "progress_bar": False, "plot": False,
                          "sample_every": 0, "save_every": 0})
    history = train(config).history
    first, last = history[:WINDOW], history[-WINDOW:]
    assert _mean(last, "tools/call_frequency") > _mean(first, "tools/call_frequency") + 0.4  # ~0.4 -> ~1.0
    assert _mean(last, "reward/mean") > _mean(first, "reward/mean") + 0.15  # ~0.0 -> ~0.3 (~0.9 by step 150)
    assert _mean(last, "reward/vault_reward/mean") == pytest.approx(_mean(last, "reward/mean"))
