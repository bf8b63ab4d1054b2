"""FusedGRPOTrainer against trl.GRPOTrainer's own loss path: peak memory and time of one training
micro-step (policy forward + loss + backward) on the same batch, random weights, no downloads.

    python examples/trl_fused_vs_default.py --model qwen2.5-0.5b --batch 8 --completion-length 1024
    python examples/trl_fused_vs_default.py --model tiny --device cpu      # a smoke run

Both trainers get the same model weights (a Qwen2.5 architecture built from its published
config with random weights, so no download), the same batch and the same GRPOConfig; each
measures `compute_loss` + `backward` (median of --repeats after a warm-up) and the peak memory
allocated above the model and optimizer state. The losses must agree; the script prints one JSON
line per trainer. `--mode train` instead runs a few real TRL steps (generation included) and
reports TRL's own `step_time`. Random weights give a flat softmax; say so when quoting numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time

import torch

from grpo_fast.memory import KNOWN_SHAPES

# Published Qwen2.5 configs (config.json on the Hub, as grpo_fast.memory keeps them): nothing is downloaded.
ARCHITECTURES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    **{name: KNOWN_SHAPES[name] for name in ("qwen2.5-0.5b", "qwen2.5-1.5b")},
}


def byte_tokenizer():
    """A byte-level tokenizer built in code (TRL needs one; the measured batch is made of ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.add_special_tokens({"pad_token": "<pad>", "eos_token": "<eos>"})
    return tokenizer


def random_model(name: str, dtype: torch.dtype, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**ARCHITECTURES[name], max_position_embeddings=32768, rms_norm_eps=1e-6)
    return Qwen2ForCausalLM(config).to(dtype=dtype, device=device)


def make_trainer(cls, model, args, tokenizer):
    import datasets

    def constant_reward(prompts, completions, **columns):
        return [float(len(c) % 3) for c in completions]

    dataset = datasets.Dataset.from_dict({"prompt": ["Count: 1 2 3"] * 16})
    return cls(model=model, reward_funcs=[constant_reward], args=args, train_dataset=dataset, processing_class=tokenizer)


def make_batch(trainer, batch: int, prompt_length: int, completion_length: int, device: str):
    generator = torch.Generator().manual_seed(1)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(0, vocab, (batch, prompt_length), generator=generator)
    completion_ids = torch.randint(0, vocab, (batch, completion_length), generator=generator)
    lengths = torch.randint(completion_length // 2, completion_length + 1, (batch,), generator=generator)
    completion_mask = (torch.arange(completion_length)[None] < lengths[:, None]).long()
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(batch, generator=generator),
        "num_items_in_batch": completion_mask.sum().float(),
    }
    inputs = {key: value.to(device) for key, value in inputs.items()}
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            completion_length,
            batch_size=1,
        )
    inputs["old_per_token_logps"] = logps + 0.05 * torch.randn(logps.shape, generator=generator).to(device)
    return inputs


def measure_loss_step(trainer, inputs, repeats: int, device: str) -> dict:
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1

    def step():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach().float().item()

    loss = step()  # warm-up: kernels compiled, gradient buffers allocated
    model.zero_grad(set_to_none=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {"loss": loss, "step_ms": 1000 * statistics.median(times)}
    if cuda:
        row["peak_mib_above_model"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--mode", default="loss", choices=["loss", "train"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--completion-length", type=int, default=1024)
    parser.add_argument("--loss-type", default="dapo", choices=["dapo", "grpo", "bnpo", "dr_grpo"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args()

    import trl

    from grpo_fast.integrations.trl import FusedGRPOTrainer

    cuda = options.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = byte_tokenizer()
    for cls in (trl.GRPOTrainer, FusedGRPOTrainer):
        with tempfile.TemporaryDirectory() as output_dir:
            args = trl.GRPOConfig(
                output_dir=output_dir, report_to=[], bf16=cuda, use_cpu=not cuda, loss_type=options.loss_type,
                per_device_train_batch_size=options.batch, num_generations=options.batch,
                max_completion_length=options.completion_length, gradient_checkpointing=options.gradient_checkpointing,
                max_steps=3, logging_steps=1, save_strategy="no", disable_tqdm=True,
            )
            trainer = make_trainer(cls, random_model(options.model, dtype, options.device), args, tokenizer)
            if options.mode == "loss":
                inputs = make_batch(trainer, options.batch, options.prompt_length, options.completion_length,
                                    options.device)
                row = measure_loss_step(trainer, inputs, options.repeats, options.device)
            else:
                trainer.train()
                step_times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
                row = {"step_time_s": statistics.median(step_times[1:] or step_times)}
                if cuda:
                    row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row.update(trainer=cls.__name__, model=options.model, mode=options.mode, batch=options.batch,
                   prompt_length=options.prompt_length, completion_length=options.completion_length,
                   loss_type=options.loss_type, gradient_checkpointing=options.gradient_checkpointing,
                   device=torch.cuda.get_device_name() if cuda else "cpu", weights="random")
        print(json.dumps(row), flush=True)
        del trainer
        gc.collect()  # the next trainer measures its own peak, not this one's leftovers
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
