"""No console line a user cannot act on (grpo_fast/console.py): bitsandbytes' hub lookup of its CPU
kernel neither reaches for the network nor prints its "Failed to load CPU gemm_4bit_forward" line.
(bitsandbytes makes the lookup only on CPUs with AVX512-BF16; elsewhere these pass either way.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("gemm_4bit_forward", "kernels-community", "publisher trust")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_importing_bitsandbytes_goes_nowhere_near_the_network():
    script = (
        "import sys\n"
        "calls = []\n"
        "sys.addaudithook(lambda event, args: calls.append(args[:2]) if event in ('socket.getaddrinfo', "
        "'socket.connect') else None)\n"
        "from grpo_fast.console import import_bitsandbytes\n"
        "assert import_bitsandbytes() is not None\n"
        "from huggingface_hub import constants\n"
        "print('calls', calls, 'offline after', constants.HF_HUB_OFFLINE)\n")
    env = _env()
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "calls [] offline after False" in done.stdout  # no lookup, and the rest of the process is online
    assert not any(text in done.stderr + done.stdout for text in NOISE), done.stderr


def test_a_default_training_run_prints_no_bitsandbytes_hub_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "grpo_fast.cli", "train", "--max_steps", "2", "--output_dir",
                           str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "run directory:" in done.stdout
    assert not any(text in done.stderr + done.stdout for text in NOISE), done.stderr
