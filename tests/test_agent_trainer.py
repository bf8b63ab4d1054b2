"""The trainer with tools and environments: rollouts through the engine's turns, tool tokens out of the loss,
log-probs after a tool turn, the config keys, and one environment class run by TRL's trainer and by grpo-fast's.

Until the rollout engine takes ``turns=``, the multi-turn contract runs on ``agent_engine.EagerTurnsEngine``
(full forwards, no cache); with it, the same tests run on ``RolloutEngine`` too."""

import dataclasses
import inspect

import pytest
import torch

pytest.importorskip("transformers.utils.chat_parsing")

from agent_engine import EagerTurnsEngine  # noqa: E402
from grpo_fast.agent import AgentRollouts  # noqa: E402
from grpo_fast.config import GRPOConfig  # noqa: E402
from grpo_fast.engine import RolloutEngine  # noqa: E402
from grpo_fast.loss import GRPOLossConfig, grpo_loss  # noqa: E402
from grpo_fast.model import build_tiny_model, completion_hidden_states, output_weight, tiny_tokenizer  # noqa: E402
from grpo_fast.tasks import ALPHABET, SEPARATOR, vault_dataset  # noqa: E402
from grpo_fast.trainer import batch_logprobs, generate_rollout, sampler_inputs  # noqa: E402

ENGINE_TAKES_TURNS = "turns" in inspect.signature(RolloutEngine.generate).parameters
ENGINES = [pytest.param(lambda: EagerTurnsEngine(seed=3), id="eager-reference"),
           pytest.param(lambda: RolloutEngine(cuda_graphs=False), id="rollout-engine",
                        marks=pytest.mark.skipif(not ENGINE_TAKES_TURNS, reason="RolloutEngine.generate takes no turns yet"))]
VAULT = dict(dataset="grpo_fast.tasks:vault_dataset", reward_functions=["grpo_fast.tasks:vault_reward"],
             environment="grpo_fast.tasks:Vault", prompts_per_step=4, num_generations=4, max_completion_length=20)


def _setup(**options):
    config = GRPOConfig(**{**VAULT, **options})
    tokenizer = tiny_tokenizer(ALPHABET + SEPARATOR, tool_names=["open_vault"])
    model = build_tiny_model(tokenizer, seed=1)
    return config, tokenizer, model, AgentRollouts.from_config(config)


def _rollout_with_tool_turns(engine, **options):
    config, tokenizer, model, agent = _setup(**options)
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, vault_dataset(4), config, engine, agent)
    assert (rollout.tool_mask == 0).any(), "no row called the tool: pick another seed"
    return config, tokenizer, model, rollout


@pytest.mark.parametrize("make_engine", ENGINES)
def test_logprobs_after_a_tool_turn_equal_one_forward_over_the_conversation(make_engine):
    config, tokenizer, model, rollout = _rollout_with_tool_turns(make_engine(), num_iterations=2)
    logps = batch_logprobs(model, rollout, config, torch.device("cpu"))
    after_tool = 0
    for row in range(len(rollout)):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        completion = rollout.completion_token_ids[row]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].float()
        expected = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        model_tokens = rollout.tool_mask[row, : len(completion)].bool()
        torch.testing.assert_close(logps[row, : len(completion)][model_tokens], expected[model_tokens],
                                   rtol=1e-5, atol=1e-5)
        first_tool = (~model_tokens).nonzero()
        if len(first_tool):
            after_tool += int(model_tokens[int(first_tool[0]):].sum())
    assert after_tool > 0  # model tokens sampled after a tool turn were compared


@pytest.mark.parametrize("make_engine", ENGINES)
def test_rollout_rows_are_the_rendered_conversations(make_engine):
    """Tool tokens are exactly the tool turns and next headers the chat template renders for the row's tool
    messages; a row whose model text is plain (no role markers the random model may write, which parsing
    does not give back verbatim) is what the chat template renders for its whole conversation."""
    config, tokenizer, model, rollout = _rollout_with_tool_turns(make_engine(), max_completion_length=48)
    markers = set(tokenizer.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]))
    tool_turns = 0
    for row in range(len(rollout)):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        completion = rollout.completion_token_ids[row]
        messages = rollout.completions[row]
        keep = rollout.tool_mask[row, : len(completion)].tolist()
        tool_tokens = [token for token, model_token in zip(completion, keep) if not model_token]
        expected = "".join(f"<|tool|>{m['content']}<eos>" + ("<|assistant|>" if i + 1 == len(messages) or
                                                             messages[i + 1]["role"] != "tool" else "")
                           for i, m in enumerate(messages) if m["role"] == "tool")
        if not rollout.truncated[row]:
            assert tokenizer.decode(tool_tokens) == expected
        tool_turns += sum(m["role"] == "tool" for m in messages)
        plain = not any(token in markers for token, model_token in zip(completion, keep) if model_token)
        if plain and not rollout.truncated[row]:
            rendered = tokenizer.apply_chat_template(rollout.prompts[row] + messages, tokenize=True, return_dict=False)
            assert rendered == prompt + completion
    assert tool_turns > 0
    assert rollout.tool_figures["tools/call_frequency"] > 0


