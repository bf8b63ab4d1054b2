"""Greedy-decoding evaluation: accuracy and format rate on a split, per-example results to JSONL.

    grpo-fast eval --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/gsm8k/final \\
        --dataset openai/gsm8k --split test --limit 500 --output runs/gsm8k/eval.jsonl

For each row of a dataset shaped like ``grpo_fast.recipes.load_gsm8k``'s (``prompt`` as chat
messages or a string, ``answer`` the reference), the model writes a completion with greedy
decoding (batched, prompts sorted by length to waste less padding); the completion is scored
with ``accuracy_reward`` (the final answer equals the reference) and a format reward (the
``<reasoning>``/``<answer>`` layout, strict by default). The summary is the mean of each; every
example goes to the JSONL file with its completion, the extracted answer and both scores.

In a training loop, every N steps on a held-out slice::

    from grpo_fast.evaluation import evaluate
    result = evaluate(model, tokenizer, held_out, batch_size=32, max_new_tokens=512, progress=False)
    logger.log(result.metrics(prefix="eval/"), step=step)   # {"eval/accuracy": ..., "eval/format_rate": ...}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import one_line
from .rewards import (
    RewardFunction,
    accuracy_reward,
    extract_answer,
    lenient_format_reward,
    reference_answer,
    strict_format_reward,
)
from .rollout import cut_at_eos, pad


@dataclass
class EvalResult:
    """Summary of one evaluation: means over ``num_examples`` rows."""

    accuracy: float  # fraction whose final answer equals the reference
    format_rate: float  # fraction in the tag layout
    num_examples: int
    mean_completion_tokens: float
    output_path: str | None = None  # the per-example JSONL, when written

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """The numbers to log: ``{"eval/accuracy": ..., "eval/format_rate": ..., ...}``."""
        return {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}format_rate": self.format_rate,
            f"{prefix}mean_completion_tokens": self.mean_completion_tokens,
        }


def prompt_text(prompt: str | Sequence[dict[str, Any]], tokenizer) -> str:
    """The text the model continues: chat messages through the tokenizer's chat template (with the
    assistant turn opened), a string as is."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "prompt: received chat messages, expected a tokenizer with a chat_template to render them "
            f"({type(tokenizer).__name__} has none)"
        )
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy completions (token ids, up to and including EOS) for a batch of prompt texts."""
    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Chat templates already hold any BOS token; generation appends on the right, so pad on the left.
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    input_ids, attention_mask = pad(prompt_ids, pad_token_id, left=True)
    # Stop where training stops (the tokenizer's EOS), so eval completions look like rollouts.
    eos_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos_token_ids or None,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    return [cut_at_eos(row, eos_token_ids, max_new_tokens) for row in output[:, input_ids.shape[1]:].tolist()]


def evaluate(
    model,
    tokenizer,
    dataset,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 512,
    output_path: str | Path | None = None,
    format_reward: RewardFunction = strict_format_reward,
    progress: bool = True,
) -> EvalResult:
    """Accuracy and format rate of ``model`` on ``dataset`` with greedy decoding.

    Args:
        model, tokenizer: a causal LM (PEFT-wrapped or not) and its tokenizer.
        dataset: rows with ``prompt`` (chat messages or a string) and ``answer`` (the reference:
            a GSM8K solution ending in ``#### N``, or the bare answer); a ``datasets.Dataset`` or a list of dicts.
        batch_size: prompts per ``generate`` call. max_new_tokens: completion budget.
        output_path: where to write one JSON line per example (None: nowhere).
        format_reward: the layout check (``strict_format_reward`` or ``lenient_format_reward``).
        progress: show a tqdm bar.

    The model is put in eval mode for the call and given back in the mode it came in.
    """
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(
            f"batch_size/max_new_tokens: expected positive ints, received {batch_size}/{max_new_tokens}"
        )
    rows = [dict(row) for row in dataset]
    if not rows:
        raise ValueError("dataset: expected at least one row, received an empty dataset")
    for column in ("prompt", "answer"):
        if column not in rows[0]:
            raise ValueError(f"dataset: expected columns 'prompt' and 'answer', received {sorted(rows[0])}")

    texts = [prompt_text(row["prompt"], tokenizer) for row in rows]
    # Longest first: similar lengths share a batch, and an out-of-memory error comes at once.
    order = sorted(range(len(rows)), key=lambda index: -len(texts[index]))
    completion_ids: list[list[int]] = [[] for _ in rows]

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="eval", unit="batch", disable=not progress):
            indices = order[start : start + batch_size]
            for index, ids in zip(indices, generate_greedy(model, tokenizer, [texts[i] for i in indices], max_new_tokens)):
                completion_ids[index] = ids
    finally:
        model.train(was_training)

    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
    answers = [row["answer"] for row in rows]
    prompts = [row["prompt"] for row in rows]
    correct = accuracy_reward(prompts, completions, completion_ids, answer=answers)
    formatted = format_reward(prompts, completions, completion_ids, answer=answers)

    scored = [value for value in correct if value is not None]
    result = EvalResult(
        accuracy=sum(scored) / len(scored) if scored else math.nan,
        format_rate=sum(formatted) / len(formatted),
        num_examples=len(rows),
        mean_completion_tokens=sum(map(len, completion_ids)) / len(rows),
        output_path=None if output_path is None else str(output_path),
    )
    if output_path is not None:
        path = Path(output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for index, row in enumerate(rows):
                record = {
                    "index": index,
                    "question": row.get("question"),
                    "reference": reference_answer(row["answer"]),
                    "predicted": extract_answer(completions[index]),
                    "correct": correct[index],
                    "formatted": formatted[index],
                    "completion": completions[index],
                    "completion_tokens": len(completion_ids[index]),
                }
                handle.write(json.dumps(record) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# Loading and the command line
# --------------------------------------------------------------------------------------------

_DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_for_eval(
    model: str,
    adapter: str | None = None,
    *,
    dtype: str = "auto",
    device: str | None = None,
    load_in_4bit: bool = False,
):
    """(model, tokenizer) from a Hub id or a local folder, with a LoRA adapter folder on top.

    The tokenizer comes from the adapter folder when it holds one (a run that added tokens
    saves it there), else from the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, received {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .model import attention_implementation, quantization_config

    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "attn_implementation": attention_implementation()}
    if load_in_4bit:  # the trainer's NF4 settings, so an adapter is evaluated on the weights it trained on
        kwargs["quantization_config"] = quantization_config(_DTYPES[dtype])
        kwargs["device_map"] = {"": device}
    loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if not load_in_4bit:
        loaded = loaded.to(device)
    tokenizer_source = model
    if adapter is not None:
        from peft import PeftModel

        if not Path(adapter).is_dir():
            raise ValueError(f"adapter: expected a folder holding a saved PEFT adapter, received {adapter!r}")
        loaded = PeftModel.from_pretrained(loaded, adapter)
        if (Path(adapter) / "tokenizer_config.json").exists():
            tokenizer_source = adapter
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``grpo-fast eval`` options, added to ``parser``."""
    parser.add_argument("--model", required=True, help="Hub id or local folder of the base model")
    parser.add_argument("--adapter", default=None, help="folder of a LoRA adapter saved by training (default: none)")
    parser.add_argument("--dataset", default="openai/gsm8k",
                        help="Hub id, or a local .jsonl/.json/.parquet file (or folder) with question/answer columns "
                             "(default: %(default)s, GSM8K from the Hugging Face Hub)")
    parser.add_argument("--split", default="test", help="the split to evaluate (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate the first LIMIT rows (after --offset; default: all)")
    parser.add_argument("--offset", type=int, default=0, help="rows to skip first (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="new tokens per completion at most (default: %(default)s)")
    parser.add_argument("--output", default="eval_results.jsonl",
                        help="per-example results, JSONL (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=sorted(_DTYPES), help="weights dtype (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (bitsandbytes, CUDA)")
    parser.add_argument("--lenient-format", action="store_true", help="score the layout leniently")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """``grpo-fast eval``: load, evaluate, print the summary as one JSON line; the exit code."""
    from types import SimpleNamespace

    from .model import check_model_source
    from .recipes import load_gsm8k

    # the inputs are checked as grpo-fast train checks them: a bad one is a ValueError naming the flag (exit 2)
    check_model_source(SimpleNamespace(model=args.model, trust_remote_code=False), key="--model")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter: expected a folder holding a peft adapter (adapter_config.json), received "
                         f"{args.adapter!r}")
    try:
        dataset = load_gsm8k(args.dataset, args.split, limit=args.limit, offset=args.offset)
    except ValueError as error:  # load_gsm8k names its argument "source": here it is --dataset
        message = str(error)
        if message.startswith("source:"):
            raise ValueError("--dataset:" + message[len("source:"):]) from error
        raise
    except Exception as error:  # not found, offline, no such split: the input, not a failure of the run
        raise ValueError(f"--dataset: expected a hub dataset id or a local file or folder of GSM8K rows, received "
                         f"{args.dataset!r} (split {args.split!r}) that could not be loaded: "
                         f"{type(error).__name__}: {one_line(error)}") from error
    model, tokenizer = load_for_eval(
        args.model, args.adapter, dtype=args.dtype, device=args.device, load_in_4bit=args.load_in_4bit
    )
    result = evaluate(
        model, tokenizer, dataset,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        output_path=args.output,
        format_reward=lenient_format_reward if args.lenient_format else strict_format_reward,
        progress=not args.no_progress,
    )
    print(json.dumps(asdict(result)), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m grpo_fast.evaluation --model ...`` (the same as ``grpo-fast eval``)."""
    parser = add_eval_arguments(argparse.ArgumentParser(prog="grpo-fast eval", description=__doc__.splitlines()[0]))
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EvalResult", "add_eval_arguments", "evaluate", "generate_greedy", "load_for_eval", "main", "run_eval"]
