"""grpo-fast's fused loss inside TRL's ``GRPOTrainer`` (TRL 1.16).

``FusedGRPOTrainer`` is a subclass of ``trl.GRPOTrainer`` that overrides two methods.
``_compute_loss``: the policy forward stops at the final hidden states, and the loss, its
gradient, the entropy and clip metrics come from ``grpo_fast.grpo_loss`` on those hidden states
and the lm_head weight, never holding the ``[tokens, vocab]`` logits for the backward.
``_get_per_token_logps_and_entropies``, in its no-grad calls (the old and reference policy
log-probs), runs ``grpo_fast.token_logprobs``, whose kernel never writes the logits. Sampling,
rewards, advantages, logging and checkpoints are TRL's own.
The numbers are TRL's: for each supported option the loss and the gradients match
``trl.GRPOTrainer`` on the same batch (``tests/test_trl_integration.py``).

Swap the class, keep the rest::

    from trl import GRPOConfig
    from grpo_fast.integrations.trl import FusedGRPOTrainer

    trainer = FusedGRPOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        reward_funcs=[accuracy_reward, strict_format_reward],     # from grpo_fast.rewards
        args=GRPOConfig(loss_type="dapo", beta=0.0, num_generations=8),
        train_dataset=dataset,
    )
    trainer.train()

Supported: ``loss_type`` grpo / bnpo / dr_grpo / dapo, ``importance_sampling_level`` token /
sequence, ``epsilon``, ``epsilon_high``, ``delta``, ``beta`` (k3 KL against TRL's reference
log-probs; ``use_bias_correction_kl``, TRL 1.16's default, multiplies it by the importance ratio),
``temperature``, ``cast_lm_head_to_fp32``, ``num_iterations`` > 1, gradient
accumulation, PEFT / quantised models, an lm_head bias, and the logit transforms of
``grpo_fast.logits`` (Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling``, ...: the loss applies them as the model's forward does). Refused at
construction, with a ValueError naming the option: the other loss types, ``use_liger_kernel``,
``top_entropy_quantile`` < 1, an entropy bonus, ``off_policy_mask_threshold``,
vLLM importance-sampling correction, MoE router auxiliary losses, and models of other families
whose config sets a logit-transform field (named in the error). On its first forward the trainer
checks that the model's own logits are the transformed head output of the hidden states it reads.

Importing this module imports TRL (the ``trl`` extra: ``pip install 'grpo-fast[trl]'``);
importing ``grpo_fast`` does not.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # the optional extra is missing: say how to get it
    raise ImportError(
        "grpo_fast.integrations.trl needs TRL: pip install 'grpo-fast[trl]' (trl==1.16.0)"
    ) from error

from ..logits import check_logits, logit_transform
from ..loss import GRPOLossConfig, grpo_loss, token_logprobs

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

# Inputs that carry images: the hidden-state forward below passes text inputs only.
_MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                      "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")


def unsupported_options(args: GRPOConfig) -> list[str]:
    """The options in ``args`` that ``FusedGRPOTrainer`` cannot honour, each as
    ``"name: expected ..., received ..."``; empty when all are supported.

    >>> options = dict(output_dir="/tmp/grpo", report_to=[], use_cpu=True)
    >>> unsupported_options(GRPOConfig(loss_type="dapo", beta=0.04, **options))
    []
    >>> unsupported_options(GRPOConfig(loss_type="cispo", beta=0.04, **options))
    ["loss_type: expected one of ('grpo', 'bnpo', 'dr_grpo', 'dapo'), received 'cispo'"]
    """
    problems = []

    def refuse(name: str, expected: str, received: Any) -> None:
        problems.append(f"{name}: expected {expected}, received {received!r}")

    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        refuse("loss_type", f"one of {SUPPORTED_LOSS_TYPES}", args.loss_type)
    if args.importance_sampling_level not in ("token", "sequence"):
        refuse("importance_sampling_level", "'token' or 'sequence'", args.importance_sampling_level)
    if getattr(args, "use_liger_kernel", False):
        refuse("use_liger_kernel", "False (grpo-fast replaces the fused loss head)", args.use_liger_kernel)
    if args.top_entropy_quantile != 1.0:
        refuse("top_entropy_quantile", "1.0 (no high-entropy token mask)", args.top_entropy_quantile)
    if args.entropy_coef != 0.0:
        refuse("entropy_coef", "0.0 (no entropy bonus: the fused loss has no entropy gradient)", args.entropy_coef)
    if args.use_adaptive_entropy:
        refuse("use_adaptive_entropy", "False", args.use_adaptive_entropy)
    if args.off_policy_mask_threshold is not None:
        refuse("off_policy_mask_threshold", "None", args.off_policy_mask_threshold)
    if args.use_vllm and args.vllm_importance_sampling_correction:
        refuse("vllm_importance_sampling_correction", "False when use_vllm=True",
               args.vllm_importance_sampling_correction)
    if args.router_aux_loss_coef:
        refuse("router_aux_loss_coef", "None or 0 (no MoE auxiliary loss)", args.router_aux_loss_coef)
    return problems


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose training loss runs through ``grpo_fast.grpo_loss``.

    Takes exactly ``GRPOTrainer``'s arguments, plus ``loss_backend`` ("auto": Triton on CUDA,
    chunked PyTorch elsewhere; "torch"; "triton"; "reference") and ``loss_chunk_size`` (tokens
    per chunk of logits; None: the backend's memory budget).

    >>> trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...))  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, *args, loss_backend: str = "auto", loss_chunk_size: int | None = None, **kwargs):
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if training_args is not None:
            if not isinstance(training_args, GRPOConfig):
                raise ValueError(
                    f"args: expected a trl.GRPOConfig, received {type(training_args).__name__}"
                )
            _raise_if_unsupported(training_args)
        if loss_backend not in ("auto", "triton", "torch", "reference"):
            raise ValueError(
                f"loss_backend: expected 'auto', 'triton', 'torch' or 'reference', received {loss_backend!r}"
            )
        self.loss_backend = loss_backend
        self.loss_chunk_size = loss_chunk_size
        self._final_hidden_state_checked = False
        super().__init__(*args, **kwargs)
        _raise_if_unsupported(self.args)  # TRL filled in the defaults when args was None
        # Gemma's soft cap, Cohere's or Granite's scale...: the loss applies it as the model does;
        # a transform grpo-fast does not know is refused here, naming the config field.
        self.logit_transform = logit_transform(self.accelerator.unwrap_model(self.model))

    # ------------------------------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        for name in _MULTIMODAL_INPUTS:
            if inputs.get(name) is not None:
                raise ValueError(f"inputs[{name!r}]: expected None (FusedGRPOTrainer is text-only), received a value")
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError(
                f"inputs['advantages']: expected one advantage per completion, shape ({completion_ids.size(0)},), "
                f"received shape {tuple(advantages.shape)}"
            )

        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden = self._completion_hidden_states(model, input_ids, attention_mask, completion_ids.size(1))
        weight, bias = self._lm_head(model)
        hidden = hidden.to(weight.dtype)  # autocast or cast_lm_head_to_fp32 can leave them apart

        mode = "train" if self.model.training else "eval"
        output = grpo_loss(
            hidden,
            weight,
            completion_ids,
            mask,
            advantages=advantages.float(),
            old_logps=inputs.get("old_per_token_logps"),
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            bias=bias,
            config=self._loss_config(inputs, mode),
            backend=self.loss_backend,
        )
        loss = output.loss
        if self.loss_type != "dapo" and mode == "train":
            # HF's automatic accumulation scaling is off for GRPOTrainer; TRL divides here.
            loss = loss / self.current_gradient_accumulation_steps
        self._log_loss_metrics(output.metrics, mode)
        return loss

    def _completion_hidden_states(self, model, input_ids, attention_mask, completion_length: int) -> torch.Tensor:
        """[B, T, H] final (normed) hidden states at the positions that predict the completion."""
        with self.accelerator.autocast():
            # Through the (possibly wrapped) model so DDP hooks, PEFT adapters and gradient
            # checkpointing all apply; logits_to_keep=1 keeps the model's own head to one position.
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=False,
            )
        # transformers ties hidden_states[-1] to the final-norm output (last_hidden_state).
        hidden = outputs.hidden_states[-1]
        if not self._final_hidden_state_checked:
            self._check_final_hidden_state(model, hidden[:, -1], outputs.logits[:, -1])
        return hidden[:, -completion_length - 1 : -1]

    def _check_final_hidden_state(self, model, last_hidden: torch.Tensor, last_logits: torch.Tensor) -> None:
        """Once per run: the model's own logits at the last position must be the logit transform of
        ``hidden @ W.T + b``, or the hidden states are not what the lm_head reads (an architecture that
        does not tie hidden_states[-1] to the normed output) or the transform is not the model's, and
        the loss would be wrong."""
        check_logits(self.accelerator.unwrap_model(model), last_hidden, last_logits, self.logit_transform,
                     hidden_name="hidden_states[-1]", advice="; use trl.GRPOTrainer for this model")
        self._final_hidden_state_checked = True

    def _lm_head(self, model) -> tuple[torch.Tensor, torch.Tensor | None]:
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        bias = None if lm_head.bias is None else lm_head.bias.to(lm_head.weight.dtype)
        return lm_head.weight, bias

    # ------------------------------------------------------------------------------------------
    # The no-grad passes (old and reference policy log-probs)
    # ------------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal_inputs,
    ):
        """TRL's no-grad log-prob passes through grpo-fast's forward-only kernel (no logits written);
        anything else (a pass with gradients, images, MoE auxiliary losses) is TRL's own."""
        if torch.is_grad_enabled() or compute_aux_loss or any(v is not None for v in multimodal_inputs.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal_inputs,
            )
        weight, bias = self._lm_head(model)
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            hidden = self._completion_hidden_states(model, ids, mask, logits_to_keep).to(weight.dtype)
            logps, entropy = token_logprobs(
                hidden, weight, ids[:, -logits_to_keep:], bias=bias, temperature=self.temperature,
                backend=self.loss_backend, completion_mask=mask[:, -logits_to_keep:], return_entropy=True,
                chunk_size=self.loss_chunk_size, **self.logit_transform.loss_keywords(),
            )
            all_logps.append(logps)
            all_entropies.append(entropy)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None

    def _loss_config(self, inputs, mode: str) -> GRPOLossConfig:
        num_items_in_batch = None
        if self.loss_type == "dapo":
            # TRL's dapo normaliser: the generation batch's active tokens, per process, rescaled to
            # one accumulation window (grpo_loss then returns loss / this, already accumulation-scaled).
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            num_items_in_batch = float(normaliser)
        return GRPOLossConfig(
            loss_type=self.loss_type,
            beta=self.beta,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            temperature=self.temperature,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.loss_chunk_size,
            kl_bias_correction=bool(getattr(self.args, "use_bias_correction_kl", False)),
            **self.logit_transform.loss_keywords(),
        )

    def _log_loss_metrics(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
        if self.beta != 0.0:
            names.append("kl")
        for name in names:
            value = metrics[name].float().reshape(1)
            self._metrics[mode][name].append(self.accelerator.gather(value).nanmean().item())


def _raise_if_unsupported(args: GRPOConfig) -> None:
    problems = unsupported_options(args)
    if problems:
        raise ValueError("FusedGRPOTrainer does not support these GRPOConfig options: " + "; ".join(problems))


__all__ = ["FusedGRPOTrainer", "SUPPORTED_LOSS_TYPES", "unsupported_options"]