def test_tool_tokens_are_out_of_the_loss_the_kl_and_every_ratio():
    config, tokenizer, model, rollout = _rollout_with_tool_turns(EagerTurnsEngine(seed=3))
    tool = (rollout.tool_mask == 0) & (rollout.completion_lengths[:, None] > torch.arange(rollout.completion_ids.shape[1]))
    assert not rollout.completion_mask[tool].any() and rollout.completion_mask[rollout.tool_mask.bool() & ~tool].any()
    weight, _ = output_weight(model)
    width = rollout.completion_ids.shape[1]
    hidden = completion_hidden_states(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1])
    hidden = hidden.detach().requires_grad_()
    generator = torch.Generator().manual_seed(0)
    old, ref, sampler = (-torch.rand(len(rollout), width, generator=generator) for _ in range(3))
    advantages = torch.randn(len(rollout), generator=generator)

    def loss(old, ref, sampler, level):
        settings = GRPOLossConfig(beta=0.1, importance_sampling_level=level, loss_type="grpo")
        hidden.grad = None
        ratio, _ = sampler_inputs(dataclasses.replace(rollout, sampling_logps=sampler), old,
                                  dataclasses.replace(config, importance_sampling_correction="sequence_truncate"))
        out = grpo_loss(hidden, weight, rollout.completion_ids, rollout.completion_mask, advantages=advantages,
                        old_logps=old, ref_logps=ref, sampling_logps=sampler, importance_sampling_ratio=ratio,
                        config=settings, backend="torch")
        out.loss.backward()
        return out.loss.detach(), hidden.grad.clone()

    noise = torch.where(tool, torch.randn(len(rollout), width, generator=generator) * 3, torch.zeros(()))
    for level in ("token", "sequence"):
        value, grad = loss(old, ref, sampler, level)
        moved, moved_grad = loss(old + noise, ref + noise, sampler - noise, level)
        torch.testing.assert_close(moved, value)  # tool positions' old / ref / sampler log-probs do not count
        torch.testing.assert_close(moved_grad, grad)
        assert grad[tool].abs().max() == 0 and grad[~tool & rollout.completion_mask.bool()].abs().max() > 0


class Greeter:
    """An environment whose reset() adds a per-rollout line to the prompt."""

    count = 0

    def reset(self, **row):
        Greeter.count += 1
        return ALPHABET[Greeter.count % len(ALPHABET)]  # letters: the tiny tokenizer's vocabulary

    def wave(self) -> str:
        """
        Waves back.
        """
        return "hi"


def test_resets_that_differ_within_a_group_give_each_row_its_own_prompt(monkeypatch):
    config, tokenizer, model, _ = _setup()
    config = dataclasses.replace(config, environment=f"{__name__}:Greeter")
    agent = AgentRollouts.from_config(config)
    engine = EagerTurnsEngine(seed=0)
    seen = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda model, prompts, params, **kw: seen.append((prompts, params)) or
                        generate(model, prompts, params, **kw))
    rows = [{"prompt": [{"role": "user", "content": "a"}]}] * 2
    rollout = generate_rollout(model, tokenizer, rows, config, engine, agent)
    prompts, params = seen[0]
    assert params.num_generations == 1 and len(prompts) == 8 and len({tuple(p) for p in prompts}) == 8
    assert [p[-1]["content"] for p in rollout.prompts] == ["a" + ALPHABET[(Greeter.count + 1 + i) % 8] for i in range(8)]
    assert rollout.group_size == 4 and len(rollout) == 8


@pytest.mark.parametrize("options, message", [
    (dict(rollout_engine="hf"), "rollout_engine: expected auto or engine with tools"),
    (dict(environment={}), "environment: expected a 'module:Class' path or a non-empty mapping"),
    (dict(environment={"": "m:A"}), "environment: expected str or dict\\[str, str\\]"),
    (dict(environment=["m:A"]), "environment: expected str or dict"),
    (dict(max_tool_calling_iterations=-1), "max_tool_calling_iterations: expected an integer >= 0"),
    (dict(tool_timeout=0.0), "tool_timeout: expected a positive number"),
    (dict(eval_every=5, eval_dataset="x.jsonl"), "eval_every: expected 0 with tools"),
])
def test_config_errors_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{**VAULT, **options})


