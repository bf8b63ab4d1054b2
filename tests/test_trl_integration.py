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


CASES = [
    # loss_type, importance_sampling_level, beta, epsilon_high, delta, use_bias_correction_kl, extra options
    ("dapo", "token", 0.0, 0.28, None, True, {}),
    ("dapo", "token", 0.04, 0.2, 1.5, False, {}),
    ("dapo", "token", 0.3, 0.2, 1.5, True, {}),  # TRL's default use_bias_correction_kl with a KL term
    ("grpo", "token", 0.04, 0.28, None, False, {}),
    ("grpo", "sequence", 0.0, 0.2, None, False, {}),
    ("grpo", "sequence", 0.3, 0.2, None, True, {}),
    ("bnpo", "token", 0.0, 0.2, 1.3, False, {}),
    ("bnpo", "sequence", 0.04, 0.28, None, False, {}),
    ("dr_grpo", "token", 0.04, 0.2, None, True, {}),
    ("dr_grpo", "sequence", 0.0, 0.28, 2.0, False, {}),
    ("luspo", "sequence", 0.0, 0.28, None, False, {}),
    ("luspo", "token", 0.04, 0.2, None, True, {}),
    ("cispo", "token", 0.0, 1.2, None, False, {}),
    ("cispo", "sequence", 0.04, 1.2, None, True, {}),
    ("sapo", "token", 0.04, 0.2, None, False, {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.7}),
    ("sapo", "sequence", 0.0, 0.2, None, False, {}),
    ("vespo", "token", 0.0, 0.2, None, False, {"vespo_k_pos": 1.5, "vespo_lambda_neg": 2.5}),
    ("vespo", "token", 0.04, 0.2, None, True, {"vllm": "token_truncate"}),
    ("dapo", "token", 0.0, 0.28, None, True, {"entropy_coef": 0.05}),
    ("grpo", "token", 0.04, 0.2, None, False, {"entropy_coef": 0.1, "top_entropy_quantile": 0.4}),
    ("dapo", "sequence", 0.0, 0.2, None, False, {"top_entropy_quantile": 0.3}),
    ("bnpo", "token", 0.0, 0.2, None, False, {"off_policy_mask_threshold": 0.05, "vllm": None}),
    ("dapo", "token", 0.04, 0.28, None, True, {"vllm": "token_truncate"}),
    ("grpo", "token", 0.0, 0.2, None, False, {"vllm": "sequence_mask"}),
    ("cispo", "token", 0.0, 1.5, None, False, {"vllm": "sequence_truncate", "off_policy_mask_threshold": 0.1,
                                               "entropy_coef": 0.02}),
]


def _sampler_inputs(inputs, mode, generator):
    """TRL's sampler inputs for a vLLM run: the sampler's log-probs and the correction ratio of `mode`
    (computed as GRPOTrainer does, from old - sampler log-prob differences)."""
    mask = inputs["completion_mask"]
    sampling = inputs["old_per_token_logps"] + 0.2 * torch.randn(mask.shape, generator=generator)
    diff = (inputs["old_per_token_logps"] - sampling) * mask
    if mode is None:  # only the sampler's log-probs (the off-policy mask reads them)
        return {"sampling_per_token_logps": sampling}
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = ratio.clamp(max=1.3)
    else:
        ratio = ratio.masked_fill(ratio > 1.3, 0.0)
    return {"sampling_per_token_logps": sampling, "importance_sampling_ratio": ratio}


