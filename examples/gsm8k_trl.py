"""GSM8K with TRL's GRPOTrainer and grpo-fast's fused loss (FusedGRPOTrainer), LoRA on Qwen2.5.

    pip install 'grpo-fast[trl,math]'
    python examples/gsm8k_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 500 --output-dir runs/gsm8k-trl
    python examples/gsm8k_trl.py --model Qwen/Qwen2.5-7B-Instruct --load-in-4bit --max-steps 300

The recipe (grpo_fast.recipes): GSM8K questions as chat prompts with a system prompt asking for
<reasoning>/<answer> tags; rewards = answer correctness + strict format. Training is TRL's loop
with the loss computed by grpo_fast.grpo_loss from the hidden states; at the end the adapter is
evaluated with greedy decoding on a held-out slice of the test split (grpo_fast.evaluation).
Hyperparameters follow published GRPO-on-GSM8K LoRA runs (lr 1e-5 to 2e-5 with warm-up and cosine
decay, 8 completions per prompt, clip 0.2/0.28, no KL, grad-norm clip 0.1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--dataset", default="openai/gsm8k", help="Hub id or local folder/file with question/answer")
    parser.add_argument("--output-dir", default="runs/gsm8k-trl")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (bitsandbytes, CUDA)")
    parser.add_argument("--eval-examples", type=int, default=200)
    options = parser.parse_args()

    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_fast.evaluation import evaluate
    from grpo_fast.integrations.trl import FusedGRPOTrainer
    from grpo_fast.model import quantization_config
    from grpo_fast.recipes import gsm8k_reward_functions, load_gsm8k

    cuda = torch.cuda.is_available()
    model_kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if options.load_in_4bit:  # NF4, double quantisation, bf16 compute
        model_kwargs["quantization_config"] = quantization_config()
    model = AutoModelForCausalLM.from_pretrained(options.model, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(options.model)

    completions_per_step = options.prompts_per_step * options.num_generations
    args = trl.GRPOConfig(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        learning_rate=options.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, options.max_steps // 20),  # 5%: an int works on transformers 4 and 5
        adam_beta2=0.99,
        weight_decay=0.1,
        max_grad_norm=0.1,
        bf16=cuda,
        use_cpu=not cuda,  # a CPU smoke run with a tiny local model (tests/test_examples.py)
        per_device_train_batch_size=options.num_generations,  # one prompt's group per micro-batch
        gradient_accumulation_steps=completions_per_step // options.num_generations,
        num_generations=options.num_generations,
        max_completion_length=options.max_completion_length,
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        gradient_checkpointing=True,
        logging_steps=5,
        save_steps=100,
        report_to=[],
    )
    trainer = FusedGRPOTrainer(
        model=model,
        reward_funcs=gsm8k_reward_functions(),
        args=args,
        train_dataset=load_gsm8k(options.dataset, "train"),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=options.lora_rank, lora_alpha=2 * options.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    trainer.train()
    trainer.save_model(str(Path(options.output_dir) / "final"))

    held_out = load_gsm8k(options.dataset, "test", limit=options.eval_examples)
    result = evaluate(trainer.model, tokenizer, held_out, batch_size=32, max_new_tokens=options.max_completion_length,
                      output_path=Path(options.output_dir) / "eval.jsonl", progress=False)
    print(result.metrics())


if __name__ == "__main__":
    main()
