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

Supported: every option of TRL 1.16's loss: ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo /
cispo / sapo (``sapo_temperature_pos`` / ``_neg``) / vespo (``vespo_k_*`` / ``vespo_lambda_*``),
``importance_sampling_level`` token / sequence, ``epsilon``, ``epsilon_high``, ``delta``, ``beta``
(k3 KL against TRL's reference log-probs; ``use_bias_correction_kl``, TRL 1.16's default, multiplies
it by the importance ratio), ``entropy_coef`` and ``use_adaptive_entropy`` (the entropy bonus and
its gradient inside the fused pass; TRL's controller), ``top_entropy_quantile`` (the quantile over
every process's tokens, as TRL takes it), ``off_policy_mask_threshold`` and vLLM's
importance-sampling correction (TRL's sampler log-probs and ratios, every mode; under top-k / top-p /
min-p the policy's and old log-probs are over the tokens the truncation kept, replayed on the policy's
own logits, so the ratio is not the kept mass: ``replay_truncation``), MoE router
auxiliary losses, ``temperature``, ``cast_lm_head_to_fp32``, ``num_iterations`` > 1, gradient
accumulation, PEFT / quantised models, an lm_head bias, and the logit transforms of
``grpo_fast.logits`` (Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling``, ...: the loss applies them as the model's forward does). Every metric TRL logs
for the loss is logged under TRL's name with TRL's reduction across processes.

Mixed precision: fp32, bf16 or fp16 weights, HF's ``bf16=True`` / ``fp16=True`` autocast (TRL's
default), ``cast_lm_head_to_fp32``. The backbone runs as TRL runs it; the fused head computes fp32 logits
from the hidden states and the head's weight as stored, with autocast off (TRL's own fused head rounds
each logit tile to autocast's dtype unless ``cast_lm_head_to_fp32``), so the loss equals TRL's with
``cast_lm_head_to_fp32`` and TRL's default within autocast's rounding. ``use_liger_kernel``: TRL 1.16
applies Liger's layer kernels only (never its fused head), which the hidden-state forward reads as is.

Refused at construction, with a ValueError naming the option or field: a ``loss_type`` or
``importance_sampling_level`` TRL 1.16 does not define, and models of other families whose config
sets a logit-transform field (named in the error). Refused at the first batch: image inputs
(the hidden-state forward is text-only). On its first forward the trainer checks that the model's
own logits are the transformed head output of the hidden states it reads.

Importing this module imports TRL (the ``trl`` extra: ``pip install 'grpo-fast[trl]'``);
importing ``grpo_fast`` does not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # the optional extra is missing: say how to get it
    raise ImportError(
        "grpo_fast.integrations.trl needs TRL: pip install 'grpo-fast[trl]' (trl==1.16.0)"
    ) from error

from ..logits import autocast_dtype, check_logits, logit_transform
from ..loss import TOKEN_NORMALISED_LOSS_TYPES as _TOKEN_NORMALISED
from ..loss import GRPOLossConfig, grpo_loss, token_logprobs
from ..truncation import replayed_thresholds, truncates

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")

# Inputs that carry images: the hidden-state forward below passes text inputs only.
_MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                      "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")


