"""Multi-turn tool calling in the trainer's rollouts, with TRL's ``tools`` / ``environment_factory`` semantics.

Configured with ``tools`` (``module:function`` paths: plain, sync or async callables whose name, signature and
docstring are the tool schema the chat template renders) and ``environment`` (``module:Class``, or a mapping of
names to classes, each dataset row's ``environment`` column picking one): one instance per rollout row, whose
``reset(**row)`` starts a rollout (a string it returns is appended to the prompt's last message) and whose
public methods are the row's tools; a ``get_reward()`` method makes it a reward source named after the class,
weight 1. The same functions and classes work unchanged in ``trl.GRPOTrainer(tools=..., environment_factory=...)``.

A rollout (``AgentRollouts.rollout``): each row's prompt is rendered with its tool schemas, and the engine
generates with ``turns=ToolTurns(...)``. When a row's turn ends (EOS), ``ToolTurns.turn_ended`` parses it with
transformers' response parsing (the tokenizer's ``response_template``, else a built-in one for the
Hermes / Qwen ``<tool_call>{json}</tool_call>`` format); its calls run in a worker thread (one at a time per row,
rows in parallel, each call with a timeout; async tools on an event loop thread) while the engine decodes the
other rows; their results, rendered as the chat template's tool turn and the next assistant header, are
appended to the row, which decodes on. A tool that raises, times out or is unknown returns
``{'error': '...'}`` text to the model and counts as a failure. The appended tokens carry ``tool_mask`` 0: they
are left out of the loss, the KL, the entropy and the importance ratios. Rewards receive each completion as TRL
passes it (the assistant turns and tool messages, a list of message dicts) and ``environments=``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .errors import one_line

# Hermes-style tool calls (Qwen2.5 / Qwen3, Hermes, and the templates that copy them); the assistant header and
# the end-of-turn text are read from the tokenizer's own template (see ``response_template``).
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


# --------------------------------------------------------------------------------------------
# Configuration: tools and environments from import paths
# --------------------------------------------------------------------------------------------


def environment_tools(environment) -> list[Callable]:
    """An environment's tools: its public methods other than ``reset`` and ``get_reward`` (bound), as TRL
    lists them (functions of the class, so properties are never evaluated)."""
    return [getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


def check_tool(tool: Callable, key: str) -> None:
    """The tool can be described to the model (transformers' schema from its signature and docstring)."""
    from transformers.utils import get_json_schema

    try:
        get_json_schema(tool)
    except Exception as error:
        raise ValueError(f"{key}: expected a tool with a type-hinted signature and a docstring describing its "
                         f"arguments (its schema for the chat template), received {getattr(tool, '__name__', tool)!r}: "
                         f"{one_line(error)}") from None


def _import_callable(source, key: str, expected: str) -> Callable:
    from .data import import_callable  # data imports the config: resolve late

    return import_callable(source, key, expected)


def load_tools(paths: Sequence[str | Callable]) -> list[Callable]:
    tools = []
    for index, path in enumerate(paths):
        tool = _import_callable(path, f"tools[{index}]", "a function")
        check_tool(tool, f"tools[{index}]")
        tools.append(tool)
    return tools


def load_environments(spec: str | type | dict | None) -> dict[str | None, Callable] | None:
    """``{name: factory}``; a single class is the mapping ``{None: class}`` (every row uses it)."""
    if spec is None:
        return None
    named = spec if isinstance(spec, dict) else {None: spec}
    factories = {}
    for name, path in named.items():
        key = "environment" if name is None else f"environment[{name!r}]"
        factories[name] = _import_callable(path, key, "a class (or a function returning an environment)")
    return factories


def _wrap_environment_reward(environment_type: type, run: Callable) -> Callable:
    """The environment's ``get_reward()`` as a reward function over the batch's ``environments``: a value for
    rollouts of exactly this class, None (not scored) for the others, as TRL does."""

    def environment_reward(prompts=None, completions=None, completion_ids=None, environments=(), **columns):
        return [run(environment.get_reward()) if type(environment) is environment_type else None
                for environment in environments]

    environment_reward.__name__ = environment_type.__name__
    return environment_reward


# --------------------------------------------------------------------------------------------
# Running the calls: worker threads, async tools on one event loop, timeouts
# --------------------------------------------------------------------------------------------


class _EventLoop:
    """One daemon thread running an asyncio loop for async tools (started on first use)."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="grpo-fast-async-tools", daemon=True).start()
                cls._loop = loop
            return cls._loop


def run_awaitable(value, timeout: float | None = None):
    """``value``, awaited on the tools' event loop when it is awaitable."""
    if not inspect.isawaitable(value):
        return value

    async def wrapped():
        return await value

    return asyncio.run_coroutine_threadsafe(wrapped(), _EventLoop.get()).result(timeout)


def call_with_timeout(function: Callable, arguments: dict, timeout: float | None):
    """``function(**arguments)`` (awaited when async), or ``TimeoutError`` after ``timeout`` seconds. A sync call
    runs on a daemon thread of its own: a call that never returns is abandoned, not killed (threads cannot be),
    and does not hold a pool's worker or keep the process alive."""
    if inspect.iscoroutinefunction(function):
        future = asyncio.run_coroutine_threadsafe(function(**arguments), _EventLoop.get())
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"timed out after {timeout:g} s") from None
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["value"] = run_awaitable(function(**arguments))
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"tool-{getattr(function, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"timed out after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --------------------------------------------------------------------------------------------
# Parsing and rendering turns with the chat template
# --------------------------------------------------------------------------------------------


