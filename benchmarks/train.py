"""GRPO training steps: grpo-fast's trainer against TRL's GRPOTrainer on the same workload.

    python -m benchmarks.train                                           # GPU: 0.5B, 1.5B, 7B in NF4 + LoRA
    python -m benchmarks.train --model qwen2.5-0.5b --fit-budget 16,24   # + longest completion per memory budget
    python -m benchmarks.train --model tiny --steps 1                    # CPU smoke run

Trainers (one step each = one generation batch and one optimiser step, num_iterations=1):
  grpo_fast   grpo_fast.trainer.train: HF generate, fused loss on hidden states (Triton on CUDA)
  grpo_fast_engine   the same trainer sampling with grpo_fast.engine.RolloutEngine (its default on CUDA)
  grpo_fast_engine_bnb  the same with nf4_single_copy off: bitsandbytes' NF4 layers train (their
                     dequantisation) and the engine keeps its own repacked copy, as before issue 24
  trl         trl.GRPOTrainer (TRL's own loss path)
  trl_fused   grpo_fast.integrations.trl.FusedGRPOTrainer: TRL's loop with grpo-fast's fused loss

The same for all: a Qwen2.5 architecture with random weights built from its config
(``benchmarks.models``; NF4 base weights on CUDA, ``--no-4bit`` for bf16/fp32), the same LoRA
(r, alpha, every Linear of the blocks, seeded init: each trainer gets a fresh, identical model),
gradient checkpointing, the same prompts (random tokens, exactly --prompt-length each),
--num-generations completions per prompt forced to exactly --completion-length tokens (EOS
suppressed until then on both sides: ``min_new_tokens``), micro-batches of --micro-batch-size
(TRL: per_device_train_batch_size, with gradient accumulation over the generation batch), the
same loss options and optimiser settings (AdamW, constant learning rate).

Per trainer: the mean over the measured steps (after --warmup-steps) of the step time split into
generation / scoring / training (grpo-fast's trainer records these; TRL's are timed by a
subclass around its ``_generate`` and ``_calculate_rewards`` and a callback around the optimiser
step; "training" is the rest: log-prob passes, loss, backward, optimiser), completion tokens per
second, the CUDA allocator's peak allocated and reserved memory over a step (weights included),
and each figure's ratio to TRL's in the same run. On CPU there is no allocator to ask: peak
memory is None, and the process's maximum RSS so far is recorded instead (it accumulates over
everything run before in the process, so it is not a per-trainer peak).

--fit-budget 16,24 (GiB, CUDA only) then finds, per trainer and budget, the longest completion
length whose step fits: torch.cuda.set_per_process_memory_fraction caps the process at the
budget, lengths double from --fit-start until a step runs out of memory (or --fit-max), then
bisect down to --fit-resolution tokens; each probe is one step on a freshly built model. A
trainer whose step does not fit even at --fit-start is recorded with length None, not dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from grpo_fast.config import ROLLOUT_MEMORY, GRPOConfig

from . import common
from .models import (BLOCK_LINEARS, SHAPES, build_random_model, build_tokenizer, even_token_reward,
                     forced_length_engine, forced_length_generate, random_prompts)

TRAINERS = ("grpo_fast", "grpo_fast_engine", "grpo_fast_engine_bnb", "trl", "trl_fused")
BASELINE = "trl"
GPU_MODELS = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"]


def log(message: str) -> None:
    print(f"[benchmarks.train {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# the workload: one model configuration, one batch shape, one set of loss options
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    model: str  # a key of benchmarks.models.SHAPES
    load_in_4bit: bool  # NF4 block Linears (bitsandbytes); otherwise bf16 on CUDA, fp32 on CPU
    prompts_per_step: int
    num_generations: int  # completions per prompt (the group size)
    prompt_length: int  # tokens per prompt, exactly
    completion_length: int  # tokens per completion, exactly (EOS suppressed)
    micro_batch_size: int  # completions per forward/backward
    lora_r: int
    lora_alpha: int
    gradient_checkpointing: bool
    loss_type: str
    beta: float
    epsilon_low: float
    epsilon_high: float
    learning_rate: float
    seed: int
    max_memory_gb: Optional[float] = None  # grpo-fast's trainers: the budget they size themselves to
    rollout_memory: str = GRPOConfig.rollout_memory  # grpo-fast's trainers: keep | free | auto (GRPOConfig.rollout_memory)

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def completion_tokens(self) -> int:
        return self.batch_size * self.completion_length


def grpo_fast_config(work: Workload, output_dir: str, steps: int, single_copy: bool = True):
    return GRPOConfig(nf4_single_copy=single_copy,
        model=f"random-{work.model}", output_dir=output_dir, run_name="run", seed=work.seed, max_steps=steps,
        load_in_4bit=work.load_in_4bit, use_lora=True, lora_r=work.lora_r, lora_alpha=work.lora_alpha,
        lora_target_modules=BLOCK_LINEARS, gradient_checkpointing=work.gradient_checkpointing,
        prompts_per_step=work.prompts_per_step, num_generations=work.num_generations,
        max_completion_length=work.completion_length, micro_batch_size=work.micro_batch_size,
        max_memory_gb=work.max_memory_gb, rollout_memory=work.rollout_memory,
        loss_type=work.loss_type, beta=work.beta, epsilon_low=work.epsilon_low, epsilon_high=work.epsilon_high,
        num_iterations=1, learning_rate=work.learning_rate, lr_scheduler="constant", warmup_ratio=0.0,
        adam_beta2=0.999, weight_decay=0.0,  # transformers' AdamW defaults, as TRL's Trainer uses them
        reward_functions=["benchmarks.models:even_token_reward"],
        progress_bar=False, plot=False, sample_every=0, save_every=0,
    )


def trl_config(work: Workload, output_dir: str, steps: int, device: torch.device):
    import trl

    cuda = device.type == "cuda"
    return trl.GRPOConfig(
        output_dir=output_dir, report_to=[], use_cpu=not cuda, bf16=cuda, seed=work.seed, max_steps=steps,
        per_device_train_batch_size=work.micro_batch_size,
        gradient_accumulation_steps=work.batch_size // work.micro_batch_size,  # one generation batch per step
        num_generations=work.num_generations, max_completion_length=work.completion_length,
        generation_kwargs={"min_new_tokens": work.completion_length}, temperature=1.0, top_p=1.0, top_k=0,
        loss_type=work.loss_type, beta=work.beta, epsilon=work.epsilon_low, epsilon_high=work.epsilon_high,
        use_bias_correction_kl=False, num_iterations=1, learning_rate=work.learning_rate,
        lr_scheduler_type="constant", gradient_checkpointing=work.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
        disable_tqdm=True,
    )


def build_policy(work: Workload, device: torch.device, single_copy: bool = False):
    """(LoRA-wrapped random model, tokenizer): the same weights and adapter init on every call;
    ``single_copy``: NF4 layers in the repacked layout (grpo-fast's trainer default), else bitsandbytes'
    (what TRL trains)."""
    from grpo_fast.model import prepare_for_training

    shape = SHAPES[work.model]
    torch.manual_seed(work.seed)
    model = build_random_model(shape, device, work.load_in_4bit)
    model = prepare_for_training(model, grpo_fast_config(work, tempfile.gettempdir(), 1, single_copy))
    return model, build_tokenizer(shape["vocab_size"])


# ----------------------------------------------------------------------------------------------
# one trainer's steps, as uniform records
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_grpo_fast(work: Workload, model, tokenizer, device: torch.device, steps: int, engine: bool = False,
                  single_copy: bool = True) -> list[dict]:
    from grpo_fast.trainer import train

    with tempfile.TemporaryDirectory(prefix="bench-grpo-fast-") as output_dir:
        rows = random_prompts(max(16, work.prompts_per_step * steps), work.prompt_length,
                              SHAPES[work.model]["vocab_size"], seed=work.seed)
        generate = forced_length_engine() if engine else forced_length_generate
        try:
            result = train(grpo_fast_config(work, output_dir, steps, single_copy), model=model, tokenizer=tokenizer,
                           dataset=rows, reward_functions=[even_token_reward], generate=generate)
        finally:
            if engine:  # its KV cache and CUDA-graph pools must not count against the next trainer
                generate.engine.release()
                torch._dynamo.reset()
    return [{
        "generation_s": r["time/generation"], "scoring_s": r["time/scoring"], "training_s": r["time/training"],
        "step_s": r["time/step"], "completion_tokens": round(r["completions/mean_length"] * work.batch_size),
        "min_length": r["completions/min_length"], "max_length": r["completions/max_length"],
        "peak_allocated_gib": r["peak_memory_gb"], "peak_reserved_gib": r.get("peak_memory_reserved_gb"),
    } for r in result.history]


class StepClock:
    """Per optimiser step of a TRL trainer: wall time, time inside generation and reward scoring
    (added by ``TimedTRL``), completion lengths, and the CUDA allocator's peaks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.records: list[dict] = []
        self.current: Optional[dict] = None
        self.started = 0.0

    def begin(self) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.current = {"generation_s": 0.0, "scoring_s": 0.0, "lengths": []}
        self.started = time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        if self.current is not None:
            self.current[stage] += seconds

    def end(self) -> None:
        _sync(self.device)
        record, lengths = self.current, self.current.pop("lengths")
        record["step_s"] = time.perf_counter() - self.started
        record["training_s"] = record["step_s"] - record["generation_s"] - record["scoring_s"]
        record.update(completion_tokens=sum(lengths), min_length=min(lengths, default=0),
                      max_length=max(lengths, default=0))
        cuda = self.device.type == "cuda"
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30 if cuda else None
        self.records.append(record)
        self.current = None


class TimedTRL:
    """Mixed in before a TRL GRPOTrainer class: times its generation and reward scoring into
    ``self.step_clock`` (each override calls the parent's method unchanged)."""

    step_clock: StepClock

    def _timed(self, stage: str, method: Callable, *args):
        _sync(self.step_clock.device)
        started = time.perf_counter()
        out = method(*args)
        _sync(self.step_clock.device)
        self.step_clock.add(stage, time.perf_counter() - started)
        return out

    def _generate(self, prompts):
        out = self._timed("generation_s", super()._generate, prompts)
        if self.step_clock.current is not None:
            self.step_clock.current["lengths"].extend(len(ids) for ids in out[1])  # (prompt_ids, completion_ids, ...)
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return self._timed("scoring_s", super()._calculate_rewards, inputs, prompts, completions, completion_ids_list)


def run_trl(work: Workload, model, tokenizer, device: torch.device, steps: int, fused: bool) -> list[dict]:
    import datasets
    from transformers import TrainerCallback

    if fused:
        from grpo_fast.integrations.trl import FusedGRPOTrainer as base
    else:
        from trl import GRPOTrainer as base

    clock = StepClock(device)

    class Timed(TimedTRL, base):
        step_clock = clock

    class Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    rows = random_prompts(max(16, work.prompts_per_step * steps), work.prompt_length,
                          SHAPES[work.model]["vocab_size"], seed=work.seed)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as output_dir:
        trainer = Timed(model=model, reward_funcs=[even_token_reward], args=trl_config(work, output_dir, steps, device),
                        train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                        callbacks=[Callback()])
        try:
            trainer.train()
        finally:
            del trainer
    return clock.records


def run_steps(trainer: str, work: Workload, device: torch.device, steps: int) -> list[dict]:
    """Build a fresh policy and run ``steps`` steps of ``trainer`` on it."""
    model, tokenizer = build_policy(work, device, single_copy=trainer in ("grpo_fast", "grpo_fast_engine"))
    try:
        if trainer in ("grpo_fast", "grpo_fast_engine", "grpo_fast_engine_bnb"):
            return run_grpo_fast(work, model, tokenizer, device, steps, engine=trainer != "grpo_fast",
                                 single_copy=trainer != "grpo_fast_engine_bnb")
        return run_trl(work, model, tokenizer, device, steps, fused=trainer == "trl_fused")
    finally:
        del model
        common.free_memory(device)


# ----------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------


def process_max_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def _failure(exc: BaseException) -> dict:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return {"status": "oom" if common.is_oom(exc) else "error", "error": f"{type(exc).__name__}: {text}"}


def measure_trainer(trainer: str, work: Workload, device: torch.device, warmup: int, steps: int) -> dict:
    """One row: the mean of the measured steps' figures, or the failure (status oom / error / unavailable)."""
    row = {"model": work.model, "trainer": trainer, "status": "ok", "error": None, "steps_measured": 0,
           "completion_length": work.completion_length, "batch_size": work.batch_size}
    failure = None
    if device.type == "cuda":  # left over by an earlier trainer in this process (it would inflate this one's peak)
        common.free_memory(device)
        row["allocated_before_gib"] = torch.cuda.memory_allocated(device) / 2**30
    try:
        records = run_steps(trainer, work, device, warmup + steps)
    except ImportError as exc:
        row.update(status="unavailable", error=f"not importable: {exc}")
        return row
    except Exception as exc:  # noqa: BLE001 - an OOM or a failing trainer is a row, the run goes on
        failure = exc
    if failure is not None:
        row.update(_failure(failure))
        failure = None  # drop the traceback (and the tensors its frames hold) before freeing
        common.free_memory(device)
        return row
    measured = records[warmup:]
    mean = lambda key: sum(r[key] for r in measured) / len(measured)  # noqa: E731
    peak = lambda key: max((r[key] for r in records if r[key] is not None), default=None)  # noqa: E731
    row.update(
        steps_measured=len(measured),
        generation_s=mean("generation_s"), scoring_s=mean("scoring_s"), training_s=mean("training_s"),
        step_s=mean("step_s"), completion_tokens=mean("completion_tokens"),
        completion_tokens_per_s=mean("completion_tokens") / mean("step_s"),
        min_length=min(r["min_length"] for r in records), max_length=max(r["max_length"] for r in records),
        peak_allocated_gib=peak("peak_allocated_gib"), peak_reserved_gib=peak("peak_reserved_gib"),
        steps=records,
    )
    if row["min_length"] != work.completion_length or row["max_length"] != work.completion_length:
        row.update(status="error", error=f"completions: expected {work.completion_length} tokens each, received "
                                         f"{row['min_length']}..{row['max_length']}")
    return row


RATIOS = {"step_s": "step_vs_trl", "training_s": "training_vs_trl", "completion_tokens_per_s": "tokens_per_s_vs_trl",
          "peak_allocated_gib": "peak_allocated_vs_trl", "peak_reserved_gib": "peak_reserved_vs_trl"}


def add_ratios(rows: list[dict]) -> None:
    """Each trainer's figures over TRL's (same model, same run); None where either is missing."""
    base = {r["model"]: r for r in rows if r["trainer"] == BASELINE and r["status"] == "ok"}
    for row in rows:
        ref = base.get(row["model"])
        for key, ratio in RATIOS.items():
            ok = row["status"] == "ok" and ref is not None and row.get(key) is not None and ref.get(key)
            row[ratio] = row[key] / ref[key] if ok else None


# ----------------------------------------------------------------------------------------------
# the longest completion that fits a memory budget
# ----------------------------------------------------------------------------------------------


def fit_length(fits: Callable[[int], bool], start: int, maximum: int, resolution: int) -> tuple[Optional[int], bool]:
    """(longest length that fits, whether the search stopped at ``maximum``): doubling from
    ``start`` until a length does not fit, then bisection to ``resolution`` tokens. (None, False)
    when ``start`` does not fit."""
    good, bad, length = None, None, start
    while length <= maximum:
        if fits(length):
            good = length
            length *= 2
        else:
            bad = length
            break
    if good is None:
        return None, False
    if bad is None:  # doubling stepped past the maximum: probe the maximum itself
        if good == maximum or fits(maximum):
            return maximum, True
        bad = maximum
    while bad - good > resolution:
        middle = (good + bad) // 2 // resolution * resolution
        if middle <= good:
            break
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good, False


def fit_budget(trainer: str, work: Workload, device: torch.device, budget_gib: float, args) -> dict:
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = budget_gib * 2**30 / total
    probes: list[dict] = []

    def fits(length: int) -> bool:
        common.free_memory(device)
        torch.cuda.set_per_process_memory_fraction(min(fraction, 1.0), device)
        probe = {"completion_length": length}
        failure = None
        try:
            record = run_steps(trainer, dataclasses.replace(work, completion_length=length), device, 1)[0]
            probe.update(status="ok", peak_reserved_gib=record["peak_reserved_gib"], step_s=record["step_s"])
        except Exception as exc:  # noqa: BLE001
            failure = exc
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        if failure is not None:
            probe.update(_failure(failure))
            failure = None
            common.free_memory(device)
            if probe["status"] != "oom":
                raise RuntimeError(f"{trainer} at completion length {length}: {probe['error']}")
        probes.append(probe)
        log(f"fit {trainer} {work.model} {budget_gib:g} GiB, length {length}: {probe['status']}")
        return probe["status"] == "ok"

    row = {"model": work.model, "trainer": trainer, "budget_gib": budget_gib, "status": "ok", "error": None}
    if fraction > 1.0:
        row.update(status="not measured", error=f"budget above the device's {total / 2**30:.1f} GiB")
        return row
    try:
        length, capped = fit_length(fits, args.fit_start, args.fit_max, args.fit_resolution)
    except RuntimeError as exc:
        row.update(status="error", error=str(exc)[:300])
        length, capped = None, False
    row.update(max_completion_length=length, reached_fit_max=capped, probes=probes,
               fit_peak_reserved_gib=max((p["peak_reserved_gib"] for p in probes
                                          if p["status"] == "ok" and p["completion_length"] == length), default=None))
    if length is None and row["status"] == "ok":
        row.update(status="oom", error=f"does not fit at --fit-start {args.fit_start}")
    return row


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=common.comma_list, default=None,
                   help=f"comma-separated, from {', '.join(SHAPES)}; default the three Qwen2.5 models (CPU: tiny)")
    p.add_argument("--trainers", type=common.comma_list, default=[t for t in TRAINERS if t != "grpo_fast_engine_bnb"],
                   help=f"from {', '.join(TRAINERS)} (default: all but grpo_fast_engine_bnb)")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps run first and not measured (compiles, caches)")
    p.add_argument("--steps", type=int, default=2, help="measured steps (their mean is reported)")
    p.add_argument("--prompts-per-step", type=int, default=1)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=None, help="tokens per prompt (default 256; tiny 8)")
    p.add_argument("--completion-length", type=int, default=None, help="tokens per completion (default 512; tiny 16)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="completions per forward/backward "
                   "(default the whole batch); must divide prompts-per-step x num-generations")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=None, help="default 2 x lora-r")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--no-4bit", action="store_true", help="bf16 base weights (default NF4 on CUDA; CPU: never 4-bit)")
    p.add_argument("--loss-type", default="dapo", choices=["dapo", "grpo", "bnpo", "dr_grpo"])
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--epsilon-low", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=0.28)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="grpo-fast's trainers: the memory budget they size their rollout waves and micro-batches to "
                        "(GRPOConfig.max_memory_gb; the issue's goal configs)")
    p.add_argument("--rollout-memory", default=GRPOConfig.rollout_memory, choices=ROLLOUT_MEMORY,
                   help="grpo-fast's trainers: GRPOConfig.rollout_memory")
    p.add_argument("--fit-budget", type=lambda s: [float(t) for t in common.comma_list(s)], default=None,
                   help="comma-separated memory budgets in GiB (CUDA only): longest completion that fits each")
    p.add_argument("--fit-start", type=int, default=256, help="first completion length probed")
    p.add_argument("--fit-max", type=int, default=8192, help="longest completion length probed")
    p.add_argument("--fit-resolution", type=int, default=64, help="bisection stops at this many tokens")
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", default=None, help='default benchmarks/results/<device>/; "{device}" in it becomes the device slug')
    p.add_argument("--name", default=None, help="file stem (default train-<date>-<time>)")
    p.add_argument("--commit", default=None,
                   help="commit to record where the checkout has no .git (e.g. a copied working tree)")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    args.model = args.model or (GPU_MODELS if cuda else ["tiny"])
    bad = [m for m in args.model if m not in SHAPES]
    if bad:
        p.error(f"--model: expected names from {', '.join(SHAPES)}, got {', '.join(bad)}")
    bad = [t for t in args.trainers if t not in TRAINERS]
    if bad or not args.trainers:
        p.error(f"--trainers: expected names from {', '.join(TRAINERS)}, got {', '.join(bad) or 'none'}")
    tiny = args.model == ["tiny"]
    args.prompt_length = args.prompt_length or (8 if tiny else 256)
    args.completion_length = args.completion_length or (16 if tiny else 512)
    batch = args.prompts_per_step * args.num_generations
    args.micro_batch_size = args.micro_batch_size or batch
    args.lora_alpha = args.lora_alpha or 2 * args.lora_r
    args.load_in_4bit = cuda and not args.no_4bit
    for name in ("warmup_steps",):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    for name in ("steps", "prompts_per_step", "num_generations", "prompt_length", "completion_length", "lora_r",
                 "fit_start", "fit_max", "fit_resolution"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: expected > 0, got {getattr(args, name)}")
    if args.num_generations < 2:
        p.error(f"--num-generations: expected >= 2 (GRPO compares completions within a group), got {args.num_generations}")
    if args.micro_batch_size <= 0 or batch % args.micro_batch_size:
        p.error(f"--micro-batch-size: expected a divisor of prompts-per-step x num-generations = {batch}, "
                f"got {args.micro_batch_size}")
    if args.fit_budget is not None:
        if not cuda:
            p.error("--fit-budget: needs a CUDA device (the budget is enforced with "
                    "torch.cuda.set_per_process_memory_fraction); on CPU run without it")
        if not args.fit_budget or any(b <= 0 for b in args.fit_budget):
            p.error(f"--fit-budget: expected positive GiB values such as 16,24, got {args.fit_budget}")
        if args.fit_start > args.fit_max:
            p.error(f"--fit-start: expected <= --fit-max {args.fit_max}, got {args.fit_start}")
    return args


def workload(args, model: str) -> Workload:
    return Workload(
        model=model, load_in_4bit=args.load_in_4bit, prompts_per_step=args.prompts_per_step,
        num_generations=args.num_generations, prompt_length=args.prompt_length,
        completion_length=args.completion_length, micro_batch_size=args.micro_batch_size, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, gradient_checkpointing=not args.no_gradient_checkpointing,
        loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high,
        learning_rate=args.learning_rate, seed=args.seed, max_memory_gb=args.max_memory_gb,
        rollout_memory=args.rollout_memory,
    )


COLUMNS = [
    ["trainer", "trainer", "s"], ["status", "status", "s"], ["generation_s", "generation s", ".3f"],
    ["scoring_s", "scoring s", ".4f"], ["training_s", "training s", ".3f"], ["step_s", "step s", ".3f"],
    ["completion_tokens_per_s", "completion tok/s", ".1f"], ["peak_allocated_gib", "peak alloc GiB", ".2f"],
    ["peak_reserved_gib", "peak reserved GiB", ".2f"], ["step_vs_trl", "step ×TRL", ".2f"],
    ["tokens_per_s_vs_trl", "tok/s ×TRL", ".2f"], ["peak_allocated_vs_trl", "peak alloc ×TRL", ".2f"],
    ["allocated_before_gib", "allocated before GiB", ".2f"],
    ["process_max_rss_gib", "process max RSS GiB (cumulative)", ".2f"], ["error", "note", "s60"],
]
FIT_COLUMNS = [
    ["trainer", "trainer", "s"], ["status", "status", "s"], ["max_completion_length", "longest completion", "d"],
    ["reached_fit_max", "hit --fit-max", "s"], ["fit_peak_reserved_gib", "peak reserved GiB there", ".2f"],
    ["error", "note", "s60"],
]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    env = common.env_info(device, None if argv is None else [__file__, *argv])
    if env["git_commit"] is None and args.commit:
        env["git_commit"] = args.commit
    log(f"{env['device']}: models {', '.join(args.model)}, trainers {', '.join(args.trainers)}, "
        f"4-bit {args.load_in_4bit}")

    rows: list[dict] = []
    fit_rows: list[dict] = []
    out_dir = common.results_dir(env, args.out_dir)
    stem = args.name or common.default_stem("train", env)

    def save(partial: bool) -> tuple[dict, dict]:
        add_ratios(rows)
        payload = {
            "benchmark": "train",
            "title": "GRPO training step: grpo-fast vs TRL GRPOTrainer",
            "env": env,
            "settings": {k: v for k, v in vars(args).items()},
            "notes": notes(args, device),
            "group_by": ["model"],
            "columns": COLUMNS,
            "rows": rows,
            "tables": [{"title": "Longest completion that fits a memory budget", "group_by": ["model", "budget_gib"],
                        "columns": FIT_COLUMNS, "rows": fit_rows}] if args.fit_budget else [],
            "plot": {"kind": "bar", "x": "model", "series": "trainer",
                     "panels": [["peak_allocated_gib", "peak allocated (GiB)"],
                                ["completion_tokens_per_s", "completion tokens / s"]]},
        }
        return payload, common.write_results(payload, out_dir, stem, partial=partial)

    for model in args.model:
        work = workload(args, model)
        for trainer in args.trainers:
            row = measure_trainer(trainer, work, device, args.warmup_steps, args.steps)
            row["process_max_rss_gib"] = process_max_rss_gib() if device.type != "cuda" else None
            rows.append(row)
            log(f"{model} {trainer}: {row['status']} step {_short(row.get('step_s'), 's')} "
                f"(generation {_short(row.get('generation_s'), 's')}, training {_short(row.get('training_s'), 's')}), "
                f"peak {_short(row.get('peak_allocated_gib'), 'GiB')} {row.get('error') or ''}")
            save(partial=True)  # each finished trainer survives a run stopped on a time limit

    for budget in args.fit_budget or []:
        for model in args.model:
            for trainer in args.trainers:
                fit_rows.append(fit_budget(trainer, workload(args, model), device, budget, args))
                save(partial=True)
    payload, paths = save(partial=False)
    log(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plot(s)")
    return payload


def notes(args, device: torch.device) -> list[str]:
    weights = "NF4 (bitsandbytes, double quantisation, bf16 compute)" if args.load_in_4bit else (
        "bf16" if device.type == "cuda" else "fp32")
    adapters = ("; TRL (both trl rows) casts the LoRA weights of a 4-bit model to bf16, grpo-fast keeps peft's fp32 "
                "(weights, gradients and AdamW state: 16 vs 8 bytes per adapter weight, about 0.3 GiB apart on 7B at r=16; "
                "the LoRA products also run in bf16 there, in fp32 in grpo-fast)" if args.load_in_4bit else "")
    return [
        f"random weights (flat softmax), block Linears {weights}; LoRA r={args.lora_r} alpha={args.lora_alpha} on "
        f"{', '.join(BLOCK_LINEARS)}; gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}{adapters}",
        f"per step: {args.prompts_per_step} prompt(s) x {args.num_generations} generations, prompts of "
        f"{args.prompt_length} tokens, completions forced to {args.completion_length} tokens (EOS suppressed), "
        f"micro-batch {args.micro_batch_size}; loss {args.loss_type}, beta {args.beta}, epsilon "
        f"{args.epsilon_low}/{args.epsilon_high}, num_iterations 1",
        f"figures: mean of {args.steps} measured step(s) after {args.warmup_steps} warm-up step(s); training = step - "
        "generation - scoring (log-prob passes, loss, backward, optimiser)",
        "peak alloc / reserved: CUDA allocator maximum over a step, model weights included; '–' on CPU, where the "
        "process max RSS (cumulative over the whole run, not per trainer) is given instead; 'allocated before': "
        "CUDA memory still allocated when the trainer started (0 unless an earlier trainer leaked)",
        "×TRL: the figure divided by trl.GRPOTrainer's in the same run (step time and memory: lower is better; "
        "tokens/s: higher is better)",
    ]


def _short(value, unit):
    return f"{value:.3f} {unit}" if isinstance(value, (int, float)) and not math.isnan(value) else f"– {unit}"


if __name__ == "__main__":
    main()
