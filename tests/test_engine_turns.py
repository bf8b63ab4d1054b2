"""Multi-turn rollouts in the engine (``generate(..., turns=handler)``) on a tiny model built in code:
a scripted handler appends a fixed tool turn (EOS ids inside it) after a row's EOS, from a thread
after a delay. Greedy: every row's tokens equal decoding its conversation alone (plain one-row engine
calls on prompt + completion so far + appended tokens, continued), its sampled tokens' log-probs are
the model's own forward pass's, its appended tokens' 0.0; in one batch, with slot refill and with
compaction; appended tokens count against the length limit; rows the handler finishes; tool_mask."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import pytest
import torch

from grpo_fast.engine import RolloutEngine
from grpo_fast.rollout import SamplingParams, pad
from tiny_lm import tiny_model, tiny_tokenizer

TEXTS = ["hello there", "a", "abc def ghi", "The cat", "xyz", "12345 678", "q", "GRPO rollouts"]
GROUP = 2
MAX_TURNS = 2


class ScriptedTurns:
    """After each of a row's first ``max_turns`` turns, ``appended`` from a thread after ``delay(row)``
    seconds; rows in ``finish`` end at their first EOS (the handler returns None)."""

    def __init__(self, appended, *, max_turns=MAX_TURNS, delay=lambda row: 0.0, finish=()):
        self.appended, self.max_turns, self.delay, self.finish = list(appended), max_turns, delay, set(finish)
        self.pool = concurrent.futures.ThreadPoolExecutor(4)
        self.calls: dict[int, list[list[int]]] = {}
        self.threads = set()

    def turn_ended(self, row, completion_ids):
        calls = self.calls.setdefault(row, [])
        calls.append(list(completion_ids))
        if row in self.finish or len(calls) > self.max_turns:
            return None

        def tool():
            self.threads.add(threading.get_ident())
            time.sleep(self.delay(row))
            return self.appended

        return self.pool.submit(tool)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer, hidden_size=64, seed=1).eval()


@pytest.fixture(scope="module")
def setting(tokenizer, model):
    """Prompts, greedy params whose EOS ids greedy decoding meets early and mid-way, the tool turn."""
    prompts = [tokenizer.encode(text) for text in TEXTS]
    # ids this model's greedy decoding meets at various steps, before and after the tool turn: rows
    # end 0 to 3 turns, some cut by the length limit inside a tool turn or after one
    eos_ids = (37, 54)
    params = SamplingParams(num_generations=GROUP, max_completion_length=48, eos_token_ids=eos_ids,
                            pad_token_id=tokenizer.pad_token_id, top_k=1)
    appended = tokenizer.encode("T7") + list(eos_ids) + tokenizer.encode("\nA:")  # EOS ids inside: no row ends there
    return prompts, params, appended


def alone(model, prompt, params, appended, finishes: bool):
    """One conversation decoded on its own with plain one-row engine calls: each turn continues the
    prompt + the completion so far; -> (completion, tool mask, the completions the handler was given)."""
    completion, mask, calls = [], [], []
    eos, max_new = set(params.eos_token_ids), params.max_completion_length
    while True:
        left = dataclasses.replace(params, num_generations=1, max_completion_length=max_new - len(completion))
        part = RolloutEngine()(model, [prompt + completion], left)[0]
        completion, mask = completion + part, mask + [1] * len(part)
        if len(completion) >= max_new or part[-1] not in eos:
            return completion, mask, calls
        calls.append(list(completion))
        if finishes or len(calls) > MAX_TURNS:
            return completion, mask, calls
        tool = appended[: max_new - len(completion)]
        completion, mask = completion + tool, mask + [0] * len(tool)
        if len(completion) >= max_new:
            return completion, mask, calls


def expected_rows(model, prompts, params, appended, finish):
    conversations = {}  # a group's rows are the same conversation unless the handler finishes one
    for row in range(len(prompts) * params.num_generations):
        key = (row // params.num_generations, row in finish)
        if key not in conversations:
            conversations[key] = alone(model, prompts[key[0]], params, appended, key[1])
        yield conversations[key]


def assert_logprobs_are_the_models(model, prompts, params, output, pad_id):
    """Sampled tokens: log_softmax of one forward pass over prompt + whole completion; appended: 0.0."""
    group = params.num_generations
    prompt_ids, prompt_mask = pad([p for p in prompts for _ in range(group)], pad_id, left=True)
    completion_ids, present = pad(output.completion_ids, pad_id, left=False)
    mask = torch.cat([prompt_mask, present], dim=1)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
    width = prompt_ids.shape[1]
    expected = torch.log_softmax(logits[:, width - 1:-1], -1).gather(-1, completion_ids[..., None])[..., 0]
    actual, sampled = torch.zeros_like(expected), torch.zeros_like(present, dtype=torch.bool)
    for row, (values, tool_mask) in enumerate(zip(output.logprobs, output.tool_mask)):
        assert len(values) == len(tool_mask) == len(output.completion_ids[row])
        actual[row, : len(values)] = torch.tensor(values)
        sampled[row, : len(values)] = torch.tensor(tool_mask, dtype=torch.bool)
    torch.testing.assert_close(actual[sampled], expected[sampled], atol=1e-4, rtol=1e-4)
    assert torch.all(actual[present.bool() & ~sampled] == 0.0)


FINISH = {3, 8}  # rows whose handler returns None at their first EOS


@pytest.fixture(scope="module")
def reference(model, setting):
    prompts, params, appended = setting
    rows = list(expected_rows(model, prompts, params, appended, FINISH))
    # the cases the comparison must cover: several turns, a row finished by the handler after it
    # ended a turn, one cut inside its tool turn, one cut while sampling after a tool turn
    assert any(len(calls) == MAX_TURNS + 1 for _, _, calls in rows)
    assert any(calls and row in FINISH for row, (_, _, calls) in enumerate(rows))
    assert any(len(ids) == params.max_completion_length and mask[-1] == 0 for ids, mask, _ in rows)
    assert any(len(ids) == params.max_completion_length and mask[-1] == 1 and 0 in mask for ids, mask, _ in rows)
    return rows


def _group_kv_bytes(model, prompts, params) -> int:
    config = model.config
    tokens = -(-max(map(len, prompts)) // 64) * 64 + params.num_generations * params.max_completion_length
    return config.num_hidden_layers * 2 * config.hidden_size * tokens * 4  # fp32, as many KV heads as heads


@pytest.mark.parametrize("case", ["one-batch-compacted", "sync-every-3", "slot-refill"])
def test_turns_equal_each_conversation_decoded_alone(model, tokenizer, setting, reference, case):
    prompts, params, appended = setting
    engine = {"one-batch-compacted": lambda: RolloutEngine(sync_every=1),
              "sync-every-3": lambda: RolloutEngine(sync_every=3, compact=False),
              "slot-refill": lambda: RolloutEngine(sync_every=2, max_kv_bytes=2 * _group_kv_bytes(
                  model, prompts, params) + 1)}[case]()
    handler = ScriptedTurns(appended, delay=lambda row: 0.01 * (row % 4), finish=FINISH)
    output = engine.generate(model, prompts, params, turns=handler)
    assert output.completion_ids == [ids for ids, _, _ in reference]
    assert output.tool_mask == [mask for _, mask, _ in reference]
    assert handler.calls == {row: calls for row, (_, _, calls) in enumerate(reference) if calls}
    assert threading.get_ident() not in handler.threads  # the tools ran beside the decode loop
    assert_logprobs_are_the_models(model, prompts, params, output, tokenizer.pad_token_id)
    rows = len(prompts) * GROUP
    if case == "one-batch-compacted":  # paused rows stay in the cache while finished ones leave it
        assert output.slots_per_step[0] == rows and min(output.slots_per_step) < rows, output.slots_per_step
    if case == "slot-refill":
        assert max(output.slots_per_step) == 2 * GROUP, output.slots_per_step


def test_every_row_paused_waits_for_its_tool_instead_of_decoding(model, setting):
    """One row, host checks every step: while its tool runs nothing is decoded (a decode step per
    completion token after the first, which the prefill samples), and the tokens are the reference's."""
    prompts, params, appended = setting
    params = dataclasses.replace(params, num_generations=1)
    prompt = prompts[1]
    expected, mask, calls = alone(model, prompt, params, appended, finishes=False)
    assert len(calls) >= 2
    output = RolloutEngine(sync_every=1).generate(model, [prompt], params,
                                                   turns=ScriptedTurns(appended, delay=lambda row: 0.05))
    assert output.completion_ids == [expected] and output.tool_mask == [mask]
    assert len(output.slots_per_step) == len(expected) - 1


