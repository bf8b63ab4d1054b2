"""Installing the project exposes grpo_fast.kernels, never a top-level `kernels` module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    # run from an unrelated directory, so the repository root is not on sys.path
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_no_top_level_kernels_module(tmp_path):
    origin = _python(
        "import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else 'NONE')",
        tmp_path,
    )
    assert origin == "NONE" or not Path(origin).resolve().is_relative_to(REPO), origin


def test_kernels_installed_as_subpackage(tmp_path):
    path = _python("import grpo_fast.kernels as k; print(k.__file__)", tmp_path)
    assert Path(path).name == "__init__.py"
    assert Path(path).parent.name in ("kernels",)


def test_console_script_declared():
    import importlib.metadata as md

    scripts = {ep.name: ep.value for ep in md.entry_points(group="console_scripts")}
    assert scripts.get("grpo-fast") == "grpo_fast.cli:main"


def test_top_level_names_and_a_light_import():
    """``import grpo_fast`` loads the loss only; the trainer's names resolve on first use."""
    import subprocess
    import sys

    code = ("import sys, grpo_fast; assert 'transformers' not in sys.modules, 'eager trainer import'; "
            "from grpo_fast import GRPOConfig, load_config, train; import grpo_fast.trainer as t; "
            "assert train is t.train and GRPOConfig is t.GRPOConfig and load_config().max_steps == 80")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
