"""Random-weight models and the workload shared by the trainer benchmarks (no downloads).

A Qwen2.5 architecture from its published config.json, built with random weights directly on
the device: the embeddings, head and norms in the compute dtype, each decoder block built and,
for 4-bit runs, its seven Linear layers replaced by bitsandbytes NF4 ``Linear4bit`` (double
quantisation, bf16 compute) one block at a time, so the full-precision model never exists.
The workload: prompts of random word-level tokens, a cheap reward that differs between
completions, and a sampler that suppresses EOS so that every completion has the same length.

Used by ``benchmarks.train`` (grpo-fast against TRL) and ``benchmarks.trainer_gpu_7b``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Callable, Optional

import torch
from torch import nn

from grpo_fast.memory import KNOWN_SHAPES
from grpo_fast.rollout import hf_generate

# The published shapes (grpo_fast.memory.KNOWN_SHAPES: the models' config.json) with what building
# them needs besides; "tiny" is a small stand-in for CPU smoke runs.
_QWEN25 = dict(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False),
    **{name: dict(KNOWN_SHAPES[name], **_QWEN25) for name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")},
    # Llama-3.1-8B's dimensions in the Qwen2 architecture built here (q/k/v biases aside, the same
    # weights, KV cache and activations): the 8 x 20K-token memory goal
    "llama-3.1-8b-shape": dict(KNOWN_SHAPES["llama-3.1-8b"], max_position_embeddings=131072, rope_theta=5e5,
                               rms_norm_eps=1e-5),
}
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_ID, EOS_ID = 0, 1


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def init_random_(module: nn.Module, std: float = 0.02) -> None:
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Embedding)):
            nn.init.normal_(child.weight, std=std)
            if getattr(child, "bias", None) is not None:
                nn.init.zeros_(child.bias)


def quantise_linear(linear: nn.Linear, device: torch.device) -> nn.Module:
    """An NF4 Linear4bit (double quantisation, bf16 compute) holding ``linear``'s weights."""
    import bitsandbytes as bnb

    quantised = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
    quantised.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
    if linear.bias is not None:
        quantised.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    quantised = quantised.to(device)  # Params4bit quantises on its first move to a device
    if not quantised.weight.bnb_quantized:
        raise RuntimeError(f"Linear4bit on {device}: weights were not quantised")
    return quantised


def build_random_model(shape: dict, device: torch.device, load_in_4bit: bool,
                       log: Optional[Callable[[str], None]] = None):
    """Qwen2ForCausalLM with random weights: skeleton on the meta device, then each part built on ``device``
    (bf16 on CUDA, fp32 elsewhere), frozen; the caller adds LoRA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    config = Qwen2Config(**shape, attn_implementation="sdpa", pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                         bos_token_id=None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    with default_dtype(dtype), torch.device(device):
        model.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        init_random_(model.model.embed_tokens)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            init_random_(model.lm_head)
        model.model.norm = modeling_qwen2.Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        model.model.rotary_emb = modeling_qwen2.Qwen2RotaryEmbedding(config=config)
        for index in range(config.num_hidden_layers):
            block = modeling_qwen2.Qwen2DecoderLayer(config, index)
            init_random_(block)
            if load_in_4bit:
                for parent in (block.self_attn, block.mlp):
                    for name, child in list(parent.named_children()):
                        if isinstance(child, nn.Linear):
                            setattr(parent, name, quantise_linear(child, device))
            model.model.layers[index] = block
            if log is not None and (index % 7 == 6 or index == config.num_hidden_layers - 1):
                log(f"built block {index + 1}/{config.num_hidden_layers}"
                    + (f", {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated" if device.type == "cuda" else ""))
    leftovers = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if leftovers:
        raise RuntimeError(f"model: parameters left on the meta device: {leftovers[:5]}")
    model.requires_grad_(False)
    if load_in_4bit:
        model.is_loaded_in_4bit = True  # read by peft to wrap Linear4bit with its 4-bit LoRA layer
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer over "<pad>", "<eos>", "t2" .. "t{V-1}" (prompts are space-separated tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, **{f"t{index}": index for index in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """``count`` rows {"prompt": "t.. t.."} of exactly ``length`` tokens each under ``build_tokenizer``."""
    generator = random.Random(seed)
    return [{"prompt": " ".join(f"t{generator.randrange(2, vocab_size)}" for _ in range(length))}
            for _ in range(count)]


def even_token_reward(prompts, completions, completion_ids, **columns):
    """A cheap reward that differs between completions: the share of even token ids."""
    return [sum(token % 2 == 0 for token in ids) / max(1, len(ids)) for ids in completion_ids]


def forced_length_generate(model, prompt_ids, params):
    """hf_generate with EOS suppressed until max_completion_length: every completion is full length."""
    return hf_generate(model, prompt_ids, dataclasses.replace(params, min_completion_length=params.max_completion_length))


def forced_length_engine():
    """A Generate: grpo_fast's RolloutEngine with EOS suppressed until max_completion_length (one
    engine per run, so its compiled decode steps and KV cache persist across steps)."""
    from grpo_fast.engine import RolloutEngine

    engine = RolloutEngine()

    def generate(model, prompt_ids, params):
        return engine(model, prompt_ids, dataclasses.replace(params, min_completion_length=params.max_completion_length))

    generate.engine = engine  # for release()
    return generate
