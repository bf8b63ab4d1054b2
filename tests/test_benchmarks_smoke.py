"""Smoke runs of the benchmark scripts at tiny sizes: they run and write well-formed results.

No timing assertions: only that every provider produced a row, the rows agree on the loss, and
the JSON, markdown and plots exist and can be rebuilt by `benchmarks.report`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks/` is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks import loss as loss_bench  # noqa: E402
from benchmarks import report  # noqa: E402

TINY = ["--quick", "--heads", "16x67", "--tokens", "16", "--seq-len", "8"]


def _run(module: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_loss_benchmark_cli_writes_results_and_report_rebuilds_them(tmp_path):
    providers = ["reference", "torch", "triton", "trl"]
    if not torch.cuda.is_available():  # on GPU Liger's loss goes through torch.compile: too slow for a smoke run
        providers.append("liger")
    _run("benchmarks.loss", *TINY, "--providers", ",".join(providers), "--modes", "full,logprobs",
         "--out-dir", str(tmp_path), "--name", "smoke")
    payload = json.loads((tmp_path / "smoke.json").read_text())
    env = payload["env"]
    for key in ("device", "torch", "triton", "git_commit", "date_utc", "command"):
        assert key in env
    assert "--name smoke" in env["command"] and env["command"].startswith("python -m benchmarks.loss")
    rows = payload["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in providers for m in ("full", "logprobs")}
    for row in rows:
        assert row["status"] in ("ok", "unavailable"), row
        assert row["provider"] in ("trl", "liger") or row["status"] == "ok", row  # peers may be absent
        if row["status"] == "ok":
            assert row["ms_median"] > 0 and row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
            assert row["tflops"] > 0 and row["frac_matmul"] > 0
            assert 0 < row["active_fraction"] <= 1
    for mode in ("full", "logprobs"):
        ok = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        ref = next(r for r in ok if r["provider"] == "reference")
        assert ref["time_vs_ref"] == pytest.approx(1.0)
        for r in ok:  # same inputs and loss options: the same loss / mean log-prob
            assert r["check"] == pytest.approx(ref["check"], rel=0.05, abs=0.05), (r["provider"], mode)

    md = (tmp_path / "smoke.md").read_text()
    assert env["device"] in md and env["command"] in md
    assert md.count("| reference | ok |") == 2
    plots = sorted(tmp_path.glob("smoke_*.png"))
    assert len(plots) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in plots)

    for path in [tmp_path / "smoke.md", *plots]:
        path.unlink()
    _run("benchmarks.report", str(tmp_path))
    assert (tmp_path / "smoke.md").read_text() == md
    assert len(list(tmp_path.glob("smoke_*.png"))) == 2


def test_loss_benchmark_forward_and_backward_modes(tmp_path):
    payload = loss_bench.main([*TINY, "--providers", "reference,torch", "--modes", "forward,backward",
                               "--train-head", "--off-policy", "--beta", "0.04", "--out-dir", str(tmp_path)])
    rows = payload["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert all(r["tflops"] is None for r in rows)  # no FLOP rate for forward / backward alone
    checks = {r["mode"]: [] for r in rows}
    for r in rows:
        checks[r["mode"]].append(r["check"])
    for values in checks.values():
        assert values[0] == pytest.approx(values[1], rel=1e-2, abs=1e-3)
    assert [p.name for p in report.result_files([str(tmp_path)])] == [next(tmp_path.glob("*.json")).name]


def test_unavailable_provider_and_oom_become_rows():
    assert isinstance(loss_bench.load_provider("triton", torch.device("meta")), str)

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    result = common.measure(oom, torch.device("cpu"))
    assert result["status"] == "oom" and result["ms_median"] is None and "out of memory" in result["error"]


def test_logprob_accuracy_tiny_run(tmp_path):
    from benchmarks import logprob_accuracy

    payload = logprob_accuracy.main(["--tiny", "--out-dir", str(tmp_path)])
    rows = {(row["max_logit"], row["path"]): row for row in payload["rows"]}
    for max_logit in (18.0, 32.0):
        eager = rows[(max_logit, "eager/bf16_logits")]["max_abs_error"]
        assert eager > 1e-2  # bf16 logits of these sizes are off by up to 0.06-0.125
        for backend in ("triton", "torch"):
            for kind in ("train", "no_grad"):
                row = rows[(max_logit, f"grpo_fast/{backend}/{kind}")]
                assert row["train_vs_no_grad"] == 0.0 and row["max_abs_error"] < eager / 100
    assert list(tmp_path.glob("logprob-accuracy-*.md"))


def test_tool_overlap_benchmark_writes_both_rates(tmp_path):
    """benchmarks.tool_overlap at a tiny size: a row per repetition and a median row, with both rates."""
    from benchmarks import tool_overlap

    threads = torch.get_num_threads()
    try:  # the benchmark sets torch's CPU threads for its process
        payload = tool_overlap.main(["--model", "tiny", "--max-new", "24", "--rows", "8", "--reps", "1",
                                     "--tool-ms", "5", "--out-dir", str(tmp_path), "--name", "smoke"])
    finally:
        torch.set_num_threads(threads)
    assert [row["rep"] for row in payload["rows"]] == [1, "median"]
    for row in payload["rows"]:
        assert row["steps_per_s_without_tools"] > 0 and row["steps_per_s_with_tools"] > 0
        assert row["tool_turns_per_row"] > 0  # the tool ran
    assert (tmp_path / "smoke.md").exists()