@pytest.mark.parametrize("loss_type, level, beta, epsilon_high, delta, bias_correction, extra", CASES)
def test_same_loss_and_gradients_as_trl(trainers, loss_type, level, beta, epsilon_high, delta, bias_correction, extra):
    generator = torch.Generator().manual_seed(1)
    inputs = make_batch(trainers[0], generator)
    extra = dict(extra)
    use_vllm = "vllm" in extra
    if use_vllm:
        inputs.update(_sampler_inputs(inputs, extra.pop("vllm"), generator))
    results = []
    for trainer in trainers:
        # One pair of trainers serves every case: set the options TRL reads when computing the loss.
        trainer._metrics["train"].clear()
        trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
        trainer.epsilon_high, trainer.args.delta = epsilon_high, delta
        trainer.args.use_bias_correction_kl = bias_correction
        trainer.use_vllm = use_vllm
        trainer.vllm_importance_sampling_correction = "importance_sampling_ratio" in inputs
        trainer.top_entropy_quantile = extra.get("top_entropy_quantile", 1.0)
        trainer.off_policy_mask_threshold = extra.get("off_policy_mask_threshold")
        trainer.entropy_coef = extra.get("entropy_coef", 0.0)
        trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_neg"):
            setattr(trainer.args, name, extra.get(name, trl.GRPOConfig.__dataclass_fields__[name].default))
        trainer.current_gradient_accumulation_steps = 2  # exercises TRL's accumulation scaling
        loss, grads = loss_and_grads(trainer, inputs)
        metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
        results.append((loss, grads, metrics))
    (trl_loss, trl_grads, trl_metrics), (loss, grads, metrics) = results
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert trl_grads.keys() == grads.keys() and "lm_head.bias" in grads
    for name in trl_grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert metrics.keys() == trl_metrics.keys()  # every metric TRL logs, under its name
    for name in trl_metrics:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-6, nan_ok=True), name
    if loss_type in ("dapo", "grpo", "bnpo", "dr_grpo", "luspo") and "off_policy_mask_threshold" not in extra:
        assert trl_metrics["clip_ratio/region_mean"] > 0  # the batch does exercise the clip


def test_adaptive_entropy_control_as_trl(tmp_path):
    """TRL's controller: the bonus applies once the window's entropy is at or below the target, and the
    coefficient moves by entropy_coef_delta at each optimiser step; three steps, both trainers."""
    trainers = make_trainers(tmp_path, use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=100.0,
                             entropy_coef_delta=0.02, top_entropy_quantile=0.5)
    inputs = make_batch(trainers[0], torch.Generator().manual_seed(4))
    history = []
    for trainer in trainers:
        trainer.current_gradient_accumulation_steps = 1
        steps = []
        for _ in range(3):
            loss, grads = loss_and_grads(trainer, inputs)
            steps.append((loss, grads, trainer.entropy_coef))
        history.append((steps, {name: list(values) for name, values in trainer._metrics["train"].items()}))
    (trl_steps, trl_metrics), (steps, metrics) = history
    for (trl_loss, trl_grads, trl_coef), (loss, grads, coef) in zip(trl_steps, steps):
        torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
        for name in trl_grads:
            torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert coef == pytest.approx(trl_coef)
    assert [round(c, 6) for _, _, c in steps] == [0.07, 0.09, 0.11]  # the coefficient moved each step
    assert metrics.keys() == trl_metrics.keys()
    for name in trl_metrics:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-6, nan_ok=True), name


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


def test_refuses_only_what_cannot_be_fused(tmp_path):
    assert unsupported_options(grpo_config(tmp_path, loss_type="vespo", top_entropy_quantile=0.2, entropy_coef=0.01,
                                           use_adaptive_entropy=True, off_policy_mask_threshold=0.5)) == []
    args = grpo_config(tmp_path, loss_type="sft")
    with pytest.raises(ValueError, match="loss_type: expected one of .*, received 'sft'"):
        FusedGRPOTrainer(model="unused: the options are checked first", reward_funcs=[length_reward], args=args)


def test_accepts_liger_layer_kernels(tmp_path):
    """TRL 1.16's use_liger_kernel applies Liger's layer kernels (when training starts) and never its fused
    head, which TRL turns off: nothing grpo-fast reads changes, so the option is accepted."""
    assert unsupported_options(grpo_config(tmp_path, use_liger_kernel=True)) == []
    tokenizer = tiny_tokenizer()
    trainer = FusedGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=[length_reward],
                               args=grpo_config(tmp_path, use_liger_kernel=True), processing_class=tokenizer,
                               train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))
    assert trainer.args.liger_kernel_config["fused_linear_cross_entropy"] is False


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
