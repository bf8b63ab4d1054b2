"""The ``grpo-fast`` command.

    grpo-fast train                                   # the embedded demo: tiny model, built-in task, CPU ok
    grpo-fast train --config run.yaml --learning_rate 5e-6 --max_steps 200
    grpo-fast train --config run.yaml --resume        # continue the latest run from its last checkpoint
    grpo-fast eval --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/<run>/checkpoints/step_000500/model --split test
    grpo-fast plan --config examples/gsm8k_qwen2.5_7b.yaml  # estimated peak memory, longest completion per budget
    grpo-fast doctor                                  # versions, and each fused kernel checked here (bug reports)

Any ``GRPOConfig`` field is an option ``--key value`` (or ``--key=value``); it overrides the YAML.
Subcommands register in ``SUBCOMMANDS``; each adds its arguments and returns an exit code.

A mistake is one line on stderr, not a traceback: the project's input errors (``ValueError``s
naming the key or file, exit code 2), a run stopped on purpose (``grpo_fast.errors.RunError``:
a reward function raised, a NaN loss; exit code 1) and the libraries' errors a user can cause
(YAML, datasets, the hub, the OS: a missing file, no permission, a full disk; exit code 1).
Ctrl-C / SIGTERM print how to resume (exit code 128 + the signal's number). ``--debug`` or
``GRPO_FAST_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Callable, Sequence

from .errors import RunError, TrainingInterrupted, one_line

DEBUG_VARIABLE = "GRPO_FAST_DEBUG"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of GRPOConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a run directory that holds one, deleting its logs and checkpoints")
    parser.set_defaults(takes_overrides=True)  # any other --key value pairs override config fields
    from .config_reference import help_text

    parser.epilog = ("With no options: the embedded demo (tiny model, built-in task, CPU). Any key below is also an "
                     "option overriding the YAML, e.g. --learning_rate 1e-5 --max_steps 200.\n\n" + help_text())


def run_train(args: argparse.Namespace) -> int:
    from .console import import_bitsandbytes

    import_bitsandbytes()  # before peft imports it: without its hub lookup's network trip and warning
    from .config import load_config
    from .trainer import train

    # "module:function" paths in the config resolve from the working directory, as with python -m.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("--resume")
    if args.overwrite:
        overrides.append("--overwrite")
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
    from .memory import GIB, estimate, memory_budget, plan_table, rollout_rows, shape_of, size_to_budget

    if args.prompt_length < 1:
        raise ValueError(f"--prompt-length: expected a positive number of tokens, received {args.prompt_length}")
    config = load_config(args.config, list(args.overrides))
    shape = shape_of(config)
    print(f"{config.model}: {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
          f"{shape.heads} heads / {shape.kv_heads} KV heads, vocabulary {shape.vocab}", flush=True)
    if config.max_memory_gb is None:
        print(plan_table(config, shape, args.prompt_length), flush=True)
        return 0
    # With a budget: the plan the trainer would run (waves, micro-batches, the engine's memory), its
    # terms, peak and headroom; not the unbudgeted step, whose peak the trainer never reaches.
    budget = memory_budget(config, __import__("torch").device("cpu"))
    sized = size_to_budget(config, shape, budget, args.prompt_length)
    changes = []
    if sized.rollout_memory != config.rollout_memory:
        changes.append("rollout_memory free (the engine's KV cache and NF4 decode copy freed for training)")
    if sized.micro_batch_tokens != config.micro_batch_tokens:
        changes.append(f"micro-batches of {sized.micro_batch_tokens} tokens")
    wave = rollout_rows(sized, shape, budget, args.prompt_length)
    if wave < sized.generation_batch_size:
        changes.append(f"the rollout in waves of {wave} of the step's {sized.generation_batch_size} completions")
    print(plan_table(sized, shape, args.prompt_length, rollout_rows=wave), flush=True)
    peak = estimate(sized, shape, prompt_length=args.prompt_length, rollout_rows=wave).peak
    print(f"with max_memory_gb {config.max_memory_gb:g}: " + (", ".join(changes) or "fits as configured")
          + f"; peak {peak / GIB:.2f} GiB, headroom {(budget - peak) / GIB:.2f} GiB", flush=True)
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation import add_eval_arguments as add_arguments

    add_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    from .console import import_bitsandbytes

    import_bitsandbytes()  # as run_train
    from .evaluation import run_eval as evaluate_command

    return evaluate_command(args)


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Prints the environment, then checks each fused path on this machine against its eager "
                     "reference; exit code 1 when a check fails. Paste its output into bug reports.")


def run_doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor

    return doctor()


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train a policy with GRPO", add_train_arguments, run_train),
    "eval": ("greedy-decoding accuracy and format rate of a model (+ adapter) on a dataset split",
             add_eval_arguments, run_eval),
    "plan": ("the estimated peak memory of a config's step, and the longest completion per budget",
             add_plan_arguments, run_plan),
    "doctor": ("the environment, and each fused kernel checked on this machine against its eager reference",
               add_doctor_arguments, run_doctor),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-fast", description="GRPO training on one GPU (or CPU for the demo)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, allow_abbrev=False,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(subparser)
        subparser.add_argument("--debug", action="store_true",
                               help=f"show tracebacks instead of one-line errors (or set {DEBUG_VARIABLE}=1)")
        subparser.set_defaults(handler=handler)
    return parser


def resume_command(argv: Sequence[str], run_name: str, flag: str = "--resume") -> str:
    """The train command line that continues (``--resume``) or restarts (``--overwrite``) ``run_name``:
    the original options, with the run named."""
    kept, skip = [], False
    for index, argument in enumerate(argv):
        if skip:
            skip = False
            continue
        key = argument.split("=", 1)[0].replace("-", "_")
        if key in ("__resume", "__overwrite"):
            following = argv[index + 1] if index + 1 < len(argv) else ""
            skip = "=" not in argument and following.lower() in ("true", "false", "1", "0", "yes", "no")
            continue
        kept.append(argument)
    if not any(argument.split("=", 1)[0].replace("-", "_") == "__run_name" for argument in kept):
        kept += ["--run_name", run_name]
    return shlex.join(["grpo-fast", *kept, flag])


def _library_errors() -> tuple[type[BaseException], ...]:
    """The errors of libraries a user's input can cause, among those already imported (importing
    datasets only to catch its errors would cost seconds)."""
    errors: list[type[BaseException]] = [OSError, ImportError]  # the hub's and transformers' are OSErrors
    for module, name in (("yaml", "YAMLError"), ("datasets.exceptions", "DatasetsError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (2 for bad arguments or inputs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Config overrides are open-ended (every GRPOConfig field), so they are the arguments the
    # subcommand's parser does not know; the config loader checks each key.
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    prefix = f"grpo-fast {args.command}"
    if args.debug or os.environ.get(DEBUG_VARIABLE, "").lower() in ("1", "true", "yes"):
        return args.handler(args)
    try:
        return args.handler(args)
    except TrainingInterrupted as stop:
        advice = "continue with" if stop.step is not None else "start again with"
        flag = "--resume" if stop.step is not None else "--overwrite"
        print(f"{prefix}: {stop.summary}; {advice}: {resume_command(argv, stop.run_dir.name, flag)}",
              file=sys.stderr, flush=True)
        return 128 + stop.signal_number
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr, flush=True)
        return 130
    except ValueError as error:
        print(f"{prefix}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except RunError as error:
        print(f"{prefix}: stopped: {one_line(error)}", file=sys.stderr, flush=True)
        return 1
    except _library_errors() as error:
        print(f"{prefix}: error: {type(error).__name__}: {one_line(error)} (--debug shows the traceback)",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
