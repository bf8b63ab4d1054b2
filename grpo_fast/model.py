"""The policy: a Hugging Face causal LM (4-bit NF4 + LoRA, or full fine-tuning), and its hidden states.

The trainer never asks the model for logits (but once, ``check_model_logits``, to check its own
maths against them): ``completion_hidden_states`` runs the decoder (the model without its head)
and returns the final, normed hidden state at every position that predicts a completion token;
``grpo_fast.grpo_loss`` multiplies them by ``output_weight(model)`` chunk by chunk and applies the
model's logit transform (``grpo_fast.logits``). With peft the LoRA layers sit inside the decoder's
Linear modules, so the same call runs the adapted policy, and ``reference_policy(model)`` (the
adapter switched off) runs the reference without a second copy of the weights.

``build_tiny_model`` and ``tiny_tokenizer`` make the embedded demo's model in code (no download).
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import GRPOConfig, lora_enabled, nf4_single_copy, uses_tools
from .errors import one_line
from .logits import LogitTransform, check_logits

TINY_MODEL = "tiny"

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
)
# With tools: role markers, Hermes-style calls, a tool turn per result, each model turn ending at <eos>
# (prefix-preserving, as multi-turn rollouts need). The tools' schemas are not written: a character model
# would only read them as a long prompt.
TINY_TOOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}<|tool|>{{ message.content }}<eos>"
    "{% else %}<|{{ message.role }}|>{{ message.content }}"
    "{% for call in message.tool_calls or [] %}<tool_call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% if message.role == 'assistant' %}<eos>{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# --------------------------------------------------------------------------------------------
# The embedded demo's model and tokenizer
# --------------------------------------------------------------------------------------------


def tiny_call_text(name: str) -> str:
    """An argument-free call to tool ``name`` as ``TINY_TOOL_CHAT_TEMPLATE`` writes it."""
    return f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>'


def tiny_tokenizer(characters: str, *, tool_names: tuple[str, ...] | list[str] = ()):
    """A character-level tokenizer over ``characters`` plus <pad>, <eos> and <unk> (ids 0, 1, 2).

    With ``tool_names``: the tool-calling chat template, its role markers as tokens, and each named tool's
    argument-free call (``tiny_call_text``) as one token, so that a randomly initialised model samples calls
    (a call spelt out in characters it would never write by chance). Other calls are characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(characters)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    if tool_names:
        from tokenizers import AddedToken

        words = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"] + [tiny_call_text(name) for name in tool_names]
        tokenizer.add_tokens([AddedToken(word, normalized=False, special=False) for word in words])
        tokenizer.chat_template = TINY_TOOL_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """A small Llama with random weights sized to ``tokenizer`` (fp32, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_implementation(requested: str = "auto") -> str:
    """flash_attention_2 when the flash_attn package is importable (and CUDA is there), else sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def weights_dtype(config: GRPOConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and config.model != TINY_MODEL else torch.float32
    return getattr(torch, config.dtype)


def quantization_config(dtype: torch.dtype | str = torch.bfloat16):
    """NF4 with double quantisation: ~0.5 byte per base weight, dequantised for each matmul into the
    compute dtype, which follows the run's weights ``dtype``: fp16 for float16 (cards without bf16 run
    the whole forward in fp16), bf16 otherwise. float32 runs keep bf16 compute: NF4's rounding error
    is far larger than bf16's, and fp32 matmuls would be several times slower."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16 if dtype == torch.float16 else torch.bfloat16,
    )


def _from_pretrained(source: str, config: GRPOConfig, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = weights_dtype(config, device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attention_implementation(config.attn_implementation),
        "trust_remote_code": config.trust_remote_code,
    }
    if config.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model if config.load_in_4bit else model.to(device)


def hub_unreachable(repo_id: str, key: str, timeout_s: float = 3.0) -> str | None:
    """Why ``repo_id`` cannot be fetched, when the Hub cannot be reached (one short connection probe),
    else None. Without it, a hub id on a machine without network costs ~25 s of retries before
    Hugging Face's own error. In offline mode (HF_HUB_OFFLINE=1) the cache answers: no probe."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return None
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
        return None
    except OSError as error:
        reason = f"{type(error).__name__}: {one_line(error)}"
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    advice = ("it is in the local cache: set HF_HUB_OFFLINE=1 to use the cached copy" if cached else
              "download it where there is network (huggingface-cli download, or save_pretrained to a folder) and "
              "pass the local folder, or set HF_HUB_OFFLINE=1 if it is cached elsewhere (HF_HOME)")
    return (f"{key}: expected a hub id the Hugging Face Hub ({constants.ENDPOINT}) can serve, or a local folder, "
            f"received {repo_id!r} while the Hub cannot be reached ({reason}); {advice}")


def check_model_source(config, key: str = "model") -> None:
    """``model`` resolves before anything loads: "tiny", a local model (or peft adapter) folder, or a hub
    id whose config transformers can fetch (or finds in its cache); else a ValueError naming ``model``
    (``key``: the name to give it, e.g. ``--model`` for ``grpo-fast eval``)."""
    model = config.model
    if model == TINY_MODEL:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError(f"{key}: expected a model folder holding a config.json (or a peft adapter's "
                             f"adapter_config.json), received {model!r} without one")
        return
    if path.exists() or model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1:
        found = "a file" if path.exists() else "no such folder"
        raise ValueError(f"{key}: expected a local model folder or a hub id 'org/name', received {model!r} ({found})")
    unreachable = hub_unreachable(model, key)
    if unreachable:
        raise ValueError(unreachable)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, KeyError) as error:  # not found, offline, gated, unknown architecture
        raise ValueError(f"{key}: expected a hub id or local folder transformers can load, received {model!r} "
                         f"({type(error).__name__}: {one_line(error)})") from error


