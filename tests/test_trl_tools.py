"""FusedGRPOTrainer with TRL's tool calling (``tools=`` and ``environment_factory=``), end to end, offline.

TRL 1.16 renders the tools into the prompt with the tokenizer's chat template, parses each completion with
the tokenizer's ``response_template`` (transformers' response parsing), runs the calls, appends the rendered
tool results to the completion and generates again; the tool-result tokens get ``tool_mask`` 0 and are left
out of the loss. The tests' byte-level tokenizer gets a small tool-calling chat template of the usual shape
(the tools' signatures in a system turn, ``<tool_call>{json}</tool_call>`` in the assistant turn, a ``tool``
turn for each result) and the matching response template, the markers being plain text. Prompts are kept
short and ``max_completion_length`` long enough for the scripted turns: TRL drops a tool result that takes
the completion past ``max_completion_length`` or the sequence past the model's ``max_position_embeddings``.

A random tiny model would almost never write a well-formed call, so, as TRL's own tool tests do, the model's
``generate`` is replaced by a scripted one (token ids of fixed texts); everything after it (parsing, calling
the tools or the environment's methods, the follow-up generation, ``tool_mask``, rewards, metrics, the loss
and the optimiser step) is TRL's and grpo-fast's own code."""

import copy
from unittest.mock import patch

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers.utils.chat_parsing")  # response templates: transformers >= 5.13

from grpo_fast.integrations.trl import FusedGRPOTrainer  # noqa: E402
from test_trl_integration import PROMPTS, grpo_config  # noqa: E402
from test_trl_precision import BF16_ROUNDING, FP32_HEAD, _assert_within, _compare, train_and_check  # noqa: E402
from tiny_lm import tiny_model, tiny_tokenizer  # noqa: E402

TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for tool in tools %} {{ tool.function.name }}"
    "({{ tool.function.parameters.properties | join(', ') }}){% endfor %}<eos>{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}<|tool|>{{ message.content }}<eos>"
    "{% else %}<|{{ message.role }}|>{{ message.content }}"
    "{% for call in message.tool_calls or [] %}<tool_call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}<eos>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# transformers' response-template format: how to read a generated assistant turn back into a message
TOOL_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {"open": "<tool_call>", "close": "</tool_call>", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close": "<eos>", "content": "text"},
    },
}


def tool_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    return tokenizer


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


class Counter:
    """An environment: its public methods are the tools, its state gives the reward."""

    def __init__(self):
        self.total = 0

    def reset(self, **example):
        self.total = 0

    def add(self, amount: int) -> int:
        """
        Adds to the counter and returns its new value.

        Args:
            amount: How much to add.
        """
        self.total += amount
        return self.total

    def get_reward(self) -> float:
        return float(self.total)


def call(name, **arguments):
    return "<tool_call>" + '{"name": "%s", "arguments": %s}' % (name, str(arguments).replace("'", '"')) + "</tool_call>"


def scripted_generate(tokenizer, turns):
    """A stand-in for ``model.generate``: the n-th call returns the prompts followed by ``turns[n]`` (one text per
    row, token ids padded after the end of sequence); ``calls`` counts the calls."""

    def generate(input_ids, **kwargs):
        texts = turns[generate.calls]
        assert len(texts) == input_ids.size(0), (generate.calls, len(texts), input_ids.shape)
        generate.calls += 1
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        width = max(map(len, ids))
        completions = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
        return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)

    generate.calls = 0
    return generate


# One generation batch: 4 completions of one prompt. Two call the tool (the second with an argument the tool
# does not take, a failed call), two answer in text; the two with a call are continued after the tool's result.
MULTIPLY_TURNS = [
    [call("multiply", a=3, b=4) + "<eos>", call("multiply", a=3, c=4) + "<eos>", "Twelve.<eos>", "No idea<eos>"],
    ["Done!<eos>", "Done!<eos>"],
]


def tool_result_reward(prompts, completions, **columns):
    """1 for a completion that received the tool's right answer: only a call that ran gives one."""
    return [float(any(m["role"] == "tool" and m["content"] == "12" for m in c)) for c in completions]


def _conversational_dataset():
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})


def _tool_trainer(trainer_class, tmp_path, model, tokenizer, **options):
    args = grpo_config(tmp_path, **{"max_steps": 1, "bf16": True, "max_completion_length": 176, **options})
    return trainer_class(model=model, reward_funcs=[tool_result_reward], args=args, processing_class=tokenizer,
                         train_dataset=_conversational_dataset(), tools=[multiply])


