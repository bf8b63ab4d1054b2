"""Scoring completions with reward functions (TRL's signature), checked, weighted and summed.

A reward function is called once per generation batch::

    f(prompts, completions, completion_ids, **columns) -> list[float | None]

with one entry per completion (prompts repeated per completion, rows of a group contiguous), and
the dataset's other columns repeated the same way. ``None`` means "cannot score this one": it is
left out of that function's mean and counts as 0 in the weighted sum (TRL's nansum). A function
that raises, returns the wrong number of values, or a value that is not a finite number (or None)
stops the run with an error naming the function and the offending completion: when the batch call
raises, the function is called again on one completion at a time to find the first it fails on
(``RewardFunctionError``).

The reward library lives in ``grpo_fast.rewards``; the config names functions by import path
(``"grpo_fast.rewards:accuracy_reward"``, ``"my_rewards:length_penalty"``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .data import import_callable
from .errors import RewardFunctionError, one_line

RewardFunction = Callable[..., Sequence[Any]]


@dataclass(frozen=True)
class Scores:
    """Rewards of one generation batch."""

    total: torch.Tensor  # [B] weighted sum over functions (None counted as 0)
    per_function: dict[str, torch.Tensor]  # name -> [B] raw values, NaN where the function returned None


def reward_name(function: RewardFunction) -> str:
    return getattr(function, "__name__", None) or type(function).__name__


def load_reward_functions(paths: Sequence[str | RewardFunction]) -> list[RewardFunction]:
    """Callables from ``"module:function"`` paths (callables pass through)."""
    return [import_callable(path, f"reward_functions[{index}]") for index, path in enumerate(paths)]


def call_reward(function: RewardFunction, prompts, completions, completion_ids, columns: dict[str, list]) -> torch.Tensor:
    """One function's [B] values (NaN for None), with its failures named."""
    name = reward_name(function)
    try:
        values = function(prompts=list(prompts), completions=list(completions), completion_ids=completion_ids, **columns)
    except Exception as error:
        index = _failing_completion(function, prompts, completions, completion_ids, columns)
        where = (f"on completion {index}: {str(completions[index])[:80]!r}" if index is not None else
                 f"on the batch of {len(completions)} completions (on none of them alone; the first: "
                 f"{str(completions[0])[:80]!r})" if len(completions) else "on an empty batch")
        raise RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {one_line(error)} "
                                  f"{where}") from error
    try:
        values = list(values)
    except TypeError:
        raise ValueError(
            f"reward function {name!r}: expected a list of {len(completions)} floats, received {type(values).__name__}"
        ) from None
    if len(values) != len(completions):
        raise ValueError(
            f"reward function {name!r}: expected {len(completions)} values (one per completion), received {len(values)}"
        )
    floats = []
    for index, value in enumerate(values):
        if value is None:
            floats.append(math.nan)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(
                f"reward function {name!r}: expected a finite number or None for completion {index}, "
                f"received {value!r} ({type(value).__name__}); completion {index}: {str(completions[index])[:80]!r}"
            )
        floats.append(float(value))
    return torch.tensor(floats, dtype=torch.float32)


def _failing_completion(function: RewardFunction, prompts, completions, completion_ids,
                        columns: dict[str, list]) -> int | None:
    """The first completion the function raises on when called with it alone (None: none does)."""
    for index in range(len(completions)):
        try:
            function(prompts=[prompts[index]], completions=[completions[index]],
                     completion_ids=None if completion_ids is None else [completion_ids[index]],
                     **{key: [values[index]] for key, values in columns.items()})
        except Exception:
            return index
    return None


def score(
    functions: Sequence[RewardFunction],
    weights: Sequence[float] | None,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: dict[str, list] | None = None,
) -> Scores:
    """Weighted sum of every function's rewards, plus each function's values for the logs."""
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(f"reward_weights: expected {len(functions)} weights, received {len(weights)}")
    per_function: dict[str, torch.Tensor] = {}
    total = torch.zeros(len(completions))
    for function, weight in zip(functions, weights):
        name = reward_name(function)
        if name in per_function:  # two functions with one name: keep both in the logs
            name = f"{name}_{len(per_function)}"
        values = call_reward(function, prompts, completions, completion_ids, columns or {})
        per_function[name] = values
        total += weight * torch.nan_to_num(values, nan=0.0)
    return Scores(total=total, per_function=per_function)