def unsupported_options(args: GRPOConfig) -> list[str]:
    """The options in ``args`` that ``FusedGRPOTrainer`` cannot honour, each as
    ``"name: expected ..., received ..."``; empty when all are supported.

    >>> options = dict(output_dir="/tmp/grpo", report_to=[], use_cpu=True)
    >>> unsupported_options(GRPOConfig(loss_type="dapo", beta=0.04, **options))
    []
    >>> unsupported_options(GRPOConfig(loss_type="sft", **options))  # doctest: +ELLIPSIS
    ["loss_type: expected one of ('grpo', ...), received 'sft'"]
    """
    problems = []

    def refuse(name: str, expected: str, received: Any) -> None:
        problems.append(f"{name}: expected {expected}, received {received!r}")

    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        refuse("loss_type", f"one of {SUPPORTED_LOSS_TYPES}", args.loss_type)
    if args.importance_sampling_level not in ("token", "sequence"):
        refuse("importance_sampling_level", "'token' or 'sequence'", args.importance_sampling_level)
    return problems


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose training loss runs through ``grpo_fast.grpo_loss``.

    Takes exactly ``GRPOTrainer``'s arguments, plus ``loss_backend`` ("auto": Triton on CUDA,
    chunked PyTorch elsewhere; "torch"; "triton"; "reference"), ``loss_chunk_size`` (tokens
    per chunk of logits; None: the backend's memory budget) and ``replay_truncation`` (default True:
    when vLLM samples with top-k / top-p / min-p and its importance-sampling correction is on, the
    policy's and old log-probs are taken over the tokens the truncation kept, replayed on the policy's
    own logits: ``grpo_fast.truncation.replayed_thresholds``; the reference's stay full).

    >>> trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...))  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, *args, loss_backend: str = "auto", loss_chunk_size: int | None = None,
                 replay_truncation: bool = True, **kwargs):
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
        self.replay_truncation = replay_truncation
        self._replayed: torch.Tensor | None = None  # this generation batch's thresholds, once computed
        self._replaying = False  # inside _generate_and_score_completions with replay on
        self._final_hidden_state_checked = False
        self._head_compute_dtype = None  # autocast's dtype at the last hidden-state forward, or None
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
        outputs = self._model_outputs(model, input_ids, attention_mask, aux_loss=self.aux_loss_enabled)
        hidden = self._completion_hidden(outputs, model, completion_ids.size(1))

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        sampler_correction = self.use_vllm and self.vllm_importance_sampling_correction
        with self._gathered_head(model), _fp32_logits(hidden):
            weight, bias = self._lm_head(model)
            hidden = hidden.to(weight.dtype)  # autocast or cast_lm_head_to_fp32 can leave them apart
            output = grpo_loss(
                hidden,
                weight,
                completion_ids,
                mask,
                advantages=advantages.float(),
                old_logps=inputs.get("old_per_token_logps"),
                ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                bias=bias,
                config=self._loss_config(inputs, mode, accumulation),
                backend=self.loss_backend,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio") if sampler_correction else None,
                sampling_logps=inputs.get("sampling_per_token_logps"),
                logit_threshold=inputs.get("logit_thresholds"),
                entropy_threshold_fn=self._entropy_threshold if self.top_entropy_quantile < 1.0 else None,
            )
        loss = output.loss
        if self.loss_type not in _TOKEN_NORMALISED:
            # HF's automatic accumulation scaling is off for GRPOTrainer; TRL divides here.
            loss = loss / accumulation
        if self._entropy_bonus_enabled:
            self._entropy_bonus_bookkeeping(output, mask, mode)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_loss_metrics(output, mask, mode)
        return loss

    def _model_outputs(self, model, input_ids, attention_mask, aux_loss: bool = False):
        with self.accelerator.autocast():
            # Under mixed precision the model's own head product (its logits, which the first forward
            # checks) is computed in autocast's dtype, whatever dtype its tensors are stored in.
            self._head_compute_dtype = autocast_dtype(input_ids.device.type)
            # Through the (possibly wrapped) model so DDP hooks, PEFT adapters and gradient
            # checkpointing all apply; logits_to_keep=1 keeps the model's own head to one position.
            extra = {"output_router_logits": True} if aux_loss else {}
            return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                         logits_to_keep=1, use_cache=False, **extra)

    def _completion_hidden(self, outputs, model, completion_length: int) -> torch.Tensor:
        """[B, T, H] final (normed) hidden states at the positions that predict the completion."""
        # transformers ties hidden_states[-1] to the final-norm output (last_hidden_state).
        hidden = outputs.hidden_states[-1]
        if not self._final_hidden_state_checked:
            self._check_final_hidden_state(model, hidden[:, -1], outputs.logits[:, -1])
        return hidden[:, -completion_length - 1 : -1]

    def _completion_hidden_states(self, model, input_ids, attention_mask, completion_length: int) -> torch.Tensor:
        return self._completion_hidden(self._model_outputs(model, input_ids, attention_mask), model, completion_length)

    def _entropy_threshold(self, local: torch.Tensor, quantile: float) -> torch.Tensor:
        """The top-entropy threshold over every process's tokens, as TRL's get_high_entropy_mask."""
        pad = -1e9  # entropies are >= 0, so the padding cannot collide with one
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=pad))
        gathered = gathered[gathered != pad]
        if gathered.numel() == 0:
            return local.new_tensor(float("inf"))
        return torch.quantile(gathered, quantile)

    def _entropy_coefficient(self) -> float:
        """TRL's applied coefficient: the static one, or with adaptive control the current one while the
        last window's entropy is at or below the target (0 otherwise)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        if self.use_adaptive_entropy:
            return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        return self.entropy_coef

    def _entropy_bonus_bookkeeping(self, output, mask, mode: str) -> None:
        """TRL's policy_loss metric, its adaptive entropy controller (the window's token-weighted
        entropy of the bonus's tokens, reduced across processes at the optimiser step) and entropy_coef."""
        policy_loss = output.metrics.get("policy_loss", output.loss.detach())
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss.reshape(1)).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            effective = mask.bool()
            if self.top_entropy_quantile < 1.0:
                threshold = self._entropy_threshold(output.entropy[effective].float(), 1.0 - self.top_entropy_quantile)
                effective = effective & (output.entropy >= threshold)
            stats = torch.stack([(output.entropy * effective).sum(), effective.sum().float()]).detach()
            self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _check_final_hidden_state(self, model, last_hidden: torch.Tensor, last_logits: torch.Tensor) -> None:
        """Once per run: the model's own logits at the last position must be the logit transform of
        ``hidden @ W.T + b``, or the hidden states are not what the lm_head reads (an architecture that
        does not tie hidden_states[-1] to the normed output) or the transform is not the model's, and
        the loss would be wrong."""
        with self._gathered_head(model):
            check_logits(self.accelerator.unwrap_model(model), last_hidden, last_logits, self.logit_transform,
                         hidden_name="hidden_states[-1]", advice="; use trl.GRPOTrainer for this model",
                         compute_dtype=self._head_compute_dtype)
        self._final_hidden_state_checked = True

    def _gathered_head(self, model):
        """Under DeepSpeed ZeRO-3 the lm_head's parameters are partitioned across processes: gathered here
        for the fused loss, which reads them only inside its forward (the gradient w.r.t. the hidden
        states is computed there). A trainable head is refused: its gradient would have to reach the
        partitioned parameter after the gather is released."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
        if not any(hasattr(p, "ds_id") for p in params):  # not a ZeRO-3 parameter
            return contextlib.nullcontext()
        if any(p.requires_grad for p in params):
            raise ValueError("lm_head: expected a frozen lm_head under DeepSpeed ZeRO-3 (LoRA, or the head excluded "
                             "from training), received a trainable one; use ZeRO-2 to train the head with the fused "
                             "loss, or trl.GRPOTrainer")
        if self.loss_backend == "reference":
            raise ValueError("loss_backend: expected 'auto', 'torch' or 'triton' under DeepSpeed ZeRO-3 (the eager "
                             "reference reads the gathered head again in backward), received 'reference'")
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

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
        batch_size = batch_size or input_ids.size(0)
        # With vLLM's correction on, TRL's first no-grad pass of a generation batch is the policy's (old
        # log-probs): with truncation replayed, its logits give the thresholds, which the loss reuses. The
        # reference pass that may follow stays over the full vocabulary (the KL is the truncated policy's
        # to the reference; the policy's thresholds say nothing about the reference's logits).
        replay_now = self._replaying and self._replayed is None
        all_logps, all_entropies, all_thresholds = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            hidden = self._completion_hidden_states(model, ids, mask, logits_to_keep)
            with self._gathered_head(model), _fp32_logits(hidden):
                weight, bias = self._lm_head(model)
                hidden = hidden.to(weight.dtype)
                if replay_now:
                    all_thresholds.append(replayed_thresholds(
                        hidden, weight, bias, self.logit_transform, self.temperature, self.top_k or 0,
                        1.0 if self.top_p is None else self.top_p, self.min_p or 0.0))
                threshold = all_thresholds[-1] if replay_now else None
                logps, entropy = token_logprobs(
                    hidden, weight, ids[:, -logits_to_keep:], bias=bias, temperature=self.temperature,
                    backend=self.loss_backend, completion_mask=mask[:, -logits_to_keep:], return_entropy=True,
                    chunk_size=self.loss_chunk_size, logit_threshold=threshold, **self.logit_transform.loss_keywords(),
                )
            all_logps.append(logps)
            all_entropies.append(entropy)
        if replay_now:
            self._replayed = torch.cat(all_thresholds)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None

    def _replays_truncation(self) -> bool:
        """Whether this batch's log-probs replay the sampler's truncation: vLLM sampled with top-k /
        top-p / min-p and its importance-sampling correction is on (where TRL's ratio is otherwise the
        kept mass; TRL then always runs the policy's old-log-prob pass first, which the thresholds come
        from). The off-policy mask alone is not replayed: TRL may skip that pass then."""
        return (self.replay_truncation and self.use_vllm and self.vllm_importance_sampling_correction
                and truncates(self.top_k or 0, 1.0 if self.top_p is None else self.top_p, self.min_p or 0.0))

    def _generate_and_score_completions(self, inputs):
        self._replaying, self._replayed = self._replays_truncation(), None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._replaying = False
        if self._replayed is not None:
            output["logit_thresholds"] = self._replayed
        self._replayed = None
        return output

    def _loss_config(self, inputs, mode: str, accumulation: float = 1.0) -> GRPOLossConfig:
        num_items_in_batch = None
        if self.loss_type in _TOKEN_NORMALISED:
            # TRL's normaliser: the generation batch's active tokens, per process, rescaled to one
            # accumulation window (grpo_loss then returns loss / this, already accumulation-scaled).
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            num_items_in_batch = float(normaliser)
        # TRL's bonus is the mean entropy over the accumulation steps; the other loss types are
        # divided by them as a whole after the call
        entropy_coef = self._entropy_coefficient()
        if self.loss_type in _TOKEN_NORMALISED:
            entropy_coef = entropy_coef / accumulation
        args = self.args
        return GRPOLossConfig(
            loss_type=self.loss_type,
            beta=self.beta,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=args.delta,
            temperature=self.temperature,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.loss_chunk_size,
            kl_bias_correction=bool(getattr(args, "use_bias_correction_kl", False)),
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos,
            vespo_lambda_pos=args.vespo_lambda_pos,
            vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg,
            entropy_coef=entropy_coef,
            top_entropy_quantile=self.top_entropy_quantile,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            **self.logit_transform.loss_keywords(),
        )

    def _log_loss_metrics(self, output, mask, mode: str) -> None:
        """TRL's loss metrics and reductions: masked means over every process's tokens (or sequences,
        for per-sequence quantities), nanmin / nanmax of per-sequence clip fractions."""
        metrics = output.metrics
        tokens = mask.sum().float()
        sequences = torch.tensor(float(mask.shape[0]), device=mask.device)
        per_sequence = self.importance_sampling_level == "sequence"

        def global_mean(name: str, count: torch.Tensor) -> None:
            local = torch.stack([metrics[name].float() * count, count])
            totals = self.accelerator.reduce(local, reduction="sum")
            self._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())

        if self.beta != 0.0:
            global_mean("kl", tokens)
        global_mean("entropy", tokens)
        count = sequences if per_sequence else tokens
        if self.loss_type == "cispo":
            global_mean("cispo_clip_ratio", count)
        elif self.loss_type == "vespo":
            global_mean("vespo/phi_seq_mean", sequences)
        elif self.loss_type != "sapo":
            for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
                global_mean(name, count)
            gathered = self.accelerator.gather(metrics["clip_ratio/low_min"].float().reshape(1))
            self._metrics[mode]["clip_ratio/low_min"].append(_nan_reduce(gathered, torch.min))
            gathered = self.accelerator.gather(metrics["clip_ratio/high_max"].float().reshape(1))
            self._metrics[mode]["clip_ratio/high_max"].append(_nan_reduce(gathered, torch.max))


def _fp32_logits(hidden: torch.Tensor):
    """The fused head's matmuls with autocast off, so that its logits are fp32 products of the hidden
    states and the head's weight as stored, whatever context the loss is called in. Under mixed precision
    the backbone ran in autocast's dtype and TRL's fused head rounds each logit tile to it; grpo-fast does
    not (the same hidden states, fp32 logits: TRL's numbers within that rounding)."""
    return torch.autocast(hidden.device.type, enabled=False)


def _nan_reduce(values: torch.Tensor, reduce) -> float:
    kept = values[~torch.isnan(values)]
    return float("nan") if kept.numel() == 0 else reduce(kept).item()


def _raise_if_unsupported(args: GRPOConfig) -> None:
    problems = unsupported_options(args)
    if problems:
        raise ValueError("FusedGRPOTrainer does not support these GRPOConfig options: " + "; ".join(problems))


__all__ = ["FusedGRPOTrainer", "SUPPORTED_LOSS_TYPES", "unsupported_options"]
