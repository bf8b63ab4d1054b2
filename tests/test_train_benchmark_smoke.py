"""Smoke run of `python -m benchmarks.train` at tiny sizes on CPU: every trainer gives a row, the
completions have the forced length, and the JSON, markdown and plot are written and rebuilt by
`benchmarks.report`. No timing assertions: only that figures are finite or explicitly missing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks/` is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks import train as train_bench  # noqa: E402

TINY = ["--model", "tiny", "--warmup-steps", "1", "--steps", "1", "--num-generations", "4", "--prompt-length", "6",
        "--completion-length", "8", "--micro-batch-size", "2"]
FIGURES = ["generation_s", "scoring_s", "training_s", "step_s", "completion_tokens_per_s"]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny CPU run; on GPU run the benchmark itself")
def test_train_benchmark_cli_writes_results_and_report_rebuilds_them(tmp_path):
    out = _run("benchmarks.train", *TINY, "--out-dir", str(tmp_path), "--name", "smoke")
    assert out.returncode == 0, out.stdout + out.stderr
    payload = json.loads((tmp_path / "smoke.json").read_text())
    env = payload["env"]
    for key in ("device", "torch", "triton", "cuda", "transformers", "trl", "git_commit", "date_utc", "command"):
        assert key in env, key
    assert env["command"].startswith("python -m benchmarks.train") and "--name smoke" in env["command"]
    assert payload["settings"]["completion_length"] == 8 and payload["settings"]["load_in_4bit"] is False

    rows = payload["rows"]
    assert [(r["model"], r["trainer"]) for r in rows] == [("tiny", t) for t in ("grpo_fast", "grpo_fast_engine", "trl", "trl_fused")]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["steps_measured"] == 1 and len(row["steps"]) == 2  # warm-up step kept in the record
        assert row["min_length"] == row["max_length"] == 8  # completion length forced on every trainer
        assert row["completion_tokens"] == 4 * 8
        for key in FIGURES:
            assert math.isfinite(row[key]) and row[key] >= 0, (row["trainer"], key)
        assert row["peak_allocated_gib"] is None and row["peak_reserved_gib"] is None  # CPU: not measured
        assert row["process_max_rss_gib"] > 0
        assert math.isfinite(row["step_vs_trl"]) and math.isfinite(row["tokens_per_s_vs_trl"])
        assert row["peak_allocated_vs_trl"] is None
    assert next(r for r in rows if r["trainer"] == "trl")["step_vs_trl"] == pytest.approx(1.0)

    md = (tmp_path / "smoke.md").read_text()
    assert env["device"] in md and env["command"] in md and "## model tiny" in md
    for trainer in ("grpo_fast", "grpo_fast_engine", "trl", "trl_fused"):
        assert f"| {trainer} | ok |" in md
    plots = sorted(tmp_path.glob("smoke_*.png"))
    assert len(plots) == 1 and plots[0].read_bytes().startswith(b"\x89PNG")

    for path in [tmp_path / "smoke.md", *plots]:
        path.unlink()
    rebuilt = _run("benchmarks.report", str(tmp_path))
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert (tmp_path / "smoke.md").read_text() == md
    assert len(list(tmp_path.glob("smoke_*.png"))) == 1


def test_fit_budget_is_refused_on_cpu():
    out = _run("benchmarks.train", "--model", "tiny", "--fit-budget", "16,24", "--device", "cpu")
    assert out.returncode == 2 and "--fit-budget: needs a CUDA device" in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama"], "--model: expected names from"),
    (["--trainers", "unsloth"], "--trainers: expected names from"),
    (["--num-generations", "4", "--micro-batch-size", "3"], "--micro-batch-size: expected a divisor of"),
])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_bench.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("limit, expected", [(1000, (960, False)), (300, (256, False)), (200, (None, False)),
                                             (100_000, (8192, True)), (5000, (4992, False))])
def test_fit_length_doubles_then_bisects(limit, expected):
    probed = []

    def fits(length):
        probed.append(length)
        return length <= limit

    assert train_bench.fit_length(fits, 256, 8192, 64) == expected
    assert expected[0] is None or expected[0] <= limit < expected[0] + 64 or expected[1]
    assert probed[:2] == [256, 512] or expected[0] is None
    assert len(probed) == len(set(probed))  # no length probed twice


def test_fit_length_probes_a_maximum_off_the_doubling_ladder():
    assert train_bench.fit_length(lambda length: True, 256, 5000, 64) == (5000, True)
    assert train_bench.fit_length(lambda length: length <= 4500, 256, 5000, 64) == (4480, False)


def test_oom_becomes_a_row_and_ratios_skip_it(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(train_bench, "run_steps", out_of_memory)
    args = train_bench.parse_args(["--device", "cpu", "--model", "tiny"])
    row = train_bench.measure_trainer("grpo_fast", train_bench.workload(args, "tiny"), torch.device("cpu"), 1, 1)
    assert row["status"] == "oom" and "out of memory" in row["error"] and row.get("step_s") is None
    baseline = {"model": "tiny", "trainer": "trl", "status": "ok", "step_s": 2.0, "training_s": 1.0,
                "completion_tokens_per_s": 10.0, "peak_allocated_gib": None, "peak_reserved_gib": None}
    train_bench.add_ratios([row, baseline])
    assert row["step_vs_trl"] is None and baseline["step_vs_trl"] == 1.0 and baseline["peak_allocated_vs_trl"] is None


def test_fit_table_renders_missing_lengths():
    payload = {"benchmark": "train", "env": common.env_info(torch.device("cpu"), ["benchmarks/train.py"]),
               "rows": [], "columns": train_bench.COLUMNS, "group_by": ["model"],
               "tables": [{"title": "Longest completion that fits a memory budget", "group_by": ["model", "budget_gib"],
                           "columns": train_bench.FIT_COLUMNS,
                           "rows": [{"model": "qwen2.5-7b", "budget_gib": 16.0, "trainer": "trl", "status": "oom",
                                     "max_completion_length": None, "error": "does not fit at --fit-start 256"},
                                    {"model": "qwen2.5-7b", "budget_gib": 16.0, "trainer": "grpo_fast",
                                     "status": "ok", "max_completion_length": 2048, "reached_fit_max": False,
                                     "fit_peak_reserved_gib": 15.2}]}]}
    md = common.markdown(payload)
    assert "### model qwen2.5-7b, budget_gib 16.0" in md
    assert "| trl | oom | – |" in md and "| grpo_fast | ok | 2048 | False | 15.20 |" in md