def _render(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def response_template(tokenizer) -> dict:
    """The tokenizer's ``response_template``, or one for Hermes-style ``<tool_call>{json}</tool_call>`` calls: its
    start anchor is the assistant header the chat template writes (the generation prompt), its content ends at
    the EOS token. Refused when the chat template does not write tool calls in that format."""
    template = getattr(tokenizer, "response_template", None)
    if template is not None:
        return template
    user = [{"role": "user", "content": "x"}]
    closed = tokenizer.apply_chat_template(user, tokenize=False)
    opened = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    call = {"type": "function", "function": {"name": "probe_tool", "arguments": {"x": 1}}}
    rendered = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "", "tool_calls": [call]}],
                                             tokenize=False)
    header = opened[len(closed):] if opened.startswith(closed) else ""
    if not header or TOOL_CALL_OPEN not in rendered or tokenizer.eos_token is None:
        raise ValueError("tools: expected a tokenizer with a response_template, or a chat template that opens the "
                         f"assistant turn and writes tool calls as {TOOL_CALL_OPEN}{{json}}{TOOL_CALL_CLOSE} (Hermes / "
                         f"Qwen), received a template rendering a tool call as {rendered[len(closed):][:120]!r}")
    return {
        "defaults": {"role": "assistant"},
        "start_anchor": header,
        "fields": {
            "tool_calls": {"open": TOOL_CALL_OPEN, "close_pattern": rf"{TOOL_CALL_CLOSE}\s*", "repeats": True,
                           "content": "json", "transform": {"type": "function", "function": "{content}"}},
            "content": {"close_pattern": rf"{re.escape(tokenizer.eos_token)}\s*", "content": "text"},
        },
    }


def parse_turn(tokenizer, template: dict, ids: Sequence[int], prefix: Sequence[int], tools: Sequence[Callable]) -> dict:
    """One assistant turn as a message; a turn the template cannot parse (a malformed call) is its text, as TRL
    does. Tool calls lacking a function name or arguments are not calls."""
    try:
        message = tokenizer.parse_response(list(ids), template, prefix=list(prefix), tools=list(tools) or None)
        if message is None:
            raise ValueError("nothing parsed")
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments", {}), dict)):
                raise ValueError(f"malformed tool call {call!r}")
    except (ValueError, TypeError, KeyError):
        message = {"role": "assistant", "content": tokenizer.decode(list(ids), skip_special_tokens=True)}
    content = message.get("content")
    message["content"] = content.removesuffix(tokenizer.eos_token or "") if isinstance(content, str) else (content or "")
    return message


