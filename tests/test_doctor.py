"""``grpo-fast doctor``: the environment and every fused path checked against its eager reference (here
in the Triton interpreter, as a CPU-only user runs it), and a failing check fails the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_fast import doctor, fallback

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("loss forward", "loss backward", "loss, truncated sampling", "log-probs", "NF4 decode matmul", "decode attention", "sampling")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run: the interpreter, in a child process")
def test_doctor_command_prints_the_environment_and_every_path_passing():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", fallback.STRICT_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "grpo_fast.cli", "doctor"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for key in ("python:", "torch:", "triton:", "transformers:", "peft:", "bitsandbytes:", "flash-attn:", "grpo-fast:"):
        assert key in out
    assert "at commit " in out and "commit unknown" not in out  # a checkout: git knows the commit
    rows = {line.split("  ")[0]: line for line in out.splitlines() if line.split("  ")[0] in PATHS}
    assert sorted(rows) == sorted(PATHS)
    for path, line in rows.items():
        cells = [cell for cell in line.split("  ") if cell.strip()]
        assert cells[3].strip() == "pass" and float(cells[1]) <= float(cells[2]), line
    assert f"{len(PATHS)} of {len(PATHS)} checks passed" in out
    assert "gemm_4bit_forward" not in done.stderr + out  # grpo_fast.console's quiet bitsandbytes import


def test_a_failing_check_fails_the_command(monkeypatch, capsys):
    """A kernel that cannot compile is a failed check (no silent fallback), and a wrong result is too."""
    import grpo_fast.kernels.sampling as sampling_module

    monkeypatch.setattr(doctor.Doctor, "CHECKS", ("check_sampling",))

    monkeypatch.setattr(sampling_module._sample_kernel, "run", lambda *a, **k: (_ for _ in ()).throw(
        sampling_module.triton.runtime.errors.OutOfResources(1, 0, "shared memory")))
    fallback.reset()
    try:
        assert doctor.run() == 1
    finally:
        fallback.reset()
    out = capsys.readouterr().out
    assert "FAIL: OutOfResources" in out and "FAILED: sampling" in out
    monkeypatch.undo()

    monkeypatch.setattr(doctor.Doctor, "CHECKS", ("check_logprobs",))
    monkeypatch.setattr(doctor, "_error", lambda got, want: 0.5)  # every comparison off by half the scale
    assert doctor.run() == 1
    assert "FAILED: log-probs" in capsys.readouterr().out


def test_commit_is_unknown_outside_a_checkout(monkeypatch, tmp_path):
    fake = tmp_path / "grpo_fast" / "doctor.py"
    fake.parent.mkdir()
    fake.write_text("")
    monkeypatch.setattr(doctor, "__file__", str(fake))
    assert doctor.package_commit() == "unknown"
