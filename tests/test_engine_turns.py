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
    seconds; rows in ``finish`` end at their first EOS (the handler returns None). ``hold``: that
    row's first tool result is given only once 3 turns of other rows have ended meanwhile (so the
    engine must decode the others while it waits), or by a timer after 20 s if they never do."""

    def __init__(self, appended, *, max_turns=MAX_TURNS, delay=lambda row: 0.0, finish=(), hold=None):
        self.appended, self.max_turns, self.delay, self.finish = list(appended), max_turns, delay, set(finish)
        self.pool = concurrent.futures.ThreadPoolExecutor(4)
        self.calls: dict[int, list[list[int]]] = {}
        self.threads = set()
        self.hold, self.held, self.others_since, self.released_by = hold, None, 0, None

    def _release(self, by):
        if self.released_by is None:
            self.released_by = by
            self.held.set_result(self.appended)

    def turn_ended(self, row, completion_ids):
        calls = self.calls.setdefault(row, [])
        calls.append(list(completion_ids))
        if self.held is not None and row != self.hold:
            self.others_since += 1
            if self.others_since == 3:
                self._release("other rows' turns")
        if row in self.finish or len(calls) > self.max_turns:
            return None
        if row == self.hold and len(calls) == 1:
            self.held = concurrent.futures.Future()
            timer = threading.Timer(20.0, self._release, ("timer",))
            timer.daemon = True
            timer.start()
            return self.held

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


def alone(model, prompt, params, appended, finishes: bool, engine=None):
    """One conversation decoded on its own with plain one-row engine calls: each turn continues the
    prompt + the completion so far; -> (completion, tool mask, the completions the handler was given)."""
    engine = engine or RolloutEngine()
    completion, mask, calls = [], [], []
    eos, max_new = set(params.eos_token_ids), params.max_completion_length
    while True:
        left = dataclasses.replace(params, num_generations=1, max_completion_length=max_new - len(completion))
        part = engine(model, [prompt + completion], left)[0]
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


def expected_rows(model, prompts, params, appended, finish, engine=None):
    conversations = {}  # a group's rows are the same conversation unless the handler finishes one
    for row in range(len(prompts) * params.num_generations):
        key = (row // params.num_generations, row in finish)
        if key not in conversations:
            conversations[key] = alone(model, prompts[key[0]], params, appended, key[1], engine)
        yield conversations[key]


def assert_logprobs_are_the_models(model, prompts, params, output, pad_id):
    """Sampled tokens: log_softmax of one forward pass over prompt + whole completion; appended: 0.0."""
    group = params.num_generations
    prompt_ids, prompt_mask = pad([p for p in prompts for _ in range(group)], pad_id, left=True)
    completion_ids, present = pad(output.completion_ids, pad_id, left=False)
    mask = torch.cat([prompt_mask, present], dim=1)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1).to(device), attention_mask=mask.to(device),
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device)).logits.float().cpu()
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
    hold = 2 if case == "one-batch-compacted" else None
    handler = ScriptedTurns(appended, delay=lambda row: 0.01 * (row % 4), finish=FINISH, hold=hold)
    output = engine.generate(model, prompts, params, turns=handler)
    if hold is not None:  # the other rows decoded on (and ended turns) while row 2 waited on its tool
        assert handler.released_by == "other rows' turns"
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


def test_sampled_turns_are_reproducible_and_their_logprobs_the_models(model, tokenizer, setting):
    """Temperature sampling with 30 EOS ids (turns end often): a seed reproduces the completions, every
    tool turn holds the appended tokens, the sampled tokens' log-probs are a full forward pass's (at
    the temperature), the appended ones' 0.0."""
    prompts, params, appended = setting
    prompts = prompts[:4]
    params = dataclasses.replace(params, top_k=0, temperature=0.9, eos_token_ids=tuple(range(30, 60)))
    outputs = [RolloutEngine(sync_every=2).generate(model, prompts, params, seed=5, turns=ScriptedTurns(appended))
               for _ in range(2)]
    assert outputs[0].completion_ids == outputs[1].completion_ids and outputs[0].logprobs == outputs[1].logprobs
    output = outputs[0]
    assert sum(mask.count(0) for mask in output.tool_mask) >= 2 * len(appended)  # several tool turns
    for ids, mask in zip(output.completion_ids, output.tool_mask):
        starts = [i for i in range(len(mask)) if mask[i] == 0 and (i == 0 or mask[i - 1] == 1)]
        for start in starts:  # each tool turn follows an EOS and is the appended tokens (the last one maybe cut)
            assert ids[start - 1] in params.eos_token_ids
            assert ids[start: start + len(appended)] == appended[: len(ids) - start]
    scaled = dataclasses.replace(params, temperature=1.0)
    logits_model = _TemperatureModel(model, params.temperature)
    assert_logprobs_are_the_models(logits_model, prompts, scaled, output, tokenizer.pad_token_id)


