"""Prompts: rows from a dataset, the prompt text the model continues, and a resumable order.

``dataset`` in the config is one of:

- a local ``.jsonl`` / ``.json`` / ``.parquet`` file;
- a Hugging Face hub id (with ``dataset_config`` and ``dataset_split``);
- ``"module:function"``: a function called with no arguments that returns rows (a
  ``datasets.Dataset`` or a list of dicts), e.g. ``grpo_fast.tasks:letters_dataset``.

Each row's ``prompt_column`` holds a string or a list of chat messages (rendered through the
tokenizer's chat template with the assistant turn opened); the row's other columns reach the
reward functions as keyword arguments.

The order is a pure function of (seed, position): epoch ``e`` visits the rows in the permutation
seeded by ``(seed, e)``, so a checkpoint stores only the number of prompts consumed and a resumed
run draws the same next batch.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import GRPOConfig
from .evaluation import prompt_text

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def import_object(path: str, key: str):
    """``"package.module:name"`` -> the object; errors name ``key``."""
    module_name, separator, attribute = path.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"{key}: expected an import path 'module:function', received {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{key}: cannot import module {module_name!r} from {path!r} ({error})") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{key}: module {module_name!r} has no attribute {attribute!r} (from {path!r})") from None


def _is_import_path(source: str) -> bool:
    module_name, separator, attribute = source.partition(":")
    return bool(separator) and attribute.isidentifier() and all(part.isidentifier() for part in module_name.split("."))


def load_rows(source: str, *, config_name: str | None = None, split: str = "train"):
    """The rows of ``source`` (see the module docstring) as a ``datasets.Dataset`` or a list of dicts."""
    path = Path(source)
    if _is_import_path(source) and not path.exists():
        rows = import_object(source, "dataset")()
    elif path.is_file():
        import datasets

        builder = LOCAL_FORMATS.get(path.suffix)
        if builder is None:
            raise ValueError(f"dataset: expected a {'/'.join(LOCAL_FORMATS)} file, received {source!r}")
        rows = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    elif source.startswith((".", "/")) or path.suffix in LOCAL_FORMATS:
        raise ValueError(f"dataset: expected an existing file, received {source!r} (not found)")
    else:
        import datasets

        rows = datasets.load_dataset(source, config_name, split=split)
    if len(rows) == 0:
        raise ValueError(f"dataset: expected at least one row, received an empty dataset from {source!r}")
    return rows


def column_names(rows) -> list[str]:
    return list(rows.column_names) if hasattr(rows, "column_names") else sorted(rows[0])


def check_prompt_column(rows, prompt_column: str, source: str) -> None:
    names = column_names(rows)
    if prompt_column not in names:
        raise ValueError(
            f"prompt_column: expected a column {prompt_column!r} in dataset {source!r}, received columns {names}"
        )


def load_prompts(config: GRPOConfig):
    """The training rows for ``config``, checked to hold ``prompt_column``."""
    rows = load_rows(config.dataset, config_name=config.dataset_config, split=config.dataset_split)
    check_prompt_column(rows, config.prompt_column, config.dataset)
    return rows


def render_prompts(prompts: Sequence[Any], tokenizer) -> list[str]:
    """Prompt strings as they are, chat messages through the tokenizer's chat template."""
    return [prompt_text(prompt, tokenizer) for prompt in prompts]


def tokenize_prompts(texts: Sequence[str], tokenizer) -> list[list[int]]:
    # Chat templates already hold any BOS token (as in TRL, no special tokens are added here).
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def prompt_indices(position: int, count: int, num_rows: int, seed: int, shuffle: bool = True) -> list[int]:
    """Row indices of prompts ``position .. position + count`` in the run's order."""
    indices = []
    for absolute in range(position, position + count):
        epoch, offset = divmod(absolute, num_rows)
        indices.append(_epoch_order(num_rows, seed, epoch)[offset] if shuffle else offset)
    return indices


@functools.lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_rows, generator=generator).tolist())


def take_rows(rows, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [dict(rows[index]) for index in indices]