@pytest.mark.parametrize("options, message", [
    (dict(environment="grpo_fast.tasks:Nowhere"), "environment: module 'grpo_fast.tasks' has no attribute 'Nowhere'"),
    (dict(environment={"vault": "no_such_module:Vault"}), "environment\\['vault'\\]: cannot import module"),
    (dict(tools=["grpo_fast.tasks:ALPHABET"]), "tools\\[0\\]: expected a function"),
    (dict(tools=["grpo_fast.tasks:letters_prompt"]), "tools\\[0\\]: expected a tool with a type-hinted signature"),
])
def test_import_errors_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        AgentRollouts.from_config(GRPOConfig(**{**VAULT, **options}))


def test_a_mapping_routes_rows_by_their_environment_column():
    config = GRPOConfig(**{**VAULT, "environment": {"vault": "grpo_fast.tasks:Vault", "greeter": f"{__name__}:Greeter"}})
    agent = AgentRollouts.from_config(config)
    rows = [{"prompt": [{"role": "user", "content": ":"}], "letters": "abc", "environment": name}
            for name in ("vault", "greeter", "vault")]
    prompts, tools, environments = agent.start(rows, "prompt")
    assert [type(e).__name__ for e in environments] == ["Vault", "Greeter", "Vault"]
    assert environments[0] is not environments[2] and environments[0].letters == "abc"
    assert [[t.__name__ for t in row] for row in tools] == [["open_vault"], ["wave"], ["open_vault"]]
    with pytest.raises(ValueError, match="environment: expected each row's 'environment' column to be one of"):
        agent.start([{**rows[0], "environment": "elsewhere"}], "prompt")
    assert [f.__name__ for f in agent.reward_functions()] == []  # neither class has get_reward


# ---- one environment class, two trainers --------------------------------------------------------------


class Tally:
    """Counts its tool's calls; its reward is whether it was called (TRL's get_reward)."""

    def reset(self, **row):
        self.calls = 0

    def tally(self) -> str:
        """
        Counts a call and returns the count so far.
        """
        self.calls += 1
        return "a" * self.calls

    def get_reward(self) -> float:
        return float(self.calls > 0)


def ping() -> str:
    """
    Answers a ping.
    """
    return "b"


SEEN = []


def conversation_reward(prompts, completions, environments, **columns):
    """The number of tool results in each completion (TRL's message lists); what it receives is kept."""
    SEEN.append((completions, environments))
    return [float(sum(message["role"] == "tool" for message in completion)) for completion in completions]


def _tool_results_match(completions, environments):
    """Every tool message holds its tool's answer, from its rollout's own Tally."""
    for messages, environment in zip(completions, environments):
        tallies = [m["content"] for m in messages if m["role"] == "tool" and m["name"] == "tally"]
        assert tallies == ["a" * (count + 1) for count in range(len(tallies))]
        assert environment.calls >= len(tallies)  # a tool turn cut at the length limit ran but is not shown
        assert all(m["content"] == "b" for m in messages if m["role"] == "tool" and m["name"] == "ping")
        assert all(m["role"] in ("assistant", "tool") for m in messages) and messages[0]["role"] == "assistant"
    return sum(m["role"] == "tool" for messages in completions for m in messages)


