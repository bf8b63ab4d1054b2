"""The examples run and do what they say."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytorch_loop_learns():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plain_pytorch_loop.py"), "--steps", "12"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    rewards = [float(line.split("reward")[1].split()[0]) for line in result.stdout.splitlines() if "reward" in line]
    assert len(rewards) == 4 and rewards[0] < 0.2 and rewards[-1] > 0.6, result.stdout