def test_a_handler_that_finishes_every_row_gives_the_single_turn_output(model, setting, monkeypatch):
    """turns=None builds no turn state (the decode loop is today's) and has no tool_mask; a handler
    returning None at every EOS gives the same tokens and log-probs, every token the model's."""
    import grpo_fast.engine as engine_module

    prompts, params, _ = setting
    finished = RolloutEngine(sync_every=3).generate(model, prompts, params, turns=ScriptedTurns([], max_turns=0))

    def refuse(*args, **kwargs):
        raise AssertionError("turns=None built a TurnState")

    monkeypatch.setattr(engine_module, "TurnState", refuse)
    plain = RolloutEngine(sync_every=3).generate(model, prompts, params)
    assert plain.tool_mask is None
    assert finished.completion_ids == plain.completion_ids and finished.logprobs == plain.logprobs
    assert finished.tool_mask == [[1] * len(ids) for ids in plain.completion_ids]


def test_a_future_that_raises_propagates(model, setting):
    prompts, params, _ = setting

    class Broken:
        def turn_ended(self, row, completion_ids):
            future = concurrent.futures.Future()
            future.set_exception(RuntimeError("handler bug"))
            return future

    with pytest.raises(RuntimeError, match="handler bug"):
        RolloutEngine().generate(model, prompts[:2], params, turns=Broken())


