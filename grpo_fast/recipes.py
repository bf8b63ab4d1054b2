"""GSM8K recipe: grade-school maths word problems as chat prompts, with rewards for the answer.

GSM8K rows are ``{"question": str, "answer": str}`` where the answer is a worked solution
ending in ``#### <number>``. ``gsm8k_example`` turns one into::

    {"prompt": [{"role": "system", "content": GSM8K_SYSTEM_PROMPT},
                {"role": "user", "content": question}],
     "question": question,
     "answer": "72"}            # the final answer only, the column the rewards read

and ``load_gsm8k`` loads a split, from the Hugging Face Hub (``openai/gsm8k``, config ``main``)
or from a local ``.jsonl`` / ``.json`` / ``.parquet`` file (or a folder of them) with the same
columns, and maps every row through it. ``gsm8k_reward_functions`` returns the recipe's rewards
(answer correctness plus a small format bonus) in the TRL signature both trainers call.

Train with grpo-fast (``examples/gsm8k_qwen2.5_0.5b.yaml``, ``examples/gsm8k_qwen2.5_7b.yaml``)
or with TRL::

    from grpo_fast.recipes import load_gsm8k, gsm8k_reward_functions
    from grpo_fast.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=gsm8k_reward_functions(),
                               args=trl.GRPOConfig(...), train_dataset=load_gsm8k(split="train"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rewards import (
    RewardFunction,
    accuracy_reward,
    lenient_format_reward,
    reference_answer,
    strict_format_reward,
    symbolic_accuracy_reward,
)

GSM8K_HUB_ID = "openai/gsm8k"

GSM8K_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a maths question and the Assistant solves it. "
    "The Assistant first thinks through the reasoning step by step, then gives the final answer as a single "
    "number. Respond in exactly this format:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def gsm8k_example(row: dict[str, Any], system_prompt: str = GSM8K_SYSTEM_PROMPT) -> dict[str, Any]:
    """One GSM8K row as a chat prompt plus its final answer.

    >>> example = gsm8k_example({"question": "What is 6 x 12?", "answer": "6*12=<<6*12=72>>72\\n#### 72"})
    >>> [message["role"] for message in example["prompt"]], example["answer"]
    (['system', 'user'], '72')
    >>> gsm8k_example({"question": "2+2?", "answer": "#### 4"}, system_prompt="")["prompt"]
    [{'role': 'user', 'content': '2+2?'}]
    """
    for column in ("question", "answer"):
        if column not in row:
            raise ValueError(
                f"row: expected GSM8K columns 'question' and 'answer', received columns {sorted(row)}"
            )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": row["question"].strip()})
    return {"prompt": messages, "question": row["question"], "answer": reference_answer(row["answer"])}


def load_gsm8k(
    source: str | Path = GSM8K_HUB_ID,
    split: str = "train",
    *,
    limit: int | None = None,
    offset: int = 0,
    system_prompt: str = GSM8K_SYSTEM_PROMPT,
):
    """A GSM8K split as a ``datasets.Dataset`` of ``gsm8k_example`` rows.

    Args:
        source: ``"openai/gsm8k"`` (or another Hub id with the same columns), or a local
            ``.jsonl`` / ``.json`` / ``.parquet`` file, or a folder holding ``<split>.<ext>`` files.
        split: ``"train"`` or ``"test"`` (a local file is the split itself).
        limit, offset: keep rows ``offset .. offset + limit`` (a held-out slice, a quick run).
        system_prompt: the instruction asking for the tag layout; "" for none.

    >>> dataset = load_gsm8k("tests/data/gsm8k.jsonl", limit=2)  # doctest: +SKIP
    >>> dataset[0]["answer"]  # doctest: +SKIP
    '72'
    """
    import datasets

    if offset < 0 or (limit is not None and limit <= 0):
        raise ValueError(f"limit/offset: expected limit > 0 or None and offset >= 0, received {limit}/{offset}")
    path = Path(source)
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"source: expected a {'/'.join(_LOCAL_BUILDERS)} file, received {str(path)!r}")
        dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    elif path.is_dir():
        files = [file for file in sorted(path.iterdir()) if file.stem == split and file.suffix in _LOCAL_BUILDERS]
        if not files:
            raise ValueError(
                f"source: expected {split}.jsonl, {split}.json or {split}.parquet in {str(path)!r}, "
                f"received {sorted(p.name for p in path.iterdir())}"
            )
        dataset = datasets.load_dataset(_LOCAL_BUILDERS[files[0].suffix], data_files={split: str(files[0])}, split=split)
    elif str(source).startswith((".", "/")) or str(source).endswith(tuple(_LOCAL_BUILDERS)):
        raise ValueError(f"source: expected an existing file or folder, received {str(source)!r} (not found)")
    else:
        dataset = datasets.load_dataset(str(source), "main", split=split)

    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"source: expected GSM8K columns 'question' and 'answer', received columns {dataset.column_names}"
        )
    end = len(dataset) if limit is None else min(len(dataset), offset + limit)
    if offset or end < len(dataset):
        dataset = dataset.select(range(min(offset, end), end))
    extra = [column for column in dataset.column_names if column not in ("question", "answer")]
    return dataset.map(gsm8k_example, fn_kwargs={"system_prompt": system_prompt}, remove_columns=extra)


def gsm8k_reward_functions(*, strict_format: bool = True, symbolic: bool = False) -> list[RewardFunction]:
    """The recipe's rewards: answer correctness (1.0) and the tag-layout format (1.0 strict, or
    lenient), summed by the trainer with equal weights, so a correct, well-formatted completion
    scores 2 and the format is learnt first. ``symbolic=True`` uses ``math-verify`` equivalence.

    >>> [f.__name__ for f in gsm8k_reward_functions()]
    ['accuracy_reward', 'strict_format_reward']
    """
    accuracy = symbolic_accuracy_reward if symbolic else accuracy_reward
    return [accuracy, strict_format_reward if strict_format else lenient_format_reward]


def gsm8k_train():
    """GSM8K's train split from the Hub as recipe rows: ``dataset: grpo_fast.recipes:gsm8k_train``
    in a ``grpo-fast train`` config (offline: ``prepare_gsm8k`` once, then the jsonl path)."""
    return load_gsm8k(GSM8K_HUB_ID, "train")


def gsm8k_test():
    """GSM8K's test split from the Hub as recipe rows (evaluation)."""
    return load_gsm8k(GSM8K_HUB_ID, "test")


