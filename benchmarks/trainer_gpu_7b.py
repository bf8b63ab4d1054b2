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
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import env_info
from benchmarks.models import (BLOCK_LINEARS, SHAPES, build_random_model, build_tokenizer, even_token_reward,
                               forced_length_generate, random_prompts)
from grpo_fast.config import GRPOConfig
from grpo_fast.trainer import train

QWEN25_7B = SHAPES["qwen2.5-7b"]
TINY = SHAPES["tiny"]


def log(message: str) -> None:
    print(f"[trainer_gpu_7b {time.strftime('%H:%M:%S')}] {message}", flush=True)


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
    model = build_random_model(shape, device, load_in_4bit, log=log)
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
        reward_functions=["benchmarks.models:even_token_reward"],
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

    rows = random_prompts(16, args.prompt_length, shape["vocab_size"])
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