def test_one_environment_class_trains_in_trl_and_in_grpo_fast(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from grpo_fast.agent import response_template
    from grpo_fast.trainer import train
    from test_trl_integration import grpo_config

    tokenizer = tiny_tokenizer(ALPHABET + SEPARATOR, tool_names=["tally", "ping"])
    tokenizer.response_template = response_template(tokenizer)  # TRL reads it from the tokenizer
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in ("ab", "cd")]

    SEEN.clear()
    args = grpo_config(tmp_path / "trl", max_steps=1, max_completion_length=16, num_generations=4,
                       per_device_train_batch_size=4)
    trainer = trl.GRPOTrainer(model=build_tiny_model(tokenizer, seed=2), reward_funcs=[conversation_reward], args=args,
                              processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows),
                              tools=[ping], environment_factory=Tally)
    trainer.train()
    trl_logs = [entry for entry in trainer.state.log_history if "tools/call_frequency" in entry]
    trl_completions, trl_environments = SEEN[0]

    SEEN.clear()
    config = GRPOConfig(environment=f"{__name__}:Tally", tools=[f"{__name__}:ping"],
                        reward_functions=[f"{__name__}:conversation_reward"], max_steps=1, prompts_per_step=2,
                        num_generations=4, max_completion_length=16, output_dir=str(tmp_path / "grpo-fast"),
                        progress_bar=False, plot=False, sample_every=0)
    result = train(config, model=build_tiny_model(tokenizer, seed=2), tokenizer=tokenizer, dataset=rows)  # the engine
    record = result.history[0]
    completions, environments = SEEN[0]

    # the same keys and the same shapes of what the rewards receive, from the same class and function
    assert trl_logs and trl_logs[0]["tools/call_frequency"] > 0 and "rewards/Tally/mean" in trl_logs[0]
    assert record["tools/call_frequency"] > 0 and "reward/Tally/mean" in record
    assert _tool_results_match(trl_completions, trl_environments) > 0
    assert _tool_results_match(completions, environments) > 0
    assert all(type(environment) is Tally for environment in environments) and len(set(map(id, environments))) == 8
    # get_reward is the rollout's environment's own
    assert record["reward/Tally/mean"] == pytest.approx(sum(e.calls > 0 for e in environments) / 8)


@pytest.mark.parametrize("options, message", [
    (dict(tools=["calculator"]), "tools\\[0\\]: expected an import path 'module:name', received 'calculator'"),
    (dict(environment="my_env.Counter"), "environment: expected an import path 'module:name'"),
    (dict(environment={"a": "my_env"}), "environment\\['a'\\]: expected an import path 'module:name'"),
])
def test_paths_are_checked_before_anything_loads(options, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{**VAULT, **options})


class AsyncJudge:
    """An environment whose reward is async (e.g. a judge behind an API)."""

    def reset(self, **row):
        self.score = len(row["prompt"][-1]["content"])

    async def get_reward(self) -> float:
        return float(self.score)


def test_environment_rewards_are_named_after_their_class_and_score_only_their_rollouts():
    config = GRPOConfig(**{**VAULT, "reward_functions": [],
                           "environment": {"judge": f"{__name__}:AsyncJudge", "vault": "grpo_fast.tasks:Vault",
                                           "tally": f"{__name__}:Tally"}})
    agent = AgentRollouts.from_config(config)
    rewards = agent.reward_functions()
    assert [reward.__name__ for reward in rewards] == ["AsyncJudge", "Tally"]  # Vault has no get_reward
    rows = [{"prompt": [{"role": "user", "content": "abc"}], "letters": "a", "environment": name}
            for name in ("judge", "tally", "vault")]
    _, _, environments = agent.start(rows, "prompt")
    environments[1].tally()
    assert rewards[0](environments=environments) == [3.0, None, None]  # awaited on the tools' event loop
    assert rewards[1](environments=environments) == [None, 1.0, None]


def test_truncated_sampling_is_replayed_through_tool_turns():
    """top-p with tools: the sampler's log-probs are the truncated distribution's and the old-policy pass
    replays each model token's threshold, so the first sampler ratio is 1 on every model token."""
    if not ENGINE_TAKES_TURNS:
        pytest.skip("RolloutEngine.generate takes no turns yet")
    config, tokenizer, model, rollout = _rollout_with_tool_turns(
        RolloutEngine(cuda_graphs=False), top_p=0.8, rollout_engine="engine",
        importance_sampling_correction="token_truncate", importance_sampling_clip_max=10.0)
    assert rollout.logit_thresholds is not None and rollout.sampling_logps is not None
    old = batch_logprobs(model, rollout, config, torch.device("cpu"))
    mask = rollout.completion_mask.bool()  # model tokens only (tool results are out of it)
    ratio = (old - rollout.sampling_logps)[mask].exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)
    full = GRPOConfig(**{**VAULT, "replay_truncation": False})
    unreplayed = (batch_logprobs(model, dataclasses.replace(rollout, logit_thresholds=None), full,
                                 torch.device("cpu")) - rollout.sampling_logps)[mask].exp()
    assert unreplayed.min() < 0.95  # over the full vocabulary: the kept mass


def test_an_environment_whose_call_timed_out_is_not_reused():
    """A timed-out call may still be running on its instance (threads cannot be stopped): the pool hands
    out a new instance from then on, and keeps the others."""
    config, tokenizer, model, agent = _setup()
    first = agent.environments_for([{}] * 3)
    agent.retire([first[1]])
    again = agent.environments_for([{}] * 3)
    assert again[0] is first[0] and again[2] is first[2]
    assert again[1] is not first[1] and type(again[1]) is type(first[1])
