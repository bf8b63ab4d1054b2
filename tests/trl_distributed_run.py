"""A short TRL run of a tiny saved model, for tests/test_trl_distributed.py, which launches it in two
processes (gloo): ``fused`` trains with grpo-fast's FusedGRPOTrainer, ``trl`` with trl.GRPOTrainer,
on the same model, data, seed and options. The main process writes the trained weights and TRL's
log history to the output folder.

    python -m torch.distributed.run --nproc_per_node 2 tests/trl_distributed_run.py fused MODEL_DIR OUT_DIR [zero3]

With ``zero3``: DeepSpeed ZeRO-3 (every parameter partitioned across the processes) and a LoRA adapter.
"""

import contextlib
import json
import sys
from pathlib import Path

import datasets
import torch
import trl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


PROMPTS = ["What is 2 + 3?", "Name a colour.", "Count to three:", "Say hi.", "Spell cat.", "Add 1 and 1.",
           "Pick a number.", "Name a fruit."]


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def main(kind: str, model_dir: str, out_dir: str, zero3: bool = False) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = model_dir
    args = trl.GRPOConfig(
        output_dir=str(Path(out_dir) / "run"), report_to=[], use_cpu=True, per_device_train_batch_size=4,
        num_generations=4, max_completion_length=8, max_steps=2, logging_steps=1, save_strategy="no",
        learning_rate=1e-2, disable_tqdm=True, seed=0, bf16=False, beta=0.04, loss_type="dapo", epsilon_high=0.28,
        num_iterations=2, top_entropy_quantile=0.5, entropy_coef=0.01,
        # ZeRO-3 partitions every parameter, the lm_head's too; LoRA keeps the head frozen
        deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "zero_optimization": {"stage": 3}} if zero3 else None,
    )
    common = dict(reward_funcs=[length_reward], args=args, train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                  processing_class=tokenizer)
    if zero3:
        from peft import LoraConfig

        common["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False)
    if kind == "fused":
        from grpo_fast.integrations.trl import FusedGRPOTrainer

        trainer = FusedGRPOTrainer(model=model, loss_backend="torch", **common)
    else:
        trainer = trl.GRPOTrainer(model=model, **common)
    trainer.train()
    save(trainer, Path(out_dir), zero3)


def save(trainer, out: Path, zero3: bool) -> None:
    """The main process writes the trainable weights (gathered by every process under ZeRO-3, where each
    holds a shard) and TRL's log history."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in trainable])
    with gather:
        weights = {name: p.detach().cpu().clone() for name, p in trainable}
    if trainer.accelerator.is_main_process:
        torch.save(weights, out / "weights.pt")
        (out / "log.json").write_text(json.dumps(trainer.state.log_history))
        (out / "processes.json").write_text(json.dumps(trainer.accelerator.num_processes))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], zero3=len(sys.argv) > 4 and sys.argv[4] == "zero3")
