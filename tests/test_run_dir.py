"""A run directory belongs to one run: reuse is refused (or overwritten on request), resume says what
it continues and picks the run that was interrupted, torn log lines are dropped, checkpoints are
on disk before their name says they are complete, and nothing in them is unpickled."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch

import grpo_fast.checkpoint as checkpoint_module
import grpo_fast.fsio as fsio_module
from grpo_fast.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from grpo_fast.config import GRPOConfig, config_to_dict
from grpo_fast.metrics import MetricsLogger, read_records
from grpo_fast.model import load_model
from grpo_fast.runs import plan_run
from grpo_fast.trainer import build_optimizer, build_scheduler, train

FAST = dict(max_steps=3, prompts_per_step=2, num_generations=4, max_completion_length=6, micro_batch_size=8,
            progress_bar=False, plot=False, save_every=1, save_total_limit=5)


def _steps(run: Path, name: str = "log.jsonl") -> list[int]:
    return [json.loads(line)["step"] for line in (run / name).read_text().splitlines()]


def test_a_run_name_in_use_needs_resume_or_overwrite(tmp_path):
    config = dict(FAST, output_dir=str(tmp_path), run_name="run")
    train(GRPOConfig(**config))
    run = tmp_path / "run"
    log = (run / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"^run_name: expected a folder without a run, received .*run.*latest "
                                         r"checkpoint: step 3.*resume.*overwrite"):
        train(GRPOConfig(**config))
    assert (run / "log.jsonl").read_text() == log and len(list_checkpoints(run)) == 3  # untouched

    result = train(GRPOConfig(**dict(config, max_steps=1, overwrite=True)))
    assert _steps(run) == [1] and [record["step"] for record in result.history] == [1]
    assert [path.name for path in list_checkpoints(run)] == ["step_000001"]  # the old run's are gone
    # keep-last-K and resume see only the new run: it continues from its own step 1
    resumed = train(GRPOConfig(**dict(config, max_steps=2, resume=True)))
    assert [record["step"] for record in resumed.history] == [2] and _steps(run) == [1, 2]


def test_resume_says_what_it_continues_and_drops_a_torn_log_line(tmp_path, capsys):
    config = dict(FAST, output_dir=str(tmp_path), run_name="run", max_steps=2, save_every=2, sample_every=1)
    train(GRPOConfig(**config))
    run = tmp_path / "run"
    with (run / "log.jsonl").open("a") as handle:  # a crash mid-write of step 3's line
        handle.write('{"step": 3, "reward/mean": 0.2')
    capsys.readouterr()
    train(GRPOConfig(**dict(config, max_steps=3, resume=True)))
    captured = capsys.readouterr()
    assert f"resuming run {run} from step 2 (step_000002); training steps 3-3" in captured.out
    assert f"{run / 'log.jsonl'}: dropped its last line, torn by a crash mid-write" in captured.err
    assert _steps(run) == [1, 2, 3] and _steps(run, "samples.jsonl") == [1, 1, 2, 2, 3, 3]


def test_a_damaged_log_line_is_refused_before_the_model_loads(tmp_path):
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    saved = config_to_dict(GRPOConfig(output_dir=str(tmp_path), run_name="run"))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "data_position": 16, "config": saved}))
    (run / "log.jsonl").write_text('{"step": 1}\n{"step": 2, "loss\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log.jsonl: expected one JSON record with a 'step' per line, received line 2"):
        plan_run(GRPOConfig(output_dir=str(tmp_path), run_name="run", resume=True))


def test_read_records_tells_a_torn_last_line_from_damage(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_records(path) == ([{"step": 1}, {"step": 2}], '{"step": 3, "lo')
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"line 2 .*no integer 'step'"):
        read_records(path)
    logger = MetricsLogger(tmp_path, GRPOConfig(progress_bar=False, plot=False), start_step=0)
    logger.log({"step": 1, "loss": float("nan")})
    assert read_records(path) == ([{"step": 1, "loss": None}], None)  # a fresh run starts a fresh log


def _fake_run(folder: Path, step: int | None, age: float) -> None:
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("")
    if step is not None:
        checkpoint = folder / "checkpoints" / f"step_{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step, "data_position": 0}))
    for path in folder.rglob("*"):
        os.utime(path, (time.time() - age, time.time() - age))


def test_resume_without_a_run_name_continues_the_last_run_written(tmp_path):
    _fake_run(tmp_path / "older", step=4, age=600)
    _fake_run(tmp_path / "interrupted", step=None, age=60)  # the run just stopped, before its first save
    config = GRPOConfig(output_dir=str(tmp_path), resume=True)
    with pytest.raises(ValueError, match=r"^resume: expected a complete checkpoint under .*interrupted.*before its "
                                         r"first save"):
        plan_run(config)
    os.utime(tmp_path / "older" / "log.jsonl")  # now "older" was written last
    plan = plan_run(config)
    assert plan.run_dir == tmp_path / "older" and plan.step == 4
    with pytest.raises(ValueError, match=r"^max_steps: expected more than the checkpoint's step 4"):
        plan_run(GRPOConfig(output_dir=str(tmp_path), resume=True, max_steps=4))


def _state(tmp_path, **options):
    config = GRPOConfig(output_dir=str(tmp_path), **options)
    model, tokenizer = load_model(config)
    optimizer = build_optimizer(config, model)
    return model, tokenizer, optimizer, build_scheduler(config, optimizer)


def test_a_checkpoint_is_on_disk_before_its_rename(tmp_path, monkeypatch):
    events = []  # ("fsync", (device, inode)) and ("replace", target), in order
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        status = os.fstat(descriptor)
        events.append(("fsync", (status.st_dev, status.st_ino)))
        fsync(descriptor)

    def recording_replace(source, target):
        events.append(("replace", str(target)))
        replace(source, target)

    def identity(path):
        status = os.stat(path)
        return status.st_dev, status.st_ino

    model, tokenizer, optimizer, scheduler = _state(tmp_path)
    monkeypatch.setattr(fsio_module.os, "fsync", recording_fsync)
    monkeypatch.setattr(checkpoint_module.os, "replace", recording_replace)
    final = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, tokenizer, data_position=2)
    renamed = events.index(("replace", str(final)))
    synced_before = {value for kind, value in events[:renamed] if kind == "fsync"}
    files = {path.name: identity(path) for path in final.rglob("*") if path.is_file()}
    assert {"trainable.safetensors", "optimizer.pt", "rng.json", "trainer_state.json"} <= set(files)
    assert not [name for name, inode in files.items() if inode not in synced_before]  # an inode survives a rename
    assert ("fsync", identity(final.parent)) in events[renamed:]  # the rename itself, flushed


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {}


def test_nothing_in_a_checkpoint_is_unpickled(tmp_path, capfd):
    from transformers.utils import logging as transformers_logging

    model, tokenizer, optimizer, scheduler = _state(tmp_path)
    bars = transformers_logging.is_progress_bar_enabled()
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, tokenizer, data_position=2)
    assert "Writing model shards" not in capfd.readouterr().err  # no library bar breaks the run's own
    assert transformers_logging.is_progress_bar_enabled() == bars
    assert not (folder / "rng.pt").exists()
    for path in folder.glob("*.pt"):
        torch.load(path, weights_only=True)
    state = load_checkpoint(folder, model, optimizer, scheduler)
    assert state["step"] == 1

    torch.save({"state": {}, "param_groups": _Payload()}, folder / "optimizer.pt")  # runs code when unpickled
    with pytest.raises(ValueError, match=r"checkpoint: expected tensors and numbers only in .*optimizer.pt"):
        load_checkpoint(folder, model, optimizer, scheduler)
    assert not _Payload.ran

    (folder / "rng.json").unlink()
    with open(folder / "rng.pt", "wb") as handle:  # an older checkpoint's pickled RNG states
        pickle.dump({"python": None}, handle)
    with pytest.raises(ValueError, match=r"checkpoint: expected rng.json .*older grpo-fast's rng.pt, a pickle"):
        load_checkpoint(folder, model, optimizer, scheduler)


def test_the_rng_states_round_trip_exactly(tmp_path):
    import random

    import numpy as np

    model, tokenizer, optimizer, scheduler = _state(tmp_path)
    random.random(), np.random.normal(), torch.rand(3)  # mid-stream states, NumPy's cached gaussian set
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, tokenizer, data_position=2)
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    load_checkpoint(folder, model)
    assert (random.random(), np.random.normal()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_the_demo_adapter_names_no_deleted_folder(tmp_path):
    model, tokenizer, optimizer, scheduler = _state(tmp_path, load_in_4bit=True, lora_r=2)
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, tokenizer, data_position=2)
    base = json.loads((folder / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base is None or Path(base).exists(), base
    assert latest_checkpoint(tmp_path) == folder