def prepare_gsm8k(
    output_dir: str | Path, source: str | Path = GSM8K_HUB_ID, splits: tuple[str, ...] = ("train", "test")
) -> list[Path]:
    """Write ``<split>.jsonl`` files of ``gsm8k_example`` rows (``prompt`` as chat messages,
    ``question``, ``answer``) to ``output_dir``: the recipe's dataset for any trainer that reads
    local jsonl with a prompt column (``grpo-fast train``). Returns the paths written.

        python -m grpo_fast.recipes --output-dir data/gsm8k        # from the Hub, once, online
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in splits:
        path = output_dir / f"{split}.jsonl"
        load_gsm8k(source, split).to_json(str(path), lines=True, force_ascii=False)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m grpo_fast.recipes", description="Write the GSM8K recipe's jsonl")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--source", default=GSM8K_HUB_ID, help="Hub id, or a local file/folder with question/answer")
    parser.add_argument("--splits", nargs="+", default=["train", "test"])
    options = parser.parse_args(argv)
    for path in prepare_gsm8k(options.output_dir, options.source, tuple(options.splits)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "GSM8K_HUB_ID",
    "GSM8K_SYSTEM_PROMPT",
    "gsm8k_example",
    "gsm8k_reward_functions",
    "gsm8k_test",
    "gsm8k_train",
    "load_gsm8k",
    "prepare_gsm8k",
]
