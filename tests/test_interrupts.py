"""Ctrl-C and SIGTERM: the first signal finishes the step, saves it and stops; a second abandons the
step, saving the last finished one; either way a resumed run ends exactly where an uninterrupted one
does, and the CLI prints one line saying how to resume, with no traceback."""

from __future__ import annotations

import json
import os
import shlex
import signal

import pytest
import torch

from grpo_fast.checkpoint import list_checkpoints
from grpo_fast.cli import main
from grpo_fast.config import GRPOConfig
from grpo_fast.errors import TrainingInterrupted
from grpo_fast.tasks import letters_reward
from grpo_fast.trainer import train

FAST = dict(max_steps=4, prompts_per_step=2, num_generations=4, max_completion_length=6, micro_batch_size=8,
            progress_bar=False, plot=False, save_every=0)
COMPARED = ["data_position", "reward/mean", "completions/mean_length", "loss", "lr"]


def signalling_reward(at_call: int, count: int = 1, number: int = signal.SIGINT):
    """The letters reward, sending this process ``number`` ``count`` times when it scores step
    ``at_call``: after the step's rollout, before its update."""
    calls = []

    def letters_reward_(prompts, completions, completion_ids, **columns):
        calls.append(1)
        if len(calls) == at_call:
            for _ in range(count):
                os.kill(os.getpid(), number)
        return letters_reward(prompts, completions, completion_ids, **columns)

    return letters_reward_


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _trainable(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    result = train(GRPOConfig(output_dir=str(folder), run_name="run", **FAST),
                   reward_functions=[signalling_reward(at_call=0)])
    return _log(folder / "run"), _trainable(result.model)


def _assert_same_run(run, model, straight):
    log, weights = straight
    assert [record["step"] for record in _log(run)] == [1, 2, 3, 4]
    for key in COMPARED:
        assert [record[key] for record in _log(run)] == [record[key] for record in log], key
    for name, value in _trainable(model).items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("count, what, saved", [(1, "step 2 finished", 2), (2, "step 2 abandoned", 1)],
                         ids=["finish", "abandon"])
def test_an_interrupted_run_resumes_where_an_uninterrupted_one_goes(tmp_path, straight, count, what, saved):
    config = dict(FAST, output_dir=str(tmp_path), run_name="run")
    handler = signal.getsignal(signal.SIGINT)  # pytest's, or SIG_IGN where the suite runs in the background
    with pytest.raises(TrainingInterrupted) as caught:
        train(GRPOConfig(**config), reward_functions=[signalling_reward(at_call=2, count=count)])
    run = tmp_path / "run"
    assert caught.value.step == saved and caught.value.signal_number == signal.SIGINT
    assert str(caught.value) == f"SIGINT: {what}; step {saved} is saved in {run}; continue with resume (run_name 'run')"
    # save_every is 0: the interrupt alone saved the last finished step (the abandoned one had not
    # updated the weights), with the RNG states it ended with
    assert [path.name for path in list_checkpoints(run)] == [f"step_{saved:06d}"]
    assert [record["step"] for record in _log(run)] == list(range(1, saved + 1))
    assert signal.getsignal(signal.SIGINT) is handler  # the trainer's handler is gone, the caller's restored
    resumed = train(GRPOConfig(**dict(config, resume=True)), reward_functions=[signalling_reward(at_call=0)])
    _assert_same_run(run, resumed.model, straight)


def test_sigterm_in_the_cli_is_one_line_saying_how_to_resume(tmp_path, monkeypatch, capfd, straight):
    (tmp_path / "cli_sigterm_reward.py").write_text(
        "import os, signal\nfrom grpo_fast.tasks import letters_reward\nCALLS = []\n\n"
        "def letters_reward_(prompts, completions, completion_ids, **columns):\n"
        "    CALLS.append(1)\n"
        "    if len(CALLS) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return letters_reward(prompts, completions, completion_ids, **columns)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    arguments = ["train", "--output_dir", "runs", "--run_name", "run", "--reward_functions",
                 "cli_sigterm_reward:letters_reward_", *[f"--{key}={value}" for key, value in FAST.items()]]
    assert main(arguments) == 128 + signal.SIGTERM
    err = capfd.readouterr().err
    assert "Traceback" not in err
    notice, final = err.strip().splitlines()
    assert notice == "SIGTERM: finishing the current step, then saving a checkpoint (send it again to abandon the step)"
    prefix = "grpo-fast train: SIGTERM: step 2 finished; step 2 is saved in runs/run; continue with: "
    assert final.startswith(prefix), final
    command = shlex.split(final[len(prefix):])
    assert command[:2] == ["grpo-fast", "train"] and command[-1] == "--resume"
    assert main(command[1:]) == 0  # the printed command continues the run (the reward signals only once)
    log = _log(tmp_path / "runs" / "run")
    assert [record["step"] for record in log] == [1, 2, 3, 4]
    for key in COMPARED:
        assert [record[key] for record in log] == [record[key] for record in straight[0]], key