def test_keyed_draws_follow_the_distribution_and_depend_on_row_step_and_seed():
    """40,000 keyed exponential races over a fixed 6-token distribution (one per row): frequencies
    within 0.01 of softmax; the same key gives the same draws, another row, step or seed others."""
    from grpo_fast.engine import race_argmax
    from grpo_fast.turns import keyed_exponentials

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows, steps = torch.arange(40_000), torch.full((40_000,), 7)
    draws = race_argmax(logits.softmax(-1).repeat(40_000, 1), keyed_exponentials(3, rows, steps, 6))
    frequencies = torch.bincount(draws, minlength=6).float() / 40_000
    torch.testing.assert_close(frequencies, logits.softmax(-1), atol=0.01, rtol=0)
    one = keyed_exponentials(3, torch.tensor([5]), torch.tensor([2]), 300)
    assert torch.equal(one, keyed_exponentials(3, torch.tensor([5]), torch.tensor([2]), 300))
    for other in (keyed_exponentials(3, torch.tensor([6]), torch.tensor([2]), 300),
                  keyed_exponentials(3, torch.tensor([5]), torch.tensor([3]), 300),
                  keyed_exponentials(4, torch.tensor([5]), torch.tensor([2]), 300)):
        assert not torch.isclose(one, other).any()
    # made a few rows at a time (bounded int64 temporaries): the same draws as all rows at once
    rows, steps = torch.arange(37) * 5, torch.arange(37) % 4
    torch.testing.assert_close(keyed_exponentials(3, rows, steps, 300, chunk_bytes=8 * 300 * 4),
                               keyed_exponentials(3, rows, steps, 300), rtol=0, atol=0)


class _TemperatureModel(torch.nn.Module):
    """``model`` with its logits divided by ``temperature`` (the engine's log-probs are at the temperature)."""

    def __init__(self, model, temperature):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, **kwargs):
        output = self.model(**kwargs)
        output.logits = output.logits / self.temperature
        return output


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
    # each conversation alone, decoded eagerly (one engine: no compile per call)
    reference = list(expected_rows(model, prompts, params, appended, FINISH, RolloutEngine(cuda_graphs=False)))
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
        assert_logprobs_are_the_models(model, prompts, params, output, tokenizer.pad_token_id)


def test_truncated_sampling_records_each_model_token_with_turns(tokenizer, model, setting):
    """top-p with tool turns: every sampled token's recorded threshold and kept log-prob are those of
    one forward pass over the whole conversation (the trainer replays them); appended tokens: zeros."""
    from grpo_fast.truncation import truncation_threshold

    prompts, params, appended = setting
    params = dataclasses.replace(params, top_k=0, top_p=0.7, temperature=0.9)
    output = RolloutEngine(seed=0).generate(model, prompts, params, turns=ScriptedTurns(appended))
    assert any(0 in mask for mask in output.tool_mask)  # some rows did take a tool turn
    for row, ids in enumerate(output.completion_ids):
        prompt = prompts[row // GROUP]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1: -1].float() / 0.9
        threshold = truncation_threshold(logits, 0, 0.7, 0.0)
        kept = logits.masked_fill(logits < threshold[:, None], float("-inf")).log_softmax(-1)
        expected = kept.gather(-1, torch.tensor(ids)[:, None])[:, 0]
        sampled = torch.tensor(output.tool_mask[row], dtype=torch.bool)
        recorded_thresholds = torch.tensor(output.logit_thresholds[row])
        recorded_kept = torch.tensor(output.kept_logprobs[row])
        torch.testing.assert_close(recorded_thresholds[sampled], threshold[sampled], atol=1e-4, rtol=0)
        torch.testing.assert_close(recorded_kept[sampled], expected[sampled], atol=1e-4, rtol=0)
        assert torch.all(recorded_kept[~sampled] == 0.0) and torch.all(recorded_thresholds[~sampled] == 0.0)


def test_an_empty_tool_result_finishes_the_row_at_its_eos(tokenizer, model, setting):
    """A handler's empty result (a tool turn that would not fit, dropped as TRL does) ends the row where it is:
    the same completion as a handler that finishes it, nothing appended."""
    prompts, params, _ = setting
    empty = RolloutEngine().generate(model, prompts, params, turns=ScriptedTurns([], max_turns=5))
    finished = RolloutEngine().generate(model, prompts, params, turns=ScriptedTurns([], finish=range(64)))
    assert empty.completion_ids == finished.completion_ids
    assert all(set(mask) == {1} for mask in empty.tool_mask)
    assert any(len(ids) < params.max_completion_length and ids[-1] in params.eos_token_ids
               for ids in empty.completion_ids)  # some rows did end a turn and were offered
