"""Prompts: rows from a dataset, the prompt text the model continues, and a resumable order.

``dataset`` in the config is one of:

- a local ``.jsonl`` / ``.json`` / ``.parquet`` file;
- a Hugging Face hub id (with ``dataset_config`` and ``dataset_split``);
- ``"module:function"``: a function called with no arguments that returns rows (a
  ``datasets.Dataset`` or a list of dicts), e.g. ``grpo_fast.tasks:letters_dataset``.

Each row's ``prompt_column`` holds a string or a list of chat messages (rendered through the
tokenizer's chat template with the assistant turn opened); the row's other columns reach the
reward functions as keyword arguments. Rows are loaded and every prompt checked before the model
loads: a missing, empty or unreadable file, a hub dataset that cannot be loaded, a function that
raises or returns something other than rows, and a prompt that is not text are ``ValueError``s
naming the key (``dataset`` / ``eval_dataset``), the source and the row.

The order is a pure function of (seed, position): epoch ``e`` visits the rows in the permutation
seeded by ``(seed, e)``, so a checkpoint stores only the number of prompts consumed and a resumed
run draws the same next batch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .config import GRPOConfig, is_import_path
from .errors import one_line
from .evaluation import prompt_text

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def import_object(path: str, key: str):
    """``"package.module:name"`` -> the object; errors name ``key`` (a module that fails to import,
    a syntax error in it included, is one of them)."""
    module_name, separator, attribute = path.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"{key}: expected an import path 'module:function', received {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{key}: cannot import module {module_name!r} from {path!r} ({error})") from error
    except Exception as error:  # the module's own code failed: say where
        where = f" at {error.filename}:{error.lineno}" if isinstance(error, SyntaxError) else ""
        raise ValueError(f"{key}: importing module {module_name!r} from {path!r} raised "
                         f"{type(error).__name__}{where}: {one_line(error)}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{key}: module {module_name!r} has no attribute {attribute!r} (from {path!r})") from None


def import_callable(source, key: str, expected: str = "a callable"):
    """A callable given as itself or as an import path ``"module:name"``; errors name ``key`` and say
    ``expected`` when the object found is not callable."""
    found = source if callable(source) else import_object(source, key)
    if not callable(found):
        raise ValueError(f"{key}: expected {expected}, received {type(found).__name__} from {source!r}")
    return found


@contextlib.contextmanager
def _quiet_datasets(progress_bars: bool = True) -> Iterator[None]:
    """datasets logs a failed read before raising it: the raised error is reported, once. Without
    ``progress_bars``, no "Generating train split" bars either (a local file reads in a moment)."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    bars_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not progress_bars:
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_disabled:
            datasets.utils.enable_progress_bars()


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error of a chain (datasets wraps the parser's message in a generic one)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _call_rows_function(source: str, key: str):
    function = import_object(source, key)
    if not callable(function):
        raise ValueError(f"{key}: expected {source!r} to be a function returning rows, received "
                         f"{type(function).__name__}")
    try:
        rows = function()
    except Exception as error:
        raise ValueError(f"{key}: {source!r} raised {type(error).__name__}: {one_line(error)}") from error
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__len__") or not hasattr(rows, "__getitem__"):
        raise ValueError(f"{key}: expected {source!r} to return rows (a datasets.Dataset or a list of dicts), "
                         f"received {type(rows).__name__}")
    if not hasattr(rows, "column_names"):
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{key}: expected {source!r} to return rows (dicts), received row {index}: "
                                 f"{type(row).__name__}")
    return rows


def _load_local(path: Path, split: str, key: str):
    import datasets

    builder = LOCAL_FORMATS.get(path.suffix)
    if builder is None:
        raise ValueError(f"{key}: expected a {'/'.join(LOCAL_FORMATS)} file, received {str(path)!r}")
    if builder == "json" and not path.read_bytes().strip():
        raise ValueError(f"{key}: expected rows in {str(path)!r}, received an empty file")
    try:
        with _quiet_datasets(progress_bars=False):
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    except Exception as error:  # datasets, pyarrow and json errors all mean "not a readable file of rows"
        cause = _root_cause(error)
        raise ValueError(f"{key}: expected a readable {path.suffix} file of rows, received {str(path)!r} "
                         f"({type(cause).__name__}: {one_line(cause)})") from error


def _load_dataset(source: str, config_name: str | None, split: str, key: str):
    """A hub id, or a local folder of data files, through ``datasets.load_dataset``."""
    import datasets

    try:
        with _quiet_datasets():
            return datasets.load_dataset(source, config_name, split=split)
    except Exception as error:  # not found, offline, no such configuration or split
        raise ValueError(f"{key}: expected a hub dataset id or a local file or folder of rows, received {source!r} "
                         f"(configuration {config_name!r}, split {split!r}) that could not be loaded: "
                         f"{type(error).__name__}: {one_line(error)}") from error


def load_rows(source: str, *, config_name: str | None = None, split: str = "train", key: str = "dataset"):
    """The rows of ``source`` (see the module docstring) as a ``datasets.Dataset`` or a list of dicts;
    errors name ``key``."""
    path = Path(source)
    if is_import_path(source) and not path.exists():
        rows = _call_rows_function(source, key)
    elif path.is_file():
        rows = _load_local(path, split, key)
    elif path.is_dir():
        rows = _load_dataset(source, config_name, split, key)
    elif source.startswith((".", "/", "~")) or path.suffix in LOCAL_FORMATS:
        raise ValueError(f"{key}: expected an existing {'/'.join(LOCAL_FORMATS)} file, received {source!r} (not found)")
    else:
        rows = _load_dataset(source, config_name, split, key)
    if len(rows) == 0:
        raise ValueError(f"{key}: expected at least one row, received an empty dataset from {source!r}")
    return rows


def column_names(rows) -> list[str]:
    return list(rows.column_names) if hasattr(rows, "column_names") else sorted(rows[0])


def check_prompt_column(rows, prompt_column: str, source: str, key: str = "dataset") -> None:
    """Every row holds ``prompt_column`` with a prompt: a non-empty string or a list of chat messages
    (dicts with a ``role`` and a ``content``)."""
    names = column_names(rows)
    if prompt_column not in names:
        raise ValueError(
            f"prompt_column: expected a column {prompt_column!r} in dataset {source!r}, received columns {names}"
        )
    for index, prompt in enumerate(rows[prompt_column] if hasattr(rows, "column_names") else
                                   (row.get(prompt_column) for row in rows)):
        if not _is_prompt(prompt):
            raise ValueError(f"{key}: expected row {index}'s {prompt_column!r} to be a prompt (a non-empty string or "
                             f"a list of chat messages with 'role' and 'content'), received {str(prompt)[:80]!r} "
                             f"({type(prompt).__name__}) in {source!r}")


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return bool(prompt)
    return (isinstance(prompt, list) and bool(prompt)
            and all(isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message
                    for message in prompt))


def load_prompts(config: GRPOConfig):
    """The training rows for ``config``, checked to hold prompts in ``prompt_column``."""
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
