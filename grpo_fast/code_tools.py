"""Code RL on top of ``grpo_fast.sandbox``: a ``python`` tool for tool-calling rollouts and a reward that runs
each completion's code against the dataset row's tests.

- ``make_python_tool(**limits)`` returns ``python(code: str) -> str``, a plain typed function with a
  Google-style docstring: ``trl.GRPOTrainer(tools=[...])`` and grpo-fast's trainer both read its name,
  signature and docstring (``transformers.utils.get_json_schema``) into the chat template's tool list.
  It returns the program's stdout, or an error text naming the limit it hit; it never raises on bad code.
- ``make_code_reward(**limits)`` returns ``code_tests_reward(prompts, completions, tests=..., **columns)``:
  the last ```python block of each completion runs with its row's ``tests`` (one code string: 1.0 if it
  runs without an exception, else 0.0; a list of strings: the fraction that pass), rows in parallel.

The tests run in the same process as the solution, so a program that sets out to forge its result can
(docs/code-execution.md); plain cheats (``sys.exit(0)``, ``os._exit(0)``,
printing a fake summary) score 0.
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from .rewards import completion_text
from .sandbox import check_limits, run_python

_CODE_BLOCK = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)
_LIMIT_NAMES = [name for name, p in inspect.signature(run_python).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "stdin"]


def _checked_limits(limits: dict[str, Any], who: str) -> dict[str, Any]:
    unknown = sorted(set(limits) - set(_LIMIT_NAMES))
    if unknown:
        raise TypeError(f"{who}: unknown limit(s) {unknown}; expected some of {_LIMIT_NAMES}")
    defaults = {name: p.default for name, p in inspect.signature(run_python).parameters.items()}
    merged = {**defaults, **limits}
    check_limits(**{name: merged[name] for name in ("timeout_s", "cpu_s", "memory_mb", "max_processes",
                                                    "max_output_bytes", "max_file_mb", "max_open_files")})
    return limits


def make_python_tool(**limits: Any) -> Callable[[str], str]:
    """A ``python`` tool running its argument under ``run_python``'s limits (``timeout_s=5``, ``memory_mb=512``...)."""
    limits = _checked_limits(limits, "make_python_tool")

    def python(code: str) -> str:
        """Run a Python program in a fresh, limited process and return what it printed.

        The program has a fresh empty working directory and no network access where the system allows
        blocking it; CPU time, memory, processes and output are limited. Print the values you want to see.

        Args:
            code: The complete Python program to run.

        Returns:
            The program's standard output, or an error description ending with its standard error.
        """
        result = run_python(code, **limits)
        if result.ok:
            return result.stdout
        return (result.stdout.rstrip() + "\n" if result.stdout.strip() else "") + result.error_text()

    return python


python = make_python_tool()


def extract_code(text: str) -> str | None:
    """The last fenced code block marked python (or unmarked) in ``text``; None when there is none.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nand better:\\n```python\\nprint(2)\\n```")
    'print(2)\\n'
    """
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


# The harness reads a per-run token from stdin before the solution runs, runs the solution and then each test
# in a copy of its namespace with the output sent to /dev/null, and writes "<token> <passed>" last.
# A solution that exits, crashes the interpreter or hangs leaves no line with the token: it scores 0.
_HARNESS = """\
import os, sys

def _run(solution, tests):
    token = sys.stdin.readline().strip()
    out = sys.stdout
    sys.stdout = sys.stderr = open(os.devnull, "w")
    namespace = {"__name__": "solution"}
    passed = 0
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
        loaded = True
    except BaseException:
        loaded = False
    for test in tests if loaded else []:
        try:
            exec(compile(test, "test.py", "exec"), dict(namespace))
            passed += 1
        except BaseException:
            pass
    out.write("\\n" + token + " " + str(passed) + "\\n")
    out.flush()
    os._exit(0)

_run(@SOLUTION@, @TESTS@)
"""


def _score(code: str | None, tests: str | Sequence[str] | None, limits: dict[str, Any]) -> float | None:
    if tests is None:
        return None
    if code is None:
        return 0.0
    test_list = [tests] if isinstance(tests, str) else list(tests)
    if not test_list or not all(isinstance(test, str) for test in test_list):
        raise ValueError(f"tests: expected a code string or a non-empty list of code strings, received {tests!r:.200}")
    token = secrets.token_hex(16)
    program = _HARNESS.replace("@TESTS@", repr(test_list)).replace("@SOLUTION@", repr(code))  # the code last
    result = run_python(program, stdin=token + "\n", **limits)
    if result.limit is not None:
        return 0.0
    for line in reversed(result.stdout.splitlines()):
        fields = line.split()
        if len(fields) == 2 and fields[0] == token and fields[1].isdigit():
            return min(int(fields[1]), len(test_list)) / len(test_list)
    return 0.0


def make_code_reward(*, max_workers: int | None = None, **limits: Any) -> Callable[..., list]:
    """A reward in TRL's signature that runs each completion's last python block against its row's ``tests``.

    ``max_workers`` bounds the runs in flight (default: the CPU count, at most 8); ``limits`` go to
    ``run_python`` for each row (one run per row covers all its tests, so ``timeout_s`` is for all of them).
    """
    limits = _checked_limits(limits, "make_code_reward")
    if max_workers is None:
        max_workers = min(8, os.cpu_count() or 1)
    if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
        raise ValueError(f"max_workers: expected a positive int, received {max_workers!r}")

    def code_tests_reward(prompts: list, completions: list, completion_ids: list | None = None,
                          tests: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
        if tests is None:
            raise ValueError("code_tests_reward: the dataset needs a 'tests' column (per row: a code string of "
                             f"asserts, or a list of them); received the columns {sorted(columns)}")
        if len(tests) != len(completions):
            raise ValueError(f"tests: expected one entry per completion ({len(completions)}), received {len(tests)}")
        codes = [extract_code(completion_text(completion)) for completion in completions]
        with ThreadPoolExecutor(max_workers=min(max_workers, len(codes) or 1)) as pool:
            return list(pool.map(lambda pair: _score(pair[0], pair[1], limits), zip(codes, tests)))

    return code_tests_reward


code_tests_reward = make_code_reward()