def tool_suffix_ids(tokenizer, tool_messages: list[dict]) -> list[int]:
    """The tokens that follow an assistant turn ending in EOS: the tool messages as the chat template renders
    them, and the next assistant header (the difference between a dummy conversation with and without them)."""
    calls = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prefix = _render(tokenizer, dummy)
    full = _render(tokenizer, dummy + tool_messages, add_generation_prompt=True)
    ends = [index for index, token in enumerate(prefix) if token == tokenizer.eos_token_id]
    if ends:  # the turn ends at its EOS (a template's newline after it belongs to the suffix)
        prefix = prefix[: ends[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ValueError("tools: expected a chat template that renders a conversation's earlier turns the same when "
                         "tool messages follow (prefix-preserving), received one that does not")
    return full[len(prefix):]


# --------------------------------------------------------------------------------------------
# The turn handler
# --------------------------------------------------------------------------------------------


@dataclass
class _Turn:
    start: int  # the turn's first completion token
    end: int  # one past its EOS
    message: dict
    tool_messages: list[dict]
    appended: int = 0  # suffix tokens


class ToolTurns:
    """The engine's ``TurnHandler`` for one ``generate`` call: per output row its prompt ids, tools and turns.

    ``turn_ended(row, completion_ids)`` parses the turn that just ended; with tool calls (and turns left under
    ``max_iterations``: TRL's ``max_tool_calling_iterations``, None for no limit) it returns a future of the
    tokens to append, else None (the row is finished). ``messages(row, completion_ids)`` is the row's
    completion as TRL passes it to rewards; ``tool_call_count`` / ``tool_failure_count`` count the calls run."""

    def __init__(self, tokenizer, prompt_ids: Sequence[Sequence[int]], tools: Sequence[Sequence[Callable]], *,
                 max_iterations: int | None = None, timeout: float | None = 60.0, max_workers: int = 16,
                 max_completion_length: int | None = None):
        if len(tools) != len(prompt_ids):
            raise ValueError(f"tools: expected one tool list per row ({len(prompt_ids)}), received {len(tools)}")
        self.tokenizer = tokenizer
        self.template = response_template(tokenizer)
        self.prompt_ids = [list(ids) for ids in prompt_ids]
        self.tools = [list(row) for row in tools]
        self.max_iterations = max_iterations
        self.timeout = timeout
        self.max_completion_length = max_completion_length  # a tool turn that would pass it is dropped (TRL)
        self.turns: list[list[_Turn]] = [[] for _ in prompt_ids]
        self.tool_call_count = 0
        self.tool_failure_count = 0
        self.timed_out: set[int] = set()  # rows with a call abandoned on its timeout (it may still be running)
        self._lock = threading.Lock()
        # A fast tokenizer is not safe to use from several threads at once ("Already borrowed"): the
        # handler parses on the engine's thread and renders tool turns on the pool's.
        self._tokenizer_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(prompt_ids))),
                                                           thread_name_prefix="tool-turn")

    def close(self, cancel: bool = False) -> None:
        """Wait for the calls in flight; ``cancel``: drop the queued ones first (the rollout failed or was
        interrupted: nothing will read their results)."""
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)

    def __enter__(self) -> "ToolTurns":
        return self

    def __exit__(self, error_type, *exc) -> None:
        self.close(cancel=error_type is not None)

    def _parse(self, row: int, completion_ids: Sequence[int], start: int, end: int) -> dict:
        prefix = self.prompt_ids[row] + list(completion_ids[:start])
        with self._tokenizer_lock:
            return parse_turn(self.tokenizer, self.template, completion_ids[start:end], prefix, self.tools[row])

    def turn_ended(self, row: int, completion_ids: Sequence[int]):
        turns = self.turns[row]
        start = turns[-1].end + turns[-1].appended if turns else 0
        message = self._parse(row, completion_ids, start, len(completion_ids))
        turn = _Turn(start, len(completion_ids), message, [])
        turns.append(turn)
        calls = message.get("tool_calls")
        done = sum(1 for earlier in turns[:-1] if earlier.tool_messages)
        if not calls or (self.max_iterations is not None and done >= self.max_iterations):
            return None
        return self._pool.submit(self._run_turn, row, turn, calls)

    def _run_turn(self, row: int, turn: _Turn, calls: list[dict]) -> list[int]:
        by_name = {getattr(tool, "__name__", None): tool for tool in self.tools[row]}
        failures = 0
        for call in calls:
            function = call["function"]
            name = function["name"]
            try:
                if call.get("type", "function") != "function":
                    raise ValueError(f"Unsupported tool call type: {call.get('type')}")
                if name not in by_name:
                    raise ValueError(f"Tool {name} not found.")
                result = call_with_timeout(by_name[name], dict(function.get("arguments") or {}), self.timeout)
            except Exception as error:  # the model reads what went wrong; the run goes on
                if isinstance(error, TimeoutError):
                    with self._lock:
                        self.timed_out.add(row)
                failures += 1
                result = {"error": str(error) or type(error).__name__}
            turn.tool_messages.append({"role": "tool", "name": name,
                                       "content": result if isinstance(result, list) else str(result)})
        with self._lock:
            self.tool_call_count += len(calls)
            self.tool_failure_count += failures
        with self._tokenizer_lock:
            suffix = tool_suffix_ids(self.tokenizer, turn.tool_messages)
        if self.max_completion_length is not None and turn.end + len(suffix) > self.max_completion_length:
            # TRL's rule: a result that would not fit is dropped (the calls ran and count) and the completion
            # ends on the model's turn; the engine finishes the row on an empty result
            turn.tool_messages.clear()
            return []
        turn.appended = len(suffix)
        return suffix

    def messages(self, row: int, completion_ids: Sequence[int]) -> list[dict]:
        """The row's final completion as messages: each turn and its tool messages, and the turn after the last
        tool results (the completion may have been cut: a tool turn cut short is left out, as TRL drops a tool
        result that does not fit)."""
        out: list[dict] = []
        position = 0
        for turn in self.turns[row]:
            if turn.end > len(completion_ids):
                break
            out.append(turn.message)
            position = turn.end
            if turn.end + turn.appended > len(completion_ids):  # cut inside the tool turn: the row ends here
                return out
            out.extend(turn.tool_messages)
            position = turn.end + turn.appended
        if position < len(completion_ids):  # the last turn, cut at the length limit or a stop string
            out.append(self._parse(row, completion_ids, position, len(completion_ids)))
        return out


