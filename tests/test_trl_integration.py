"""FusedGRPOTrainer: same loss, gradients and metrics as trl.GRPOTrainer on the same batch, clear
refusals of unsupported options, and a short training run (tiny model built in code, CPU)."""

import copy
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from grpo_fast.integrations.trl import FusedGRPOTrainer, unsupported_options  # noqa: E402
from grpo_fast.rewards import lenient_format_reward, make_overlong_penalty  # noqa: E402
from tiny_lm import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Count to three:", "Say hi."]


def grpo_config(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=2, logging_steps=1, save_strategy="no", learning_rate=1e-2,
        disable_tqdm=True, seed=0, bf16=False,  # fp32 throughout, so the comparison is exact
    )
    options.update(overrides)
    return trl.GRPOConfig(**options)


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def make_trainers(tmp_path, model_bias=False, **overrides):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, bias=model_bias)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    args = grpo_config(tmp_path, **overrides)
    common = dict(reward_funcs=[length_reward], train_dataset=dataset, processing_class=tokenizer)
    reference = trl.GRPOTrainer(model=copy.deepcopy(model), args=args, **common)
    fused = FusedGRPOTrainer(model=copy.deepcopy(model), args=copy.deepcopy(args), loss_backend="torch", **common)
    return reference, fused


def make_batch(trainer, generator):
    """A batch shaped like GRPOTrainer._generate_and_score_completions' output, with off-policy
    old log-probs (so ratios differ from 1 and clipping is active) and padded completions."""
    B, P, T, V = 8, 5, 7, trainer.model.config.vocab_size
    prompt_ids = torch.randint(0, 250, (B, P), generator=generator)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(0, 250, (B, T), generator=generator)
    lengths = torch.tensor([7, 5, 1, 7, 3, 6, 2, 4])
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T
        )
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=generator),
        "old_per_token_logps": logps + 0.3 * torch.randn(B, T, generator=generator),
        "ref_per_token_logps": logps + 0.2 * torch.randn(B, T, generator=generator),
        "num_items_in_batch": completion_mask.sum().float() * 2,  # the generation batch spans 2 steps
    }


def loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    return make_trainers(tmp_path_factory.mktemp("equivalence"), model_bias=True)


@pytest.mark.parametrize(
    "loss_type, level, beta, epsilon_high, delta, bias_correction",
    [
        ("dapo", "token", 0.0, 0.28, None, True),
        ("dapo", "token", 0.04, 0.2, 1.5, False),
        ("dapo", "token", 0.3, 0.2, 1.5, True),  # TRL's default use_bias_correction_kl with a KL term
        ("grpo", "token", 0.04, 0.28, None, False),
        ("grpo", "sequence", 0.0, 0.2, None, False),
        ("grpo", "sequence", 0.3, 0.2, None, True),
        ("bnpo", "token", 0.0, 0.2, 1.3, False),
        ("bnpo", "sequence", 0.04, 0.28, None, False),
        ("dr_grpo", "token", 0.04, 0.2, None, True),
        ("dr_grpo", "sequence", 0.0, 0.28, 2.0, False),
    ],
)
def test_same_loss_and_gradients_as_trl(trainers, loss_type, level, beta, epsilon_high, delta, bias_correction):
    generator = torch.Generator().manual_seed(1)
    inputs = make_batch(trainers[0], generator)
    results = []
    for trainer in trainers:
        # One pair of trainers serves every case: set the options TRL reads when computing the loss.
        trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
        trainer.epsilon_high, trainer.args.delta = epsilon_high, delta
        trainer.args.use_bias_correction_kl = bias_correction
        trainer.current_gradient_accumulation_steps = 2  # exercises TRL's accumulation scaling
        loss, grads = loss_and_grads(trainer, inputs)
        metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
        results.append((loss, grads, metrics))
    (trl_loss, trl_grads, trl_metrics), (loss, grads, metrics) = results
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert trl_grads.keys() == grads.keys() and "lm_head.bias" in grads
    for name in trl_grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    names += ["kl"] if beta else []
    for name in names:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-6), name
    assert trl_metrics["clip_ratio/region_mean"] > 0  # the batch does exercise the clip


def test_same_no_grad_logprobs_as_trl(trainers):
    """The old/reference-policy passes (no grad) run grpo-fast's forward-only path; TRL's values."""
    inputs = make_batch(trainers[0], torch.Generator().manual_seed(2))
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    results = []
    for trainer in trainers:
        with torch.no_grad():
            logps, entropy, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, attention_mask, T, batch_size=3, compute_entropy=True
            )
        results.append((logps, entropy))
    (trl_logps, trl_entropy), (logps, entropy) = results
    torch.testing.assert_close(logps, trl_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, trl_entropy, rtol=1e-5, atol=1e-5)
    assert (logps[inputs["completion_mask"] == 0] == 0).all()


@pytest.mark.parametrize(
    "option, value",
    [
        ("loss_type", "cispo"), ("loss_type", "sapo"), ("top_entropy_quantile", 0.2), ("entropy_coef", 0.01),
        ("off_policy_mask_threshold", 0.5), ("use_liger_kernel", True),
    ],
)
def test_refuses_unsupported_options(tmp_path, option, value):
    args = grpo_config(tmp_path, **{option: value})
    with pytest.raises(ValueError, match=option):
        FusedGRPOTrainer(model="unused: the options are checked first", reward_funcs=[length_reward], args=args)


def test_refuses_vllm_correction(tmp_path):
    assert unsupported_options(grpo_config(tmp_path, beta=0.1, use_bias_correction_kl=True)) == []
    args = grpo_config(tmp_path)
    args.use_vllm, args.vllm_importance_sampling_correction = True, True
    assert any(p.startswith("vllm_importance_sampling_correction") for p in unsupported_options(args))
    assert unsupported_options(grpo_config(tmp_path, beta=0.1)) == []


def test_refuses_soft_capped_logits(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        FusedGRPOTrainer(model=model, reward_funcs=[length_reward], args=grpo_config(tmp_path),
                         train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)


def test_short_training_run(tmp_path):
    """A few steps with LoRA (the reference policy is the adapter-off model), KL and accumulation."""
    from peft import LoraConfig

    tokenizer = tiny_tokenizer()
    trainer = FusedGRPOTrainer(
        model=tiny_model(tokenizer),
        reward_funcs=[length_reward, lenient_format_reward, make_overlong_penalty(8, 4)],
        args=grpo_config(tmp_path, max_steps=3, beta=0.04, gradient_accumulation_steps=2),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert all("entropy" in entry and "kl" in entry for entry in logs)
    changed = [name for name, p in trainer.model.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert before and all("lora" in name for name in before) and len(changed) == len(before)


def test_importing_grpo_fast_does_not_import_trl():
    code = "import sys, grpo_fast, grpo_fast.rewards; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples():
    import doctest

    import grpo_fast.integrations.trl as integration

    failures, _ = doctest.testmod(integration, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert failures == 0


def test_refuses_hidden_states_the_head_does_not_read(tmp_path):
    """A model whose hidden_states[-1] is not the lm_head's input is caught on the first forward."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    model.config.tie_last_hidden_states = False  # hidden_states[-1]: the last block's raw output (before the norm)
    trainer = FusedGRPOTrainer(model=model, reward_funcs=[length_reward], args=grpo_config(tmp_path),
                               train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    with pytest.raises(ValueError, match="hidden_states"):
        make_batch(trainer, torch.Generator().manual_seed(3))  # its no-grad log-prob pass is the first forward
