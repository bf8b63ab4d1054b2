"""ToolTurns, the engine's turn handler: parsing a turn, running its calls, their failures, the rendered suffix.

The tokenizer is the byte-level test tokenizer with a Hermes-style tool-calling chat template and no
``response_template``: the built-in one is derived from the chat template."""

import asyncio
import threading

import pytest

pytest.importorskip("transformers.utils.chat_parsing")

from grpo_fast.agent import ToolTurns, response_template  # noqa: E402
from test_trl_tools import TOOL_CHAT_TEMPLATE, call, multiply  # noqa: E402
from tiny_lm import tiny_tokenizer  # noqa: E402


def hermes_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    return tokenizer


PROMPT = [{"role": "user", "content": "3 x 4?"}]


def _turns(tools, **options):
    tokenizer = hermes_tokenizer()
    prompt_ids = tokenizer.apply_chat_template(PROMPT, tools=tools, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    return tokenizer, ToolTurns(tokenizer, [prompt_ids], [tools], **options), prompt_ids


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _end_turn(tokenizer, turns, completion, text, row=0):
    """Append the model's turn ``text`` to ``completion`` and end it; returns the appended ids (or None)."""
    completion += _ids(tokenizer, text)
    future = turns.turn_ended(row, list(completion))
    if future is None:
        return None
    appended = future.result(timeout=30)
    completion += appended
    return appended


def test_builtin_template_reads_hermes_calls():
    tokenizer = hermes_tokenizer()
    template = response_template(tokenizer)
    assert template["start_anchor"] == "<|assistant|>"
    message = tokenizer.parse_response(_ids(tokenizer, "Sure." + call("multiply", a=3, b=4) + "<eos>"), template,
                                       prefix=_ids(tokenizer, "<|user|>hi<|assistant|>"), tools=[multiply])
    assert message["tool_calls"] == [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}]
    assert message["content"] == "Sure."


def test_a_template_without_hermes_calls_is_refused():
    tokenizer = tiny_tokenizer()  # its template drops tool calls
    with pytest.raises(ValueError, match="tools: expected a tokenizer with a response_template"):
        response_template(tokenizer)


def test_a_call_runs_and_its_result_is_the_chat_templates_tool_turn():
    tokenizer, turns, prompt_ids = _turns([multiply])
    completion = []
    appended = _end_turn(tokenizer, turns, completion, call("multiply", a=3, b=4) + "<eos>")
    assert tokenizer.decode(appended) == "<|tool|>12<eos><|assistant|>"
    assert _end_turn(tokenizer, turns, completion, "Twelve.<eos>") is None  # no call: the row is finished
    messages = turns.messages(0, completion)
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    assert messages[1] == {"role": "tool", "name": "multiply", "content": "12"} and messages[2]["content"] == "Twelve."
    # the whole row is what the chat template renders for the conversation
    rendered = tokenizer.apply_chat_template(PROMPT + messages, tools=[multiply], tokenize=True, return_dict=False)
    assert rendered == prompt_ids + completion
    assert (turns.tool_call_count, turns.tool_failure_count) == (1, 0)


def test_several_calls_in_one_turn_run_in_order():
    log = []

    def note(text: str) -> str:
        """
        Writes a note.

        Args:
            text: The note.
        """
        log.append(text)
        return str(len(log))

    tokenizer, turns, _ = _turns([note])
    appended = _end_turn(tokenizer, turns, [], call("note", text="a") + call("note", text="b") + "<eos>")
    assert log == ["a", "b"] and tokenizer.decode(appended) == "<|tool|>1<eos><|tool|>2<eos><|assistant|>"


