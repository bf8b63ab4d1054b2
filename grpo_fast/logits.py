"""The model's logit transform: what some architectures do to the logits after the lm_head.

grpo-fast computes log-probs from the final hidden states and the lm_head weight,
``x = hidden @ W.T + b``, never from the model's own logits. Some models change ``x`` before
sampling from it (transformers' CausalLM forwards):

    Gemma 2, 3 (text), 4, VaultGemma, nanochat   z = c * tanh(x / c), c = final_logit_softcapping
    Cohere, Cohere 2 (and MoE)                   z = logit_scale * x
    Granite (dense, MoE, hybrid, SWA)            z = x / logits_scaling
    Falcon-H1                                    z = lm_head_multiplier * x
    HyperCLOVA X                                 z = logits_scaling * x
    MiniCPM3                                     z = x / logits_scaling (it divides the hidden state)
    MuseSpark                                    z = c * tanh(output_multiplier * x / c)

The sampled distribution is softmax(z / temperature), so the loss, the no-grad log-prob passes
and the rollout engine must all use the same z, or training optimises another distribution than
the one the model samples. ``logit_transform(model)`` reads it from the model's config (one
``LogitTransform``, passed to the loss as ``logit_scale`` / ``logit_softcap``); a model of another
family whose config sets a field that looks like a logit transform is refused, naming the field,
rather than trained on the wrong distribution. ``check_logits`` compares a model's own logits with
``transform.apply(head(hidden))``: the trainers run it once, which also catches what no config
field says (a per-vocabulary scale, hidden states the head does not read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


def _check_positive(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0{' or None' if optional else ''}, received {value!r}")


def check_logit_transform(logit_scale, logit_softcap) -> None:
    """The loss's keywords: ``logit_scale`` a finite number > 0, ``logit_softcap`` one or None."""
    _check_positive("logit_scale", logit_scale)
    _check_positive("logit_softcap", logit_softcap, optional=True)


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap * tanh(scale * x / softcap), or z = scale * x without a cap; x the raw logits."""

    scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self):
        _check_positive("scale", self.scale)
        _check_positive("softcap", self.softcap, optional=True)
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "softcap", None if self.softcap is None else float(self.softcap))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transformed logits, in fp32 at least (fp64 stays fp64); ``logits`` is not modified.
        The model's own order of operations: times the scale, then the cap."""
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def loss_keywords(self) -> dict:
        """``logit_scale`` / ``logit_softcap`` for ``GRPOLossConfig(...)`` and ``token_logprobs(...)``."""
        return {"logit_scale": self.scale, "logit_softcap": self.softcap}


IDENTITY = LogitTransform()


@dataclass(frozen=True)
class _Rule:
    """How a family's CausalLM forward reads its text config's fields."""

    scale: Optional[str] = None  # the logits are multiplied by this field
    divide: bool = False  # ... or divided by it
    softcap: Optional[str] = None  # then capped: c * tanh(z / c), no cap when the field is None


_GEMMA = _Rule(softcap="final_logit_softcapping")
_COHERE = _Rule(scale="logit_scale")
_GRANITE = _Rule(scale="logits_scaling", divide=True)

# By the model's (top-level) model_type, each checked against transformers' modeling code. Not
# "gemma3" (Gemma3ForConditionalGeneration): its forward does not cap, whatever its text config
# says, so a cap there is refused below rather than guessed either way.
FAMILIES: dict[str, _Rule] = {
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma4": _GEMMA,
    "gemma4_text": _GEMMA,
    "vaultgemma": _GEMMA,
    "nanochat": _GEMMA,
    "cohere": _COHERE,
    "cohere2": _COHERE,
    "cohere2_moe": _COHERE,
    "granite": _GRANITE,
    "granitemoe": _GRANITE,
    "granitemoeshared": _GRANITE,
    "granitemoehybrid": _GRANITE,
    "granite_swa": _GRANITE,
    "granitemoe_swa": _GRANITE,
    "falcon_h1": _Rule(scale="lm_head_multiplier"),
    "hyperclovax": _Rule(scale="logits_scaling"),
    # divides the final hidden state, which equals dividing the logits of a head without bias
    "minicpm3": _Rule(scale="logits_scaling", divide=True),
    "muse_spark": _Rule(scale="output_multiplier", softcap="final_logit_softcapping"),
}

# Families whose logits are transformed in a way a (scale, softcap) pair cannot express.
REFUSED = {
    "dory": "a learned per-token scale of the logits (lm_head.logit_scale)",
}

# Config fields that change the logits (or the head's input) in some architecture, with the values
# that leave them unchanged: a model outside FAMILIES that sets one otherwise is refused.
_SCALE_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier",
                 "logits_mup_width_multiplier")
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def _neutral(config, name: str, value) -> bool:
    if value is None:
        return True
    if name in _SOFTCAP_FIELDS:
        return False
    if name == "dim_model_base":  # MiniCPM: hidden states divided by hidden_size / dim_model_base
        return value == getattr(config, "hidden_size", None)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1


