"""The ``grpo-fast`` command.

    grpo-fast train                                   # the embedded demo: tiny model, built-in task, CPU ok
    grpo-fast train --config run.yaml --learning_rate 5e-6 --max_steps 200
    grpo-fast train --config run.yaml --resume        # continue the latest run from its last checkpoint
    grpo-fast eval --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/<run>/checkpoints/step_000500/model --split test
    grpo-fast plan --config examples/gsm8k_qwen2.5_7b.yaml  # estimated peak memory, longest completion per budget

Any ``GRPOConfig`` field is an option ``--key value`` (or ``--key=value``); it overrides the YAML.
Subcommands register in ``SUBCOMMANDS``; each adds its arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of GRPOConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    parser.set_defaults(takes_overrides=True)  # any other --key value pairs override config fields
    parser.epilog = ("Any GRPOConfig field is also an option, --key value or --key=value, overriding the "
                     "YAML (e.g. --learning_rate 1e-5 --reward_functions mod:f,mod:g). With no options: "
                     "the embedded demo (tiny model, built-in task, CPU). Keys: README.md, 'Training'.")


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train

    # "module:function" paths in the config resolve from the working directory, as with python -m.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("--resume")
    config = load_config(args.config, overrides)
    result = train(config)
    print(f"run directory: {result.run_dir}", flush=True)
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"mean reward: step {first['step']} {first['reward/mean']:.3f} -> step {last['step']} "
              f"{last['reward/mean']:.3f}", flush=True)
    return 0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of GRPOConfig fields (as for train)")
    parser.add_argument("--prompt-length", type=int, default=256, help="the longest prompt, in tokens (default 256)")
    parser.set_defaults(takes_overrides=True)


def run_plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .memory import GIB, memory_budget, plan_table, shape_of, size_to_budget

    if args.prompt_length < 1:
        raise ValueError(f"--prompt-length: expected a positive number of tokens, received {args.prompt_length}")
    config = load_config(args.config, list(args.overrides))
    shape = shape_of(config)
    print(f"{config.model}: {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
          f"{shape.heads} heads / {shape.kv_heads} KV heads, vocabulary {shape.vocab}", flush=True)
    print(plan_table(config, shape, args.prompt_length), flush=True)
    if config.max_memory_gb is not None:
        sized = size_to_budget(config, shape, memory_budget(config, __import__("torch").device("cpu")),
                               args.prompt_length)
        tokens = sized.micro_batch_tokens
        print(f"with max_memory_gb {config.max_memory_gb:g}: "
              + ("fits as configured" if sized is config else f"micro-batches of {tokens} tokens"), flush=True)
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation import add_eval_arguments as add_arguments

    add_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    from .evaluation import run_eval as evaluate_command

    return evaluate_command(args)


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train a policy with GRPO", add_train_arguments, run_train),
    "eval": ("greedy-decoding accuracy and format rate of a model (+ adapter) on a dataset split",
             add_eval_arguments, run_eval),
    "plan": ("the estimated peak memory of a config's step, and the longest completion per budget",
             add_plan_arguments, run_plan),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-fast", description="GRPO training on one GPU (or CPU for the demo)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, allow_abbrev=False)
        add_arguments(subparser)
        subparser.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (2 for bad arguments or inputs)."""
    parser = build_parser()
    # Config overrides are open-ended (every GRPOConfig field), so they are the arguments the
    # subcommand's parser does not know; the config loader checks each key.
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"grpo-fast {args.command}: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