def boom(x: int) -> int:
    """
    Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("the tool broke")


@pytest.mark.parametrize("text, error", [
    (call("boom", x=1), "the tool broke"),
    (call("nowhere", x=1), "Tool nowhere not found."),
    (call("multiply", a=3, c=4), "unexpected keyword argument 'c'"),
])
def test_a_failing_call_returns_its_error_to_the_model(text, error):
    tokenizer, turns, _ = _turns([multiply, boom])
    completion = []
    appended = _end_turn(tokenizer, turns, completion, text + "<eos>")
    assert "{'error': " in tokenizer.decode(appended) and error in tokenizer.decode(appended)
    assert (turns.tool_call_count, turns.tool_failure_count) == (1, 1)
    assert turns.messages(0, completion)[1]["content"].startswith("{'error': ")


def test_a_call_past_the_timeout_is_a_failure_and_does_not_hold_the_row():
    released = threading.Event()

    def wait() -> str:
        """
        Waits until the test ends.
        """
        released.wait(60)
        return "late"

    tokenizer, turns, _ = _turns([wait], timeout=0.2)
    try:
        appended = _end_turn(tokenizer, turns, [], call("wait") + "<eos>")
        assert "timed out after 0.2 s" in tokenizer.decode(appended) and not released.is_set()
        assert turns.tool_failure_count == 1 and turns.timed_out == {0}  # its environment gets retired
    finally:
        released.set()


def test_an_interrupted_rollout_drops_the_queued_calls():
    """A rollout that fails (an exception through the handler's context) does not run the calls still
    queued: only those already running finish."""
    ran, started, gate = [], threading.Event(), threading.Event()

    def slow() -> str:
        """
        Takes a while.
        """
        ran.append(1)
        started.set()
        gate.wait(10)
        return "done"

    tokenizer = hermes_tokenizer()
    prompt_ids = tokenizer.apply_chat_template(PROMPT, tools=[slow], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    completion = _ids(tokenizer, call("slow") + "<eos>")
    with pytest.raises(KeyboardInterrupt):
        with ToolTurns(tokenizer, [prompt_ids] * 4, [[slow]] * 4, max_workers=1) as turns:
            futures = [turns.turn_ended(row, list(completion)) for row in range(4)]
            assert started.wait(10)  # the first call runs; the other three wait in the queue
            threading.Timer(0.3, gate.set).start()
            raise KeyboardInterrupt
    assert len(ran) == 1 and sum(future.cancelled() for future in futures) == 3


async def add(a: int, b: int) -> int:
    """
    Adds two integers.

    Args:
        a: The first.
        b: The second.
    """
    await asyncio.sleep(0)
    return a + b


def test_an_async_tool_is_awaited():
    tokenizer, turns, _ = _turns([add])
    appended = _end_turn(tokenizer, turns, [], call("add", a=2, b=5) + "<eos>")
    assert tokenizer.decode(appended) == "<|tool|>7<eos><|assistant|>"
    assert turns.tool_failure_count == 0


def test_max_iterations_caps_the_tool_turns():
    tokenizer, turns, _ = _turns([multiply], max_iterations=1)
    completion = []
    assert _end_turn(tokenizer, turns, completion, call("multiply", a=1, b=2) + "<eos>") is not None
    assert _end_turn(tokenizer, turns, completion, call("multiply", a=2, b=2) + "<eos>") is None
    assert turns.tool_call_count == 1
    # the last turn keeps its (unrun) call, as TRL's completions do
    assert turns.messages(0, completion)[-1]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 2}
    _, no_turns, _ = _turns([multiply], max_iterations=0)
    assert no_turns.turn_ended(0, _ids(tokenizer, call("multiply", a=1, b=2) + "<eos>")) is None


def test_a_malformed_call_is_text():
    tokenizer, turns, _ = _turns([multiply])
    completion = []
    assert _end_turn(tokenizer, turns, completion, '<tool_call>{"name": "multiply", </tool_call><eos>') is None
    assert turns.tool_call_count == 0 and "tool_calls" not in turns.messages(0, completion)[0]


def test_a_cut_tool_turn_is_left_out_of_the_messages():
    tokenizer, turns, _ = _turns([multiply])
    completion = []
    _end_turn(tokenizer, turns, completion, call("multiply", a=3, b=4) + "<eos>")
    first_turn = len(_ids(tokenizer, call("multiply", a=3, b=4) + "<eos>"))
    messages = turns.messages(0, completion[: first_turn + 2])  # the engine cut the row inside the tool turn
    assert [m["role"] for m in messages] == ["assistant"] and messages[0]["tool_calls"]


def test_a_tool_result_that_does_not_fit_is_dropped():
    """TRL's rule: a tool turn that would pass max_completion_length is dropped (its calls ran and count),
    the handler's result is empty (the engine ends the row on the model's EOS) and no tool message shows."""
    turn_text = call("multiply", a=3, b=4) + "<eos>"
    tokenizer, fits, _ = _turns([multiply])
    appended = _end_turn(tokenizer, fits, [], turn_text)
    room = len(_ids(tokenizer, turn_text)) + len(appended)  # exactly enough for the turn and its tool result
    tokenizer, exact, _ = _turns([multiply], max_completion_length=room)
    assert _end_turn(tokenizer, exact, [], turn_text) == appended  # fits: kept
    tokenizer, short, _ = _turns([multiply], max_completion_length=room - 1)
    completion = []
    assert _end_turn(tokenizer, short, completion, turn_text) == []
    assert short.tool_call_count == 1 and short.tool_failure_count == 0
    messages = short.messages(0, completion)
    assert [m["role"] for m in messages] == ["assistant"] and messages[0]["tool_calls"]


def test_rows_keep_their_own_tools():
    tokenizer = hermes_tokenizer()
    prompt_ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    turns = ToolTurns(tokenizer, [prompt_ids, prompt_ids], [[multiply], [add]])
    assert "12" in tokenizer.decode(_end_turn(tokenizer, turns, [], call("multiply", a=3, b=4) + "<eos>", row=0))
    assert "not found" in tokenizer.decode(_end_turn(tokenizer, turns, [], call("multiply", a=3, b=4) + "<eos>", row=1))


def test_qwen2_5s_own_chat_template_with_the_builtin_response_template():
    """Qwen2.5's chat template (the copy TRL ships): calls parse, the tool turn is Qwen's <tool_response> user turn."""
    trl = pytest.importorskip("trl")
    from pathlib import Path

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    assert response_template(tokenizer)["start_anchor"] == "<|im_start|>assistant\n"
    prompt_ids = tokenizer.apply_chat_template(PROMPT, tools=[multiply], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    turns = ToolTurns(tokenizer, [prompt_ids], [[multiply]])
    completion = []
    appended = _end_turn(tokenizer, turns, completion,
                         '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>')
    assert tokenizer.decode(appended) == ("\n<|im_start|>user\n<tool_response>\n12\n</tool_response><|im_end|>\n"
                                          "<|im_start|>assistant\n")
    assert _end_turn(tokenizer, turns, completion, "Twelve.<|im_end|>") is None
    rendered = tokenizer.apply_chat_template(PROMPT + turns.messages(0, completion), tools=[multiply], tokenize=True,
                                             return_dict=False)
    assert rendered[: len(prompt_ids) + len(completion)] == prompt_ids + completion  # then the template's "\n"