def test_trains_with_tools(tmp_path):
    tokenizer = tool_tokenizer()
    trainer = _tool_trainer(FusedGRPOTrainer, tmp_path, tiny_model(tokenizer), tokenizer)
    generate = scripted_generate(tokenizer, MULTIPLY_TURNS)
    with patch.object(trainer.model, "generate", side_effect=generate):
        logs = train_and_check(trainer, ("entropy", "reward", "tools/call_frequency", "tools/failure_frequency"))
    assert generate.calls == 2  # the two completions with a call were continued after their tool result
    assert logs[0]["tools/call_frequency"] == pytest.approx(2 / 4)
    assert logs[0]["tools/failure_frequency"] == pytest.approx(1 / 2)  # the call with the wrong argument
    assert logs[0]["reward"] == pytest.approx(1 / 4)  # one completion received 3 * 4 = 12


def test_trains_with_an_environment(tmp_path):
    """environment_factory: one Counter per rollout, its method ``add`` a tool, its state the reward."""
    tokenizer = tool_tokenizer()
    turns = [[call("add", amount=2) + "<eos>", call("add", amount=5) + "<eos>", "Zero.<eos>", "None<eos>"],
             [call("add", amount=1) + "<eos>", "Done!<eos>"],  # a second call from the first rollout
             ["Done!<eos>"]]
    args = grpo_config(tmp_path, max_steps=1, bf16=True, max_completion_length=200)
    trainer = FusedGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=None, args=args, processing_class=tokenizer,
                               train_dataset=_conversational_dataset(), environment_factory=Counter)
    generate = scripted_generate(tokenizer, turns)
    with patch.object(trainer.model, "generate", side_effect=generate):
        logs = train_and_check(trainer, ("entropy", "reward", "rewards/Counter/mean", "tools/call_frequency"))
    assert generate.calls == 3
    assert logs[0]["tools/call_frequency"] == pytest.approx(3 / 4) and logs[0]["tools/failure_frequency"] == 0.0
    assert logs[0]["rewards/Counter/mean"] == pytest.approx((2 + 1 + 5 + 0 + 0) / 4)


def test_same_loss_as_trl_on_a_batch_with_tool_results(tmp_path):
    """The batch TRL builds from tool calls (tool-result tokens inside the completions, tool_mask 0 on them):
    under bf16 autocast the fused loss and gradients equal trl.GRPOTrainer's with cast_lm_head_to_fp32 to fp32
    rounding and its default within bf16 rounding, and leaving tool_mask out would change them."""
    tokenizer = tool_tokenizer()
    model = tiny_model(tokenizer, bias=True)
    trainers = [_tool_trainer(trl.GRPOTrainer, tmp_path, copy.deepcopy(model), tokenizer),
                _tool_trainer(trl.GRPOTrainer, tmp_path, copy.deepcopy(model), tokenizer, cast_lm_head_to_fp32=True),
                _tool_trainer(FusedGRPOTrainer, tmp_path, copy.deepcopy(model), tokenizer)]
    fused = trainers[2]
    fused.model.train()
    rows = [{"prompt": [{"role": "user", "content": PROMPTS[0]}]}] * 4
    with patch.object(fused.model, "generate", side_effect=scripted_generate(tokenizer, MULTIPLY_TURNS)):
        batch = fused._generate_and_score_completions(rows)

    # TRL's batch: the called tool's rendered result sits inside the completion with tool_mask 0
    tool_mask, completion_mask = batch["tool_mask"], batch["completion_mask"]
    for row, result in ((0, "12"), (1, "unexpected keyword argument 'c'")):
        masked = batch["completion_ids"][row][(tool_mask[row] == 0) & (completion_mask[row] == 1)]
        assert result in tokenizer.decode(masked) and "<|tool|>" in tokenizer.decode(masked)
    assert (tool_mask[2:] == 1).all()
    assert batch["advantages"].abs().sum() > 0

    (trl_loss, trl_grads, _), (fp32_loss, fp32_grads, _), (loss, grads, _) = _compare(trainers, batch)
    torch.testing.assert_close(loss, fp32_loss, rtol=1e-4, atol=1e-6)
    _assert_within(loss, trl_loss, BF16_ROUNDING, "loss")
    assert grads.keys() == fp32_grads.keys() and "lm_head.weight" in grads
    for name in grads:
        _assert_within(grads[name], fp32_grads[name], FP32_HEAD, name)
        _assert_within(grads[name], trl_grads[name], BF16_ROUNDING, name)
    without_mask = _compare(trainers[2:], {k: v for k, v in batch.items() if k != "tool_mask"})[0][1]
    assert (without_mask["lm_head.weight"] - grads["lm_head.weight"]).abs().max() > 1e-3 * grads[
        "lm_head.weight"].abs().max()
