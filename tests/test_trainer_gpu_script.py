"""benchmarks/trainer_gpu_7b.py --tiny: the 7B benchmark's code path (4-bit blocks built in place,
peft's 4-bit LoRA layers, forced-length generation, the trainer) on a tiny shape."""

import json

from benchmarks import trainer_gpu_7b


def test_tiny_run_writes_the_result(tmp_path):
    out = tmp_path / "result.json"
    assert trainer_gpu_7b.main(["--tiny", "--steps", "2", "--num-generations", "2", "--prompt-length", "6",
                                "--completion-length", "5", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [step["completions/min_length"] for step in payload["steps"]] == [5, 5]  # length forced
    assert payload["settings"]["load_in_4bit"] is True
    assert payload["summary"]["steps_timed"] == 1 and payload["summary"]["time_generation_s"] > 0
    assert payload["env"]["git_commit"]