def _tiny_tool_names(config: GRPOConfig) -> list[str]:
    """The tools of ``config`` that the tiny model calls with one token: those without arguments."""
    if not uses_tools(config):
        return []
    from transformers.utils import get_json_schema

    from .agent import AgentRollouts

    agent = AgentRollouts.from_config(config)
    return [name for name, tool in agent.tools_by_name().items()
            if not get_json_schema(tool)["function"].get("parameters", {}).get("properties")]


def load_model(config: GRPOConfig, device: torch.device | None = None):
    """(policy, tokenizer) for ``config``: LoRA-wrapped when ``lora_enabled(config)``."""
    from transformers import AutoTokenizer

    from .tasks import ALPHABET, SEPARATOR

    device = device or default_device()
    if config.model == TINY_MODEL:
        tokenizer = tiny_tokenizer(ALPHABET + SEPARATOR, tool_names=_tiny_tool_names(config))
        model = build_tiny_model(tokenizer, seed=config.seed)
        if config.load_in_4bit:  # quantisation goes through from_pretrained: round-trip through a folder
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                model = _from_pretrained(folder, config, device)
        else:
            model = model.to(device=device, dtype=weights_dtype(config, device))
        # a model built in code has no source a saved adapter could name as its base (not the deleted
        # temporary folder; an empty name also keeps peft from looking it up on the hub at every save)
        model.name_or_path = model.config.name_or_path = ""
    else:
        tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
        model = _from_pretrained(config.model, config, device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model: expected a tokenizer with an EOS token, received {config.model!r} without one")
    model = prepare_for_training(model, config)
    return model, tokenizer


def prepare_for_training(model, config: GRPOConfig):
    """Gradient checkpointing and LoRA (or all weights trainable); with ``nf4_single_copy`` the NF4
    base weights then move to the repacked layout (``grpo_fast.nf4_train``; peft's layers unchanged)."""
    keep_nf4_layout_for_training(model)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (frozen embeddings are fine).
        # transformers 5.x renamed the method (the old name warns); older releases have only the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora_enabled(config):
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # "all-linear": every Linear (4-bit ones included) in the blocks, never the output head.
        target_modules=config.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if nf4_single_copy(config):  # after peft, which wraps bitsandbytes' layers (it knows no others)
        from .nf4_train import single_copy_nf4

        single_copy_nf4(model)
    return model


def keep_nf4_layout_for_training(model) -> int:
    """Stop bitsandbytes from repacking NF4 weights for its CPU inference kernel; returns the layers set.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a Linear4bit's weight in its first
    eval-mode no-grad forward; afterwards every forward, training ones included, runs a kernel with
    no autograd (gradients through the base weights are dropped; a bias even raises), and taking the
    module's state_dict re-quantises the weights. The trainer runs eval-mode passes (rollouts,
    log-probs) between training passes, so it keeps the standard layout."""
    count = 0
    for name, module in model.named_modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
                # undoing it re-quantises the weights (lossy): the model is no longer the one loaded
                raise ValueError(
                    f"model: expected NF4 layers in bitsandbytes' standard layout, received {name!r} repacked for "
                    "its CPU inference kernel (an eval-mode no-grad forward ran before training); load the model "
                    "again, or call grpo_fast.model.keep_nf4_layout_for_training(model) right after loading it")
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


# --------------------------------------------------------------------------------------------
# Hidden states for the loss
# --------------------------------------------------------------------------------------------


def output_weight(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head weight [V, H] and bias [V] (or None)."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def completion_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """[B, C, H] final hidden states at the positions that predict completion tokens.

    ``input_ids`` is ``[left-padded prompt (prompt_length) | right-padded completion (C)]``;
    positions count from each row's first real token, as ``generate`` numbers them.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    # Position t predicts token t + 1: the completion's C tokens are predicted by P-1 .. P+C-2.
    return hidden[:, prompt_length - 1 : -1]


@torch.no_grad()
def check_model_logits(model, transform: LogitTransform, num_tokens: int = 6) -> None:
    """Once before training: the model's own logits on a few tokens must be ``transform`` applied to
    the lm_head of ``completion_hidden_states``, or the fused log-probs would not be the model's.

    In eval mode (no dropout), so it first keeps NF4 weights in bitsandbytes' training layout
    (``keep_nf4_layout_for_training``): an eval-mode no-grad forward would repack them on CPU."""
    keep_nf4_layout_for_training(model)
    device = next(model.parameters()).device
    # ids spread over the vocabulary (the embedding may have fewer rows than a padded head)
    vocab = min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    input_ids = torch.linspace(0, vocab - 1, num_tokens, device=device).long()[None]
    attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        hidden = completion_hidden_states(model, input_ids, attention_mask, prompt_length=1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    finally:
        model.train(was_training)
    check_logits(model, hidden, logits, transform, hidden_name="the decoder's last_hidden_state")


@contextlib.contextmanager
def reference_policy(model) -> Iterator[None]:
    """Inside: ``model`` computes the reference policy (LoRA adapter switched off)."""
    if not is_peft_model(model):
        raise ValueError("model: expected a peft model for an in-place reference policy, received a plain model")
    with model.disable_adapter():
        yield
