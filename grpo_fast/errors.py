"""The ways a run stops on purpose, as exception types the CLI prints as one line.

- ``ValueError`` (the standard type, not defined here): bad input, found before the model loads
  where it can be (config keys, files, datasets, import paths), named by its key or file;
- ``RunError``: a run that started stopped for a reason the user must act on: a reward function
  raised (``RewardFunctionError``), the loss or gradient norm was NaN / inf (``NonFiniteError``);
- ``TrainingInterrupted``: SIGINT / SIGTERM, after the last finished step was saved. It is a
  ``KeyboardInterrupt``, so code that catches ``Exception`` does not swallow it.

``one_line`` turns any of them (or a library's error) into the single line the CLI prints.
"""

from __future__ import annotations

import signal
from pathlib import Path


class RunError(RuntimeError):
    """A started run stopped; the message says why and what is kept."""


class RewardFunctionError(RunError):
    """A reward function raised: the message names it and the completion it failed on."""


class NonFiniteError(RunError):
    """The loss or the gradient norm of a step was NaN or infinite (``on_nonfinite: stop``)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training. ``step``: the last step saved (None: no checkpoint);
    ``run_dir``: the run; ``summary``: what happened and what is kept, on one line."""

    def __init__(self, *, run_dir: Path, step: int | None, signal_number: int, what: str):
        self.run_dir = Path(run_dir)
        self.step = step
        self.signal_number = signal_number
        kept = f"step {step} is saved in {self.run_dir}" if step is not None else "no checkpoint was saved"
        self.summary = f"{signal.Signals(signal_number).name}: {what}; {kept}"
        advice = (f"continue with resume (run_name {self.run_dir.name!r})" if step is not None
                  else f"start again with overwrite (run_name {self.run_dir.name!r})")
        super().__init__(f"{self.summary}; {advice}")


def one_line(error: BaseException) -> str:
    """The error's message on one line (library messages often span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__
