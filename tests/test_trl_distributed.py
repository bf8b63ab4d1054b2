"""FusedGRPOTrainer past one process: with 2 CPU processes (gloo, accelerate's DDP path), it trains
like trl.GRPOTrainer under the same launch: the same updates and the same logged metrics (TRL's
reductions across processes, the top-entropy quantile over every process's tokens). The runs are
tests/trl_distributed_run.py, launched with ``torch.distributed.run``, which is what
``accelerate launch --multi_gpu`` runs (``accelerate launch --cpu`` starts one process unless MPI is
set up); accelerate picks the processes up from the environment."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

SCRIPT = Path(__file__).resolve().parent / "trl_distributed_run.py"


def _free_port() -> int:
    with socket.socket() as probe:  # the workers rendezvous on it; port 0 would reach no one
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(kind: str, model_dir: Path, out: Path, *extra: str) -> None:
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parent.parent))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), str(SCRIPT), kind, str(model_dir), str(out), *extra],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.parametrize("stack", ["ddp", "zero3"])
def test_two_processes_train_like_trl(tmp_path, stack):
    """ddp: full fine-tuning; zero3: DeepSpeed ZeRO-3 (every parameter partitioned, the lm_head gathered
    for the fused loss) with a LoRA adapter."""
    if stack == "zero3":
        pytest.importorskip("deepspeed")  # a dev dependency: CI has it
    from tiny_lm import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", seed=0)  # TRL loads its KL reference from the path
    extra = ("zero3",) if stack == "zero3" else ()
    _launch("trl", model_dir, tmp_path / "trl", *extra)
    _launch("fused", model_dir, tmp_path / "fused", *extra)
    assert json.loads((tmp_path / "fused" / "processes.json").read_text()) == 2
    expected = torch.load(tmp_path / "trl" / "weights.pt")
    received = torch.load(tmp_path / "fused" / "weights.pt")
    assert expected.keys() == received.keys()
    if stack == "ddp":
        from transformers import AutoModelForCausalLM

        start = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
        assert any(not torch.equal(start[name].detach(), expected[name]) for name in expected)  # training moved them
    else:
        assert expected and all("lora" in name for name in expected)
    for name in expected:
        torch.testing.assert_close(received[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    trl_log = [entry for entry in json.loads((tmp_path / "trl" / "log.json").read_text()) if "loss" in entry]
    fused_log = [entry for entry in json.loads((tmp_path / "fused" / "log.json").read_text()) if "loss" in entry]
    assert len(trl_log) == len(fused_log) == 2
    for trl_entry, fused_entry in zip(trl_log, fused_log):
        timing = ("step_time", "time", "runtime", "per_second", "samples_per", "steps_per")
        names = [name for name in trl_entry if not any(word in name for word in timing)]
        assert set(names) <= set(fused_entry), set(names) - set(fused_entry)
        for name in names:
            assert fused_entry[name] == pytest.approx(trl_entry[name], rel=1e-3, abs=1e-5), name


def test_a_trainable_head_is_refused_under_zero3(tmp_path):
    """ZeRO-3 parameters carry a ds_id; the head's gradient could not reach its partitioned storage."""
    import datasets

    from grpo_fast.integrations.trl import FusedGRPOTrainer
    from test_trl_integration import PROMPTS, grpo_config, length_reward
    from tiny_lm import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    trainer = FusedGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=[length_reward], args=grpo_config(tmp_path),
                               train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.model.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    with pytest.raises(ValueError, match="lm_head: expected a frozen lm_head under DeepSpeed ZeRO-3"):
        trainer._gathered_head(trainer.model)
