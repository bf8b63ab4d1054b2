"""Smoke run of benchmarks.rollout at tiny size on CPU: it runs both providers and writes
well-formed results (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks/` is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import rollout as rollout_bench  # noqa: E402


def test_rollout_benchmark_writes_results(tmp_path):
    payload = rollout_bench.main(["--tiny", "--concurrency", "8,16", "--completion-length", "12",
                                  "--out-dir", str(tmp_path / "{device}"), "--name", "smoke"])
    out = tmp_path / "cpu"
    assert json.loads((out / "smoke.json").read_text()) == json.loads(json.dumps(payload))
    env = payload["env"]
    for key in ("device", "torch", "git_commit", "date_utc", "command"):
        assert key in env
    assert env["command"].startswith("python -m benchmarks.rollout") and "--name smoke" in env["command"]
    assert payload["copy"]["gbps"] > 0 and payload["weight_bytes_per_step"] > 0 and payload["kv_bytes_per_token"] > 0
    rows = payload["rows"]
    assert {(row["provider"], row["concurrency"]) for row in rows} == {(p, c) for p in ("engine", "hf") for c in (8, 16)}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["mean_length"] == row["min_length"] == 12  # forced lengths
        assert row["tokens_per_s"] > 0 and 0 < row["frac_bandwidth"] and row["bytes_per_step_mib"] > 0
        assert row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
        assert row["speedup_vs_hf"] == pytest.approx(1.0) if row["provider"] == "hf" else row["speedup_vs_hf"] > 0
    markdown = (out / "smoke.md").read_text()
    assert env["command"] in markdown and markdown.count("| engine |") == 2
    assert [path.read_bytes()[:4] for path in out.glob("smoke_*.png")] == [b"\x89PNG"]


def test_rollout_benchmark_rejects_bad_concurrency(capsys):
    with pytest.raises(SystemExit):
        rollout_bench.main(["--tiny", "--concurrency", "12"])
    assert "--concurrency: expected multiples of --num-generations=8, received 12" in capsys.readouterr().err


def test_continuous_batching_peer_matches_the_engine_greedily():
    """The hf_cb peer (transformers' generate_batch) returns a Generate's rows in order: its greedy
    completions are the engine's (fp32, CPU), with and without forced lengths."""
    from grpo_fast.engine import RolloutEngine
    from grpo_fast.rollout import SamplingParams

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_lm import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, hidden_size=64).eval()
    prompts = [tokenizer.encode(text) for text in ("hello there", "a", "abc def ghi")]
    for minimum in (0, 10):
        params = SamplingParams(num_generations=2, max_completion_length=10, min_completion_length=minimum, top_k=1,
                                eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
        peer = rollout_bench.continuous_batching_generate(model, prompts, params)
        assert peer == RolloutEngine()(model, prompts, params)
        assert len(peer) == 6 and (minimum == 0 or all(len(row) == 10 for row in peer))