# --------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------


@dataclass
class AgentRollouts:
    """The resolved ``tools`` / ``environment`` / ``max_tool_calling_iterations`` / ``tool_timeout`` keys, and
    the environment instances (pooled: constructed once, reset for each rollout, as TRL does)."""

    tools: list[Callable]
    factories: dict[str | None, Callable] | None
    max_iterations: int | None = None
    timeout: float | None = 60.0
    _pool: dict[str | None, list[Any]] = dataclasses.field(default_factory=dict)
    _types: dict[str | None, type] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config) -> "AgentRollouts | None":
        from .config import uses_tools

        if not uses_tools(config):
            return None
        agent = cls(load_tools(config.tools or []), load_environments(config.environment),
                    config.max_tool_calling_iterations, config.tool_timeout)
        for name, factory in (agent.factories or {}).items():  # one probe instance each, kept in the pool
            key = "environment" if name is None else f"environment[{name!r}]"
            instance = factory()
            if not callable(getattr(type(instance), "reset", None)):
                raise ValueError(f"{key}: expected an environment class with a reset() method, received "
                                 f"{type(instance).__name__}")
            for method in environment_tools(instance):
                check_tool(method, f"{key} method {method.__name__}")
            agent._pool[name] = [instance]
            agent._types[name] = type(instance)
        return agent

    @property
    def multi(self) -> bool:
        return self.factories is not None and None not in self.factories

    def reward_functions(self) -> list[Callable]:
        """One reward per environment class with ``get_reward`` (named after the class, weight 1, as TRL)."""
        seen, rewards = [], []
        for environment_type in self._types.values():
            if callable(getattr(environment_type, "get_reward", None)) and environment_type not in seen:
                seen.append(environment_type)
                rewards.append(_wrap_environment_reward(environment_type, run_awaitable))
        return rewards

    def tools_by_name(self) -> dict[str, Callable]:
        """Every tool a row may get: the plain tools and each environment's methods."""
        tools = {tool.__name__: tool for tool in self.tools}
        for instances in self._pool.values():
            tools.update({method.__name__: method for method in environment_tools(instances[0])})
        return tools

    def longest_prompt(self, rows: Sequence[dict], tokenizer, prompt_column: str) -> int:
        """Tokens of the longest chat prompt rendered with every tool's schema (before a reset adds to it)."""
        tools = list(self.tools_by_name().values()) or None
        return max((len(_render(tokenizer, row[prompt_column], tools=tools, add_generation_prompt=True))
                    for row in rows if not isinstance(row[prompt_column], str)), default=1)

    def environments_for(self, rows: Sequence[dict]) -> list[Any] | None:
        """One instance per rollout row (``environment`` column picks the class with a mapping)."""
        if self.factories is None:
            return None
        handed: dict[str | None, int] = {}
        instances = []
        for index, row in enumerate(rows):
            name = row.get("environment") if self.multi else None
            if name not in self.factories:
                raise ValueError(f"environment: expected each row's 'environment' column to be one of "
                                 f"{sorted(self.factories)}, received {name!r} in row {index}")
            pool = self._pool[name]
            count = handed.get(name, 0)
            if count == len(pool):
                pool.append(self.factories[name]())
            handed[name] = count + 1
            instances.append(pool[count])
        return instances

    def retire(self, instances: Sequence[Any]) -> None:
        """Replace these pooled instances with new ones: a call of theirs timed out and may still be running
        (a thread cannot be stopped), so a later rollout must not reset and reuse them."""
        for name, pool in self._pool.items():
            for index, instance in enumerate(pool):
                if any(instance is retired for retired in instances):
                    pool[index] = self.factories[name]()

    def start(self, rows: Sequence[dict], prompt_column: str) -> tuple[list[Any], list[list[Callable]], list[Any] | None]:
        """Per rollout row: its prompt (after its environment's reset), its tools, its environment."""
        environments = self.environments_for(rows)
        prompts, tools = [], []
        for index, row in enumerate(rows):
            prompt = row[prompt_column]
            row_tools = list(self.tools)
            if environments is not None:
                environment = environments[index]
                row_tools += environment_tools(environment)
                arguments = {key: value for key, value in row.items() if key != "environment"} if self.multi else row
                observation = environment.reset(**arguments)
                if observation is not None:
                    if isinstance(prompt, str):
                        raise ValueError(f"prompt_column: expected chat messages with an environment whose reset() "
                                         f"returns text to add to the last message, received a string prompt in row {index}")
                    prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
            if isinstance(prompt, str):
                raise ValueError(f"prompt_column: expected chat messages (rendered with the tools' schemas) with "
                                 f"tools, received a string prompt in row {index}: {prompt[:60]!r}")
            prompts.append(prompt)
            tools.append(row_tools)
        return prompts, tools, environments

    def rollout(self, model, tokenizer, rows: Sequence[dict], params, generate, *, prompt_column: str,
                mask_truncated: bool):
        """One step's rollout: ``params.num_generations`` rows per dataset row, each with its environment, its
        turns and its tool results; returns (Rollout with ``tool_mask``, the engine's output: its log-probs and
        truncation records)."""
        from .rollout import build_rollout, pad

        if not hasattr(generate, "generate"):
            raise ValueError(f"rollout_engine: expected the rollout engine (tools run between its turns), received "
                             f"a sampler without turns ({type(generate).__name__})")
        group = params.num_generations
        expanded = [dict(row) for row in rows for _ in range(group)]
        prompts, tools, environments = self.start(expanded, prompt_column)
        prompt_ids = [_render(tokenizer, prompt, tools=row_tools or None, add_generation_prompt=True)
                      for prompt, row_tools in zip(prompts, tools)]
        # A prompt slot is shared by a group's rows only when their resets left one prompt
        shared = all(prompt_ids[index] == prompt_ids[index - index % group] for index in range(len(prompt_ids)))
        engine_prompts = prompt_ids[::group] if shared else prompt_ids
        engine_params = params if shared else dataclasses.replace(params, num_generations=1)
        with ToolTurns(tokenizer, prompt_ids, tools, max_iterations=self.max_iterations, timeout=self.timeout,
                       max_completion_length=params.max_completion_length) as turns:
            output = generate.generate(model, engine_prompts, engine_params, turns=turns)
        if environments is not None and turns.timed_out:
            self.retire([environments[row] for row in turns.timed_out])
        completions = output.completion_ids
        for row, prompt in zip(expanded, prompts):
            row[prompt_column] = prompt
        rollout = build_rollout(expanded, prompt_column, prompt_ids, completions, tokenizer,
                                dataclasses.replace(params, num_generations=1), mask_truncated=mask_truncated)
        rollout.group_size = group
        rollout.completions = [turns.messages(row, ids) for row, ids in enumerate(completions)]
        tool_mask = output.tool_mask if output.tool_mask is not None else [[1] * len(ids) for ids in completions]
        rollout.tool_mask = pad(tool_mask, 1, left=False, min_length=rollout.completion_ids.shape[1])[0][
            :, : rollout.completion_ids.shape[1]]
        # a row cut inside a tool turn may end on the turn's EOS: truncated all the same (the model's turn is open)
        rollout.truncated |= torch.tensor([bool(ids) and len(ids) >= params.max_completion_length and not mask[-1]
                                           for ids, mask in zip(completions, tool_mask)], dtype=torch.bool)
        if mask_truncated:
            rollout.completion_mask[rollout.truncated] = 0
        rollout.completion_mask = rollout.completion_mask * rollout.tool_mask
        if environments is not None:
            rollout.columns["environments"] = environments
        calls = turns.tool_call_count
        rollout.tool_figures = {"tools/call_frequency": calls / len(rollout),
                                "tools/failure_frequency": turns.tool_failure_count / calls if calls else 0.0}
        return rollout, output


def model_token_lengths(rollout) -> torch.Tensor:
    """[B] completion tokens the model sampled (tool results left out, as TRL counts lengths)."""
    if getattr(rollout, "tool_mask", None) is None:
        return rollout.completion_lengths
    present = torch.arange(rollout.completion_ids.shape[1])[None, :] < rollout.completion_lengths[:, None]
    return (rollout.tool_mask.bool() & present).sum(dim=1)
