"""GRPO steps of the grpo-fast trainer on Qwen2.5-7B's architecture in 4-bit + LoRA: peak memory and time split.

    python -m benchmarks.trainer_gpu_7b --out benchmarks/results/trainer_7b.json     # one GPU (H100: ~5 min)
    python -m benchmarks.trainer_gpu_7b --tiny --out /tmp/trainer_tiny.json          # the same code path on CPU

Qwen2.5-7B's configuration (hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944,
vocab 152064, untied head) with random weights, built directly on the GPU with no checkpoint: the
embeddings, head and norms in bf16, each decoder block built in bf16 and its seven Linear layers
replaced by bitsandbytes NF4 ``Linear4bit`` (double quantisation, bf16 compute), one block at a
time so the bf16 copy of the whole model never exists. LoRA r=16 on every block Linear (peft),
gradient checkpointing, 8 generations per prompt, completions forced to 512 tokens
(``min_new_tokens``, so random weights cannot stop early), the fused loss (Triton on CUDA).

Prints each step's figures and writes JSON: the environment (device, versions, commit, command),
the settings, every step's record from the trainer's log (time split generation / scoring /
training, tokens per second, peak allocated and reserved memory) and their summary. Target: peak
memory under 12 GB, to fit a 16 GB consumer GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import env_info
from grpo_fast.config import GRPOConfig
from grpo_fast.rollout import hf_generate
from grpo_fast.trainer import train

QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(message: str) -> None:
    print(f"[trainer_gpu_7b {time.strftime('%H:%M:%S')}] {message}", flush=True)


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


def build_random_model(shape: dict, device: torch.device, load_in_4bit: bool):
    """Qwen2ForCausalLM with random weights: skeleton on the meta device, then each part built on ``device``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    config = Qwen2Config(**shape, attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    with default_dtype(dtype), torch.device(device):
        model.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_random_(model.model.embed_tokens)
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
            if index % 7 == 6 or index == config.num_hidden_layers - 1:
                log(f"built block {index + 1}/{config.num_hidden_layers}"
                    + (f", {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated" if device.type == "cuda" else ""))
    leftovers = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if leftovers:
        raise RuntimeError(f"model: parameters left on the meta device: {leftovers[:5]}")
    model.requires_grad_(False)
    if load_in_4bit:
        model.is_loaded_in_4bit = True  # read by peft to wrap Linear4bit with its 4-bit LoRA layer
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer over "<pad>", "<eos>", "t2" .. "t{V-1}" (prompts are space-separated tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{index}": index for index in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def even_token_reward(prompts, completions, completion_ids, **columns):
    """A cheap reward that differs between completions: the share of even token ids."""
    return [sum(token % 2 == 0 for token in ids) / max(1, len(ids)) for ids in completion_ids]


def forced_length_generate(model, prompt_ids, params):
    """hf_generate with EOS suppressed until max_completion_length: every completion is full length."""
    return hf_generate(model, prompt_ids, dataclasses.replace(params, min_completion_length=params.max_completion_length))


def summarise(history: list[dict]) -> dict:
    timed = history[1:] if len(history) > 1 else history  # the first step includes warm-up (Triton compiles)
    mean = lambda key: sum(record[key] for record in timed) / len(timed)  # noqa: E731
    peaks = [record["peak_memory_gb"] for record in history if record["peak_memory_gb"] is not None]
    reserved = [record.get("peak_memory_reserved_gb") for record in history if record.get("peak_memory_reserved_gb") is not None]
    return {
        "steps_timed": len(timed),
        "time_generation_s": mean("time/generation"),
        "time_scoring_s": mean("time/scoring"),
        "time_training_s": mean("time/training"),
        "time_step_s": mean("time/step"),
        "tokens_per_second": mean("tokens_per_second"),
        "peak_memory_allocated_gib": max(peaks) if peaks else None,
        "peak_memory_reserved_gib": max(reserved) if reserved else None,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 on CPU (or GPU): smoke-test the code path")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--completion-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--no-4bit", action="store_true", help="bf16 base weights (default: NF4 when CUDA is there)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("trainer_gpu_7b: the 7B run needs a CUDA device; use --tiny to smoke-test on CPU")
    shape = TINY if args.tiny else QWEN25_7B
    if args.tiny:
        args.prompt_length, args.completion_length = min(args.prompt_length, 16), min(args.completion_length, 16)
    load_in_4bit = not args.no_4bit
    log(f"device {device}, shape {'tiny' if args.tiny else 'Qwen2.5-7B'}, 4-bit {load_in_4bit}")

    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_random_model(shape, device, load_in_4bit)
    tokenizer = build_tokenizer(shape["vocab_size"])
    config = GRPOConfig(
        model="random-qwen2.5-7b" if not args.tiny else "random-tiny-qwen2",
        output_dir=tempfile.mkdtemp(prefix="trainer_gpu_7b-"),
        run_name="run",
        max_steps=args.steps,
        load_in_4bit=load_in_4bit,
        use_lora=True,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_target_modules=BLOCK_LINEARS,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        prompts_per_step=args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.completion_length,
        micro_batch_size=args.micro_batch_size,
        beta=args.beta,
        num_iterations=args.num_iterations,
        optimizer=args.optimizer,
        learning_rate=1e-5,
        reward_functions=["benchmarks.trainer_gpu_7b:even_token_reward"],
        progress_bar=False,
        plot=False,
        sample_every=0,
        save_every=0,
    )
    from grpo_fast.model import prepare_for_training

    model = prepare_for_training(model, config)
    lora_layers = sum(type(module).__module__.endswith("lora.bnb") for module in model.modules())
    log(f"model ready in {time.perf_counter() - started:.1f}s; 4-bit LoRA layers: {lora_layers}"
        + (f"; {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated" if device.type == "cuda" else ""))
    if load_in_4bit and lora_layers != shape["num_hidden_layers"] * len(BLOCK_LINEARS):
        raise RuntimeError(f"peft: expected {shape['num_hidden_layers'] * len(BLOCK_LINEARS)} 4-bit LoRA layers, "
                           f"received {lora_layers}")
    model_memory = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None

    generator = random.Random(0)
    rows = [{"prompt": " ".join(f"t{generator.randrange(2, shape['vocab_size'])}" for _ in range(args.prompt_length))}
            for _ in range(16)]
    result = train(config, model=model, tokenizer=tokenizer, dataset=rows, reward_functions=[even_token_reward],
                   generate=forced_length_generate)
    for record in result.history:
        log(f"step {record['step']}: generation {record['time/generation']:.1f}s, scoring {record['time/scoring']:.2f}s, "
            f"training {record['time/training']:.1f}s, completion length {record['completions/mean_length']:.0f}, "
            f"peak {record['peak_memory_gb']} GiB allocated, {record.get('peak_memory_reserved_gb')} GiB reserved")
        if record["completions/min_length"] != args.completion_length:
            raise RuntimeError(f"completions: expected {args.completion_length} tokens each, "
                               f"received min {record['completions/min_length']}")

    payload = {
        "benchmark": "trainer_gpu_7b",
        "env": env_info(device, ["benchmarks/trainer_gpu_7b.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {**vars(args), "model_shape": shape, "load_in_4bit": load_in_4bit,
                     "loss_backend": config.loss_backend, "gradient_checkpointing": config.gradient_checkpointing},
        "model_memory_allocated_gib": model_memory,
        "summary": summarise(result.history),
        "steps": result.history,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    log(f"summary: {json.dumps(payload['summary'])}")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