def _first_stop(ids, mask, stop, tokenizer) -> int:
    """The length of ``ids`` cut right after ``stop`` in the first model turn (run of mask 1) whose text holds it."""
    turns, start = [], 0
    for index in range(1, len(ids) + 1):
        if index == len(ids) or mask[index] != mask[start]:
            if mask[start]:
                turns.append((start, index))
            start = index
    for start, end in turns:
        for cut in range(start + 1, end + 1):
            if stop in tokenizer.decode(ids[start:cut]):
                return cut
    return len(ids)


def test_stop_strings_match_model_text_only(model, tokenizer, setting, reference):
    """A stop string inside the appended tool turn stops no row; one the model writes in a later turn
    stops its row right after it."""
    prompts, params, appended = setting
    tool_stop = tokenizer.decode(appended)[1:5]
    model_texts = [tokenizer.decode([t for t, m in zip(ids, mask) if m]) for ids, mask, _ in reference]
    assert not any(tool_stop in text for text in model_texts)
    ids, mask, _ = next(row for row in reference if 0 in row[1] and row[1][-1] == 1)
    after_tool = mask.index(0) + mask[mask.index(0):].index(1)  # the first model token after a tool turn
    stop = tokenizer.decode(ids[after_tool: after_tool + 2])  # ends that turn with its EOS: no further tool turn
    assert stop.isprintable() and mask[after_tool + 1] == 1
    expected = [ids[: _first_stop(ids, mask, stop, tokenizer)] for ids, mask, _ in reference]
    assert expected != [ids for ids, _, _ in reference]
    output = RolloutEngine(sync_every=2).generate(
        model, prompts, dataclasses.replace(params, stop_strings=(tool_stop, stop)), tokenizer=tokenizer,
        turns=ScriptedTurns(appended, finish=FINISH))
    assert output.completion_ids == expected


@pytest.mark.gpu
def test_turns_under_cuda_graphs_equal_each_conversation_decoded_alone(tokenizer, setting):
    """As on CPU, with the compiled CUDA-graph decode step (and refilled slots): paused rows, forced
    tokens and resumes change no shapes, so the graphs stay; the tokens are each conversation's alone."""
    import warnings

    prompts, params, appended = setting
    model = tiny_model(tokenizer, hidden_size=64, seed=1).eval().cuda()
    reference = list(expected_rows(model, prompts, params, appended, FINISH))
    for engine in (RolloutEngine(sync_every=2), RolloutEngine(sync_every=4, max_kv_bytes=2 * _group_kv_bytes(
            model, prompts, params) + 1)):
        handler = ScriptedTurns(appended, delay=lambda row: 0.01 * (row % 4), finish=FINISH)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = engine.generate(model, prompts, params, turns=handler)
        assert not [w for w in caught if "decoding eagerly" in str(w.message)]
        assert engine.cuda_graphs and engine._compiled_step is not None
        assert output.completion_ids == [ids for ids, _, _ in reference]
        assert output.tool_mask == [mask for _, mask, _ in reference]
        assert_logprobs_are_the_models(model.cpu(), prompts, params, output, tokenizer.pad_token_id)
        model.cuda()