def _base_model(model):
    """Under peft's wrapper, the transformers model (its config and head)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _configs(model):
    config = _base_model(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config, text


def logit_transform(model) -> LogitTransform:
    """The transform ``model``'s forward applies to ``hidden @ lm_head.weight.T (+ bias)``.

    The identity for models that apply none (Llama, Qwen2, ...); the family's transform for those
    in ``FAMILIES``; a ValueError, naming the config field and its value, for any other model whose
    config sets a logit-transform field (grpo-fast does not know what its forward does with it)."""
    config, text = _configs(model)
    model_type = getattr(config, "model_type", None)
    name = type(_base_model(model)).__name__
    if model_type in REFUSED:
        raise ValueError(f"model: expected logits = hidden @ lm_head.weight.T (+ bias), optionally scaled or "
                         f"soft-capped, received a {model_type!r} model ({name}) with {REFUSED[model_type]}; "
                         "grpo-fast cannot compute its log-probs from the hidden states")
    text_prefix = "model.config" if text is config else "model.config.text_config"
    rule = FAMILIES.get(model_type)
    if rule is None:
        sources = [(config, "model.config")] + ([(text, text_prefix)] if text is not config else [])
        for source, prefix in sources:
            for field in _SCALE_FIELDS + _SOFTCAP_FIELDS + ("dim_model_base",):
                value = getattr(source, field, None)
                if not _neutral(source, field, value):
                    raise ValueError(
                        f"{prefix}.{field}: expected None (or a value that leaves the logits unchanged), received "
                        f"{value!r}; the logits of {name} (model_type {model_type!r}) are transformed in a way "
                        "grpo-fast does not know, so training would optimise another distribution than the model "
                        f"samples. Supported: {', '.join(sorted(FAMILIES))}")
        return IDENTITY
    scale = 1.0
    if rule.scale is not None:
        scale = _field(text, text_prefix, rule.scale, optional=False)
        if rule.divide:
            scale = 1.0 / scale
    softcap = None if rule.softcap is None else _field(text, text_prefix, rule.softcap, optional=True)
    if model_type == "minicpm3" and getattr(_base_model(model).get_output_embeddings(), "bias", None) is not None:
        raise ValueError(f"model.lm_head.bias: expected None ({name} scales the head's input, not its bias), "
                         "received a bias")
    return LogitTransform(scale=scale, softcap=softcap)


def _field(config, prefix: str, name: str, optional: bool):
    value = getattr(config, name, None)
    _check_positive(f"{prefix}.{name}", value, optional)
    return value


# --------------------------------------------------------------------------------------------
# The safety net: the model's own logits against the transform of its head's output
# --------------------------------------------------------------------------------------------


def logits_tolerance(dtype: torch.dtype) -> float:
    """Largest |difference| / max |logit| accepted: the model rounds its logits (and transforms them)
    in its own dtype, grpo-fast computes them in fp32."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype matmuls on ``device_type`` run in at this point (autocast's), or None outside autocast.
    Read inside the context a model's forward runs in: under mixed precision (fp32 weights, bf16 or
    fp16 autocast, HF Trainer's ``bf16=True`` / ``fp16=True``) its logits are fp32 tensors holding a
    bf16 or fp16 product, so their precision is this dtype, not theirs."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@torch.no_grad()
def check_logits(model, hidden: torch.Tensor, logits: torch.Tensor, transform: LogitTransform,
                 hidden_name: str = "the final hidden states", advice: str = "",
                 compute_dtype: Optional[torch.dtype] = None) -> None:
    """Raise unless ``logits`` (the model's own, [..., V]) equal ``transform.apply(lm_head(hidden))``
    within ``logits_tolerance``: else grpo-fast's log-probs would not be the model's.

    The tolerance is that of the least precise of the head's weight, ``hidden``, ``logits`` and
    ``compute_dtype``: the dtype the model's head product was computed in when it is not the tensors'
    (``autocast_dtype`` read where the forward ran). The expected logits are computed here in the
    head's dtype, outside any autocast."""
    head = _base_model(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    bias = None if bias is None else bias.to(weight.dtype)
    with torch.autocast(weight.device.type, enabled=False):
        expected = transform.apply(torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias))
    received = logits.float()
    error = ((expected - received).abs().max() / received.abs().max().clamp(min=1e-6)).item()
    dtypes = [weight.dtype, hidden.dtype, logits.dtype] + ([compute_dtype] if compute_dtype is not None else [])
    tolerance = max(logits_tolerance(dtype) for dtype in dtypes)
    if not error <= tolerance:  # NaN fails too
        computed = "" if compute_dtype is None else f", the model's head computed in {compute_dtype}"
        raise ValueError(
            f"model: expected logits = f({hidden_name} @ lm_head.weight.T (+ bias)) with f = {transform} (the "
            f"logit transform read from its config), received logits that differ by {error:.3g} (relative, "
            f"tolerance {tolerance:g}{computed}); grpo-fast cannot compute the log-probs of "
            f"{type(_base_model(model)).__name__} from its hidden states{advice}")


__all__ = ["FAMILIES", "IDENTITY", "LogitTransform", "autocast_dtype", "check_logit_transform", "check_logits",
           "logit_transform", "logits_tolerance"]
