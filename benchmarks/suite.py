"""One prepared GPU evidence run: every performance goal of grpo-fast measured by one command.

    python -m benchmarks.suite                                   # CUDA: the parts in 480 s
    python -m benchmarks.suite --out-dir "<folder>/{device}/{date}-suite" --commit <sha>  # a tree copied without .git
    python -m benchmarks.suite --plan                            # the steps, their estimates and budgets; runs nothing
    python -m benchmarks.suite --parts rollout-8,train-7b-trl --out-dir benchmarks/results/<device>/<date>-suite
    python -m benchmarks.suite --tiny                            # CPU smoke run: tiny shapes, every step (~3 min)

Parts, in order; each is one or more steps, each step one existing benchmark script (or pytest):
  1. tests    `pytest -m gpu -q`: the compiled kernels and the CUDA-only paths; each test's outcome
  2. loss     `benchmarks.loss` on Qwen2.5-7B's head (H=3584, V=152064), bf16, 16,384 and 4,096
              tokens, fwd+bwd and no-grad log-probs; providers reference, torch, triton,
              triton_on_chip, liger, trl; a same-run bf16 matmul rate. Steps loss-flat, loss-peaked.
              loss-peers (GPU only, on time left over): the shape peers publish, H=4096, V=128256
              (Llama-3-8B's head), bf16, trained head, fwd+bwd at 8,192 and 16,384 tokens: triton,
              liger, trl, to set beside published H200 figures (a cross-run comparison).
  3. nf4      `benchmarks.nf4`: the fused NF4 decode matmul vs bitsandbytes vs bf16 on the decode
              step's launches (q/k/v and gate/up grouped with LoRA r16, o, down), then k/v and
              gate/up alone, 1-64 rows, against a same-run copy bandwidth, beside the static
              kernel report's ceilings.
  4. rollout  `benchmarks.rollout` on Qwen2.5-7B's shape in NF4 + LoRA r16: engine vs HF generate
              at 64 sequences (rollout-64), then 8 (rollout-8); HF's forced length is shortened
              when 512 tokens would not fit the step's budget (the notes say so).
  5. train    `benchmarks.train`, 8 generations x 512 tokens, prompts of 128: the 7B NF4 + LoRA step
              with the engine (train-7b: peak allocated / reserved, time split), then grpo-fast
              (engine) vs TRL's GRPOTrainer vs TRL + FusedGRPOTrainer on Qwen2.5-0.5B's shape
              (train-0.5b), then TRL and TRL + FusedGRPOTrainer on 7B (train-7b-trl) if time is left.
  6. memory   the long-completion memory goals, one step each with grpo-fast's trainer sized to its
              budget (``max_memory_gb``): Qwen2.5-7B, 8 prompts x 8 x 4,096 tokens in 24 GiB
              (memory-7b-24), Llama-3.1-8B's shape, 8 x 20,480 tokens in 40 GiB (memory-8b-40). Long:
              they run on time left over, or alone (``--parts memory-8b-40 --budget-s 600``).

Each step runs in its own process (a subprocess, by default): the step's time limit can be enforced
by killing it (its whole process group: inductor's compile workers too), its CUDA memory, graphs and
compiled code are gone when the next step starts (a 7B model per step), and a crash (an illegal
memory access poisons the CUDA context) costs that step only. The price is the imports and CUDA
start of each process, a few seconds. ``--in-process`` calls each script's ``main(argv)`` in this
process instead, without time limits (for the CPU smoke test, where each import costs ~15 s).

Budget: ``--budget-s`` (480 on CUDA) is split between the parts; a part's deadline is the sum of the
budgets of the parts up to it, so time a part leaves unused passes to the next. Steps with a
nominal budget of 0 (loss-peaked, rollout-8, train-7b-trl) run on what their part has left, when
that covers their first result; the others when half of it is left (and may be stopped). A step over its
part's deadline is killed and recorded as ``timeout`` with what it had written: every script writes
a partial checkpoint (JSON + markdown) after each case, trainer or concurrency. A step whose peer
library is missing is recorded ``unavailable`` (the scripts do the same per provider).

Results, in ``benchmarks/results/<device>/<date>-suite/`` (``--out-dir``; "{device}" and "{date}"
are filled in): per step ``<step>.json`` (device, versions, commit, date, command, every figure),
``<step>.md``, ``<step>_*.png`` and ``<step>.log``; ``suite.json`` (plan, budgets, each step's
status and time, the goals) and ``summary.md``, both rewritten after every step, so a run cut short
still has them. A rerun with ``--parts`` into the same folder replaces those steps' records and
results and recomputes the summary from everything the folder holds.

Goals (``GOALS``; each line of summary.md says met, short or not measured, with the same-run ratio
and the case it was measured on; a goal measured on several cases is met only if every one meets it):
  - the gpu-marked tests all pass;
  - loss fwd+bwd at 16,384 tokens: <= 0.8x eager time, extra peak memory <= 5% of eager's,
    >= 60% of the same-run bf16 matmul rate, faster than Liger; no-grad log-probs <= 0.6x eager;
    issue 27: >= 90% of the same-run matmul rate and faster than TRL's default path;
  - the published shape (loss-peers): faster than each peer's published H200 time (PUBLISHED_PEERS),
    judged only when this run's GPU is an H200;
  - rollouts at 64 sequences: >= 10x HF generate tokens/s, >= 50% of the bandwidth limit;
  - the 7B NF4 step: peak allocated < 12 GiB; the step with the engine <= 0.5x TRL's step time;
  - the long-completion steps: peak allocated under their budgets (24 and 40 GiB).
A goal whose figures are missing (peer unavailable, step skipped or cut, peak memory on CPU) is
``not measured``, with the reason, never met.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import common
from .nf4 import DECODE_STEP as NF4_DECODE_STEP
# the evidence and the goals: reading the steps' results back (re-exported: the suite's names)
from .suite_goals import (GOALS, LONG_STEPS, LOSS_STEPS, OUTCOMES, PUBLISHED_PEERS, TEST_COLUMNS,  # noqa: F401
                          Evidence, Figure, Goal, evaluate, pytest_results, summary_markdown, tail, write_summary, write_tests_result)

if not torch.cuda.is_available():  # before triton is first imported (env_info), or in-process steps fail on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

PARTS = ("tests", "loss", "nf4", "rollout", "train", "memory")
DEFAULT_BUDGET_S = 480.0  # on CUDA: one device command may run 10 minutes, with the wheels to install first
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL this long after
MIN_START_S = 5.0  # no step starts with less of its part's time left
SUMMARY_RESERVE_S = 3.0  # kept back from the last deadline for writing the summary


def log(message: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# the plan: steps, their estimates and budgets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str  # results file stem and the name --parts takes
    part: str  # one of PARTS
    module: str  # "pytest" or a benchmarks module with main(argv)
    argv: tuple[str, ...]  # its arguments ("{out}" becomes the output folder)
    estimate_s: float  # expected seconds (GPU: estimated, see GPU_PLAN; --tiny: measured on 2 CPU cores)
    nominal_s: float  # seconds of the default budget it is funded with; 0: only what its part has left
    first_result_s: float  # seconds to its first checkpoint: see start_threshold
    needs: tuple[str, ...] = ()  # importable modules without which it cannot run at all


# GPU estimates (H200: ~790 TFLOP/s bf16 by matmul, ~4.8 TB/s), in seconds, each with the process's
# start (imports ~5 s, CUDA ~2 s) and the compiles it triggers. From FLOPs and bytes:
#  tests        collection 8 (20 here on 2 cores, 2.5x slower); Triton JIT of the loss kernels in
#               bf16/fp16 ~15; NF4 op under inductor, two modes ~12; engine test: a 2-layer model,
#               3 decode shapes compiled (compaction) ~25; trainer test: tiny model, several shapes,
#               2 steps ~30.                                                              => ~90
#  loss-flat    per measurement: warm-up + peak call + do_bench (5 estimate calls, 25 ms warm-up,
#               100 ms timed); at 16,384 tokens full = 4NHV = 3.6e13 FLOP: triton ~60 ms (0.6 s),
#               reference ~110 ms (1.1 s), torch ~150 ms (1.4 s), trl ~1.3 s, liger ~2 s; log-probs
#               2NHV at half that; 4,096 tokens at the do_bench floor (~0.3 s each): 26 measurements
#               ~14 s; Triton JIT ~8; Liger's torch.compile ~25; start + inputs ~12.        => ~60
#  loss-peaked  the same measurements with the kernels and Liger's graph cached.            => ~33
#  loss-peers   trained head 4096 x 128256: full = 6NHV = 2.6e13 FLOP at 8,192 tokens, 5.2e13 at
#               16,384; triton ~45 / ~90 ms (~0.5 / ~1 s a measurement), TRL ~2x, Liger ~150 / ~300
#               ms (~1.6 / ~3 s): ~10 s; inputs (off-policy log-probs) ~2; Triton JIT ~8; Liger's
#               torch.compile with a trained head ~25; start ~10.                           => ~55
#  logprob-accuracy  a float64 head built on the host (545M normal draws ~8 s, 256 least-squares
#               fits ~2 s), moved to the GPU; the float64 answer 256 x 3584 x 152064 ~0.3 s; the
#               paths' passes and JIT ~5; start ~9.                                         => ~25
#  nf4          6 shapes (4 Linears, 2 grouped launches with LoRA) x 5 row counts x 3 providers
#               at the do_bench floor (~0.25 s each: the kernels take 5-50 us: the 3.3 GB of 7B NF4
#               weights over 28 layers) ~23; weights made on the host and quantised ~10; JIT ~8;
#               start ~9.                                                                 => ~50
#  rollout-64   7B NF4 + LoRA built on the GPU ~12; decode step compiled with CUDA graphs for one
#               shape ~60 (dynamo + AOT of 28 LoRA layers took 60 s on this 2-core CPU with
#               aot_eager; a fast host ~25, plus inductor and Triton); one decode step reads ~4.5 GB
#               of weights + 1.4 GB of KV at 64 rows: >= 1.2 ms at 4.8 TB/s, ~2.5 ms at the 50%
#               goal, x 512 steps x 3 calls ~7; HF generate ~40 ms a step (launch-bound: ~2,000
#               kernels a token), (8 + 2 x 64) steps ~6; start ~9.                       => ~94
#  rollout-8    the same at 8 rows: compile ~45, engine ~4, HF ~30 ms x 136 ~4.          => ~73
#  train-7b     build ~14; engine compile ~60 (the decode shape of rollout-8: 8 rows, 640 cache);
#               2 steps: generation ~1.3 s, training 8 x 640 tokens with checkpointing ~3 s (3 x
#               2 x 7.6e9 x 5120 = 2.3e14 FLOP at ~50% MFU, plus NF4 dequantisation); start ~9. => ~91
#  train-0.5b   start ~9; engine: compile ~45 + 2 steps ~5; trl: 2 steps of HF generate at ~25 ms x
#               512 + ~1.5 s training ~28 + build/init ~5; trl_fused the same; the engine again with
#               bitsandbytes' layers (nf4_single_copy off, last) ~50.                   => ~179
#  train-7b-trl 2 trainers x (build ~15 + 2 steps x (512 x ~35 ms + ~4 s training)).     => ~127
#  memory-7b-24 build ~14; compile ~60; two waves (48 + 16 rows) x 4,096 decode steps at ~5 ms ~40;
#               training 64 x 4,352 tokens, checkpointed: 4 x 2 x 7.6e9 x 2.8e5 = 1.7e16 FLOP at
#               ~40% of the matmul rate ~55; start ~9.                                    => ~180
#  memory-8b-40 build ~15; the rollout's memory freed for training, so decoding without CUDA
#               graphs: 20,480 steps at ~25 ms (launch-bound) ~510; training 8 x 20,736 tokens
#               ~1e16 FLOP ~35; start ~9.                                                 => ~570
# The plan without the memory part is ~877 s (with it ~1,627), more than the default 480: the nominal budgets
# fund tests, loss-flat, nf4, rollout-64, train-7b and train-0.5b (~515 s estimated, so some of it may still be cut);
# loss-peaked, loss-peers, logprob-accuracy, rollout-8, train-7b-trl and the memory part run on time left over
# (--budget-s 1627 funds every step at its nominal budget or estimate; or rerun them with --parts into the same folder).
GPU_PLAN = {
    # name: (estimate_s, nominal_s, first_result_s)
    "tests": (90, 85, 10),
    "loss-flat": (60, 65, 40),
    "loss-peaked": (33, 0, 25),
    "loss-peers": (55, 0, 45),
    "logprob-accuracy": (25, 0, 20),
    "nf4": (50, 42, 15),
    "rollout-64": (94, 96, 90),
    "rollout-8": (73, 0, 70),
    "train-7b": (91, 92, 85),
    "train-0.5b": (179, 100, 60),
    "train-7b-trl": (127, 0, 60),
    "memory-7b-24": (180, 0, 170),
    "memory-8b-40": (570, 0, 560),
}
# --tiny: seconds measured on a 2-core CPU shared with other jobs, each step a subprocess (~10 s of
# each is imports; --in-process roughly halves the total); funded ~2.5x (the load varies).
TINY_PLAN = {
    "tests": (5, 15, 3),
    "loss-flat": (22, 50, 5),
    "loss-peaked": (20, 45, 5),
    "logprob-accuracy": (15, 35, 5),
    "nf4": (10, 25, 5),
    "rollout-64": (12, 30, 5),
    "rollout-8": (12, 30, 5),
    "train-7b": (12, 30, 5),
    "train-0.5b": (16, 40, 5),
    "train-7b-trl": (15, 35, 5),
    "memory-7b-24": (12, 30, 5),
    "memory-8b-40": (12, 30, 5),
}
# The shape peers publish fused linear cross-entropy at (H=4096, V=128256: Llama-3-8B's head), trained head,
# fwd+bwd; GPU only: its cases are the published ones or nothing, and the tiny run has no stand-in for them.
PEERS_HEAD = "llama-3-8b"
PEERS_TOKENS = (8192, 16384)
PEERS_ARGV = ("--heads", PEERS_HEAD, "--tokens", ",".join(map(str, PEERS_TOKENS)), "--train-head", "--modes", "full",
              "--providers", "triton,liger,trl", "--padding", "none", "--off-policy")

# HF generate's forced length: the longest of these whose estimated time, (8 + 2 x length) steps at
# HF_STEP_S (one warm-up and two measured calls), is at most HF_SHARE of the rollout step's budget.
HF_LENGTHS = (512, 256, 128, 64, 32)
HF_STEP_S = {64: 0.040, 8: 0.030}  # 7B NF4 + LoRA, eager generate: ~2,000 kernel launches a token
HF_SHARE = 0.1


@dataclass(frozen=True)
class GoalCases:
    """Which rows of the results each goal reads (the goals' own cases on GPU; tiny stand-ins)."""

    loss_head: str
    loss_tokens: int
    rollout_concurrency: int
    memory_model: str  # the model of the peak-memory goal
    long_models: tuple[str, str]  # the models of memory-7b-24 and memory-8b-40
    models: tuple[str, str]  # train: the models of train-7b / train-7b-trl and of train-0.5b
    labels: tuple[str, str]  # how the summary names them
    nf4_shapes: tuple[str, ...]  # the NF4 goals' shapes: the decode step's launches (benchmarks.nf4.DECODE_STEP)


GPU_CASES = GoalCases("qwen2.5-7b", 16384, 64, "qwen2.5-7b", ("qwen2.5-7b", "llama-3.1-8b-shape"),
                      ("qwen2.5-7b", "qwen2.5-0.5b"), ("qwen2.5-7b", "qwen2.5-0.5b"), NF4_DECODE_STEP)
TINY_CASES = GoalCases("16x67", 32, 64, "tiny", ("tiny", "tiny"), ("tiny", "tiny"), ("tiny as 7B", "tiny as 0.5B"),
                       ("tiny_qo",))


def hf_length(budget_s: float, concurrency: int, cap: int) -> int:
    for length in HF_LENGTHS:
        if length <= cap and (8 + 2 * length) * HF_STEP_S.get(concurrency, 0.04) <= HF_SHARE * budget_s:
            return length
    return min(HF_LENGTHS[-1], cap)


def plan(tiny: bool) -> list[Step]:
    """Every step, in run order, with its arguments (rollout's "{hf_length}" is filled in by schedule)."""
    numbers = TINY_PLAN if tiny else GPU_PLAN
    bnb_on_gpu = () if tiny else ("bitsandbytes",)  # CPU runs never quantise (except nf4's own layers)
    # no -x: a failing test must not hide the outcome of the ones after it (each is a row of the result)
    tests = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", "{out}/tests.xml"]
    if tiny:  # every gpu-marked test lives there; collecting the whole suite costs ~15 s more on CPU
        tests.append("tests/test_gpu.py")
    loss = (["--quick", "--heads", "16x67", "--tokens", "32", "--seq-len", "16", "--min-reps", "1"] if tiny else
            ["--heads", "qwen2.5-7b", "--tokens", "16384,4096"])
    loss += ["--modes", "full,logprobs", "--providers", "reference,torch,triton,triton_on_chip,liger,trl",
             "--padding", "none", "--off-policy"]
    nf4 = []
    if tiny:
        nf4 = ["--tiny", "--shapes", "tiny_qo", "--rows", "2", "--warmup-ms", "1", "--rep-ms", "1", "--min-reps", "1"]
    rollout = ["--tiny", "--prompt-length", "4", "--completion-length", "4", "--reps", "1"] if tiny else []
    train = ["--warmup-steps", "1", "--steps", "1", "--num-generations", "8", "--prompt-length", "128",
             "--completion-length", "512"]
    if tiny:
        train = ["--warmup-steps", "1", "--steps", "1", "--num-generations", "2", "--prompt-length", "4",
                 "--completion-length", "4", "--micro-batch-size", "2"]
    big, small = ("tiny", "tiny") if tiny else ("qwen2.5-7b", "qwen2.5-0.5b")
    # the long-completion goals: (prompts, completion tokens, budget GiB, model); tiny: the same code
    long = {"memory-7b-24": (8, 4096, 24, "qwen2.5-7b"), "memory-8b-40": (1, 20480, 40, "llama-3.1-8b-shape")}
    if tiny:
        long = {"memory-7b-24": (2, 4, 1, "tiny"), "memory-8b-40": (1, 8, 1, "tiny")}

    def long_step(name):
        prompts, length, budget, model = long[name]
        return step(name, "memory", "benchmarks.train",
                    ["--model", model, "--trainers", "grpo_fast_engine", "--warmup-steps", "0", "--steps", "1",
                     "--prompts-per-step", str(prompts), "--num-generations", "2" if tiny else "8",
                     "--prompt-length", "4" if tiny else "256", "--completion-length", str(length),
                     "--micro-batch-size", "1", "--max-memory-gb", str(budget)], needs=bnb_on_gpu)

    def step(name, part, module, argv, needs=()):
        return Step(name, part, module, tuple(argv), *numbers[name], needs=tuple(needs))

    peers = [] if tiny else [step("loss-peers", "loss", "benchmarks.loss", PEERS_ARGV)]
    return [
        step("tests", "tests", "pytest", tests),
        step("loss-flat", "loss", "benchmarks.loss", loss),
        step("loss-peaked", "loss", "benchmarks.loss", loss + ["--peaked"]),
        *peers,
        step("logprob-accuracy", "loss", "benchmarks.logprob_accuracy",
             ["--tiny"] if tiny else ["--tokens", "256"]),
        step("nf4", "nf4", "benchmarks.nf4", nf4, needs=["bitsandbytes"]),
        step("rollout-64", "rollout", "benchmarks.rollout",
             rollout + ["--concurrency", "64", "--hf-completion-length", "{hf_length}"], needs=bnb_on_gpu),
        step("rollout-8", "rollout", "benchmarks.rollout",
             rollout + ["--concurrency", "8", "--hf-completion-length", "{hf_length}"], needs=bnb_on_gpu),
        step("train-7b", "train", "benchmarks.train", train + ["--model", big, "--trainers", "grpo_fast_engine"],
             needs=bnb_on_gpu),
        step("train-0.5b", "train", "benchmarks.train",
             # grpo_fast_engine_bnb last: when the step's time runs out, it is what goes, not TRL
             train + ["--model", small, "--trainers", "grpo_fast_engine,trl,trl_fused,grpo_fast_engine_bnb"],
             needs=bnb_on_gpu),
        step("train-7b-trl", "train", "benchmarks.train", train + ["--model", big, "--trainers", "trl,trl_fused"],
             needs=bnb_on_gpu + ("trl", "datasets")),
        long_step("memory-7b-24"),
        long_step("memory-8b-40"),
    ]


def select(steps: list[Step], names: Optional[list[str]]) -> list[Step]:
    """The steps of the named parts and the named steps, in plan order (all when names is None)."""
    if not names:
        return steps
    known = set(PARTS) | {s.name for s in steps}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--parts: expected names from {', '.join(PARTS)} or steps "
                         f"{', '.join(s.name for s in steps)}, got {', '.join(unknown)}")
    return [s for s in steps if s.part in names or s.name in names]


def schedule(steps: list[Step], budget_s: float, tiny: bool) -> tuple[list[Step], dict[str, float]]:
    """(the steps with their budgets filled in, each part's budget in seconds).

    Up to the selected steps' nominal sum, the nominal budgets are scaled to ``budget_s``; beyond
    it the surplus funds the zero-nominal steps, in proportion to their estimates, up to those;
    beyond that everything is scaled up alike."""
    nominal = sum(s.nominal_s for s in steps)
    extras = sum(s.estimate_s for s in steps if s.nominal_s == 0)
    if budget_s <= nominal:
        funded = {s.name: s.nominal_s * budget_s / nominal for s in steps}
    elif budget_s <= nominal + extras:
        funded = {s.name: s.nominal_s or s.estimate_s * (budget_s - nominal) / extras for s in steps}
    else:
        funded = {s.name: (s.nominal_s or s.estimate_s) * budget_s / (nominal + extras) for s in steps}
    filled = []
    for s in steps:
        argv = s.argv
        if "{hf_length}" in argv:
            concurrency = int(argv[argv.index("--concurrency") + 1])
            length = 2 if tiny else hf_length(funded[s.name] or s.estimate_s, concurrency, 512)
            argv = tuple(str(length) if a == "{hf_length}" else a for a in argv)
        filled.append(dataclasses.replace(s, argv=argv, nominal_s=funded[s.name]))
    parts: dict[str, float] = {}
    for s in filled:
        parts[s.part] = parts.get(s.part, 0.0) + s.nominal_s
    return filled, parts


# ----------------------------------------------------------------------------------------------
# running one step
# ----------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the suite: stop the running step, write the summary, exit (a
    BaseException, so that the scripts' `except Exception` around each measurement lets it through)."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def command(step: Step, out: Path, commit: Optional[str]) -> list[str]:
    argv = [a.replace("{out}", str(out)) for a in step.argv]
    if step.module == "pytest":
        return [sys.executable, "-m", "pytest", *argv]
    argv += ["--out-dir", str(out), "--name", step.name]
    if commit:  # recorded by the scripts where the checkout has no .git (a copied working tree)
        argv += ["--commit", commit]
    return [sys.executable, "-m", step.module, *argv]


def step_env(device: torch.device) -> dict:
    # GRPO_FAST_STRICT: a Triton kernel that fails to compile or launch is an error, not a silent fallback
    # to the torch path that would be measured (and reported) as the fused one
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRPO_FAST_STRICT="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.REPO_ROOT), env.get("PYTHONPATH")) if p)
    if device.type != "cuda":
        env.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run in the interpreter on CPU
    return env


def run_subprocess(cmd: list[str], log_path: Path, timeout_s: float, env: dict) -> tuple[str, Optional[int]]:
    """("ok" | "error" | "timeout", exit code). The step runs in its own session, so that a time-out
    kills its whole process group (compile workers included) and nothing of this process."""
    with open(log_path, "w") as log_file:
        log_file.write("$ " + " ".join(cmd) + "\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout_s, 0.1))
            return ("ok" if code == 0 else "error"), code
        except subprocess.TimeoutExpired:
            _kill(proc)
            return "timeout", None
        except BaseException:
            _kill(proc)
            raise


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def run_in_process(cmd: list[str], log_path: Path) -> tuple[str, Optional[int]]:
    """The script's main(argv) in this process (no time limit), its printed output into the log."""
    module = importlib.import_module(cmd[2])
    with open(log_path, "w") as log_file, contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
        print("$ " + " ".join(cmd) + "  (in process)", flush=True)
        try:
            module.main(cmd[3:])
            return "ok", 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            return ("ok" if code == 0 else "error"), code
        except Exception:  # noqa: BLE001 - a failing step is recorded, the suite goes on
            traceback.print_exc()
            return "error", 1


def start_threshold(step: Step) -> float:
    """Seconds a step needs left to be started: a step that cannot reach its first result would
    only spend time a later part could use. Funded steps are given the benefit of the doubt (half
    their estimated first result: the estimates are rough); leftover-only steps the full estimate."""
    return max(MIN_START_S, step.first_result_s * (0.5 if step.nominal_s > 0 else 1.0))


def missing_modules(step: Step) -> list[str]:
    return [name for name in step.needs if importlib.util.find_spec(name) is None]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"total seconds (default {DEFAULT_BUDGET_S:.0f} on CUDA; --tiny: the tiny plan's sum)")
    p.add_argument("--parts", type=common.comma_list, default=None,
                   help=f"parts ({', '.join(PARTS)}) and/or step names to run (default all)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run of every step")
    p.add_argument("--in-process", action="store_true",
                   help="call each script's main() in this process (no time limits; pytest still a subprocess)")
    p.add_argument("--plan", action="store_true", help="print the steps, estimates and budgets, run nothing")
    p.add_argument("--out-dir", default=None,
                   help='default benchmarks/results/{device}/{date}-suite ("-tiny" appended with --tiny)')
    p.add_argument("--commit", default=None, help="commit to record where the checkout has no .git")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s: expected > 0, got {args.budget_s}")
    try:
        select(plan(args.tiny), args.parts)
    except ValueError as exc:
        p.error(str(exc))
    return args


def out_folder(args, env: dict) -> Path:
    template = args.out_dir or str(common.RESULTS_DIR / "{device}" / ("{date}-suite" + ("-tiny" if args.tiny else "")))
    return Path(template.replace("{device}", env["device_slug"]).replace("{date}", env["date_utc"][:10]))


def print_plan(steps: list[Step], parts: dict[str, float], budget_s: float, out: Path, commit: Optional[str]) -> None:
    log(f"plan: {len(steps)} steps, budget {budget_s:.0f} s (estimated {sum(s.estimate_s for s in steps):.0f} s), "
        f"results in {out}")
    for s in steps:
        log(f"  {s.part:>7} {s.name:<13} estimate {s.estimate_s:5.0f} s, funded {s.nominal_s:5.0f} s "
            f"(part {parts[s.part]:.0f} s): {' '.join(command(s, out, commit)[2:])}")


def load_state(out: Path) -> dict:
    try:
        state = json.loads((out / "suite.json").read_text())
        return state if isinstance(state.get("steps"), dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    started = time.monotonic()
    env = common.env_info(device, None if argv is None else [__file__, *argv])
    if env["git_commit"] is None and args.commit:
        env["git_commit"] = args.commit
    out = out_folder(args, env)
    steps = select(plan(args.tiny), args.parts)
    budget_s = args.budget_s or (DEFAULT_BUDGET_S if not args.tiny else sum(s.nominal_s for s in plan(True)))
    steps, part_budgets = schedule(steps, budget_s, args.tiny)
    print_plan(steps, part_budgets, budget_s, out, args.commit)
    if args.plan:  # also on a machine without CUDA: the GPU plan, to read before a device session
        return {"plan": [dataclasses.asdict(s) for s in steps], "part_budgets": part_budgets}
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("benchmarks.suite: the evidence run needs a CUDA device; --tiny runs every step at tiny "
                         "shapes on CPU (--plan prints the GPU plan anywhere)")
    out.mkdir(parents=True, exist_ok=True)

    previous = load_state(out)
    state = {
        "benchmark": "suite",
        "env": env,
        "settings": {"tiny": args.tiny, "budget_s": budget_s, "parts": args.parts, "in_process": args.in_process},
        "plan": [dataclasses.asdict(s) for s in plan(args.tiny)],  # every step, so the summary lists all
        "part_budgets": {**previous.get("part_budgets", {}), **part_budgets},
        "steps": previous.get("steps", {}),
        "invocations": previous.get("invocations", []) + [{"command": env["command"], "date_utc": env["date_utc"],
                                                          "budget_s": budget_s}],
    }
    for record in state["plan"]:
        record["argv"] = next((list(s.argv) for s in steps if s.name == record["name"]), record["argv"])
    cases = TINY_CASES if args.tiny else GPU_CASES
    run_env = step_env(device)
    deadline_of = {}
    elapsed_budget = 0.0
    for part in PARTS:  # a part's deadline: the budgets of the parts up to it (unused time carries on)
        if part in part_budgets:
            elapsed_budget += part_budgets[part]
            deadline_of[part] = started + elapsed_budget
    final_deadline = started + budget_s - SUMMARY_RESERVE_S

    previous_handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    interrupted, current = False, None
    try:
        for step in steps:
            deadline = min(deadline_of[step.part], final_deadline)
            left = deadline - time.monotonic()
            record = {"status": None, "seconds": None, "note": None, "left_s": round(left, 1),
                      "command": " ".join(command(step, out, args.commit)[2:])}
            current = step
            missing = missing_modules(step)
            if missing:
                record.update(status="unavailable", note=f"not importable: {', '.join(missing)}")
            elif not args.in_process and left < start_threshold(step):
                record.update(status="skipped",
                              note=f"budget: {max(left, 0):.0f} s left in part {step.part}, its first result "
                                   f"needs ~{step.first_result_s:.0f} s")
            else:
                for stale in [*out.glob(f"{step.name}.*"), *out.glob(f"{step.name}_*.png")]:
                    stale.unlink()  # a rerun's results replace the previous run's, never mix with them
                record.update(run_step(step, out, args, run_env, deadline, env))
            earlier = state["steps"].get(step.name)
            if record["status"] in ("skipped", "unavailable") and earlier and (out / f"{step.name}.json").exists():
                # an earlier invocation's results stay, with their record: a skip measures nothing new
                record = {**earlier, "note": f"{earlier.get('note') or ''}; kept from an earlier invocation "
                                             f"(this one: {record['status']}, {record['note']})".lstrip("; ")}
            state["steps"][step.name] = record
            log(f"{step.name}: {record['status']}"
                + (f" in {record['seconds']:.1f} s" if record["seconds"] is not None else "")
                + (f" ({record['note']})" if record["note"] else ""))
            write_summary(state, out, cases)
    except Interrupted as exc:
        interrupted = True
        log(f"interrupted by {exc}: writing the summary")
        if current is not None:
            state["steps"][current.name] = {"status": "interrupted", "seconds": None, "note": f"by {exc}"}
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        state["invocations"][-1].update(used_s=time.monotonic() - started, interrupted=interrupted)
        write_summary(state, out, cases)
    log(f"summary: {out / 'summary.md'}")
    for goal in state["goals"]:
        log(f"  {goal['status']:>12}: {goal['text']} {goal['target']}: {goal['measured']}")
    if interrupted:
        raise SystemExit(130)
    return state


def run_step(step: Step, out: Path, args, run_env: dict, deadline: float, env: dict) -> dict:
    """Run one step to its deadline; its record: status (ok, error, timeout), seconds, a note."""
    cmd = command(step, out, args.commit)
    log_path = out / f"{step.name}.log"
    log(f"{step.name}: running (until the part's deadline, {deadline - time.monotonic():.0f} s)")
    began = time.monotonic()
    if args.in_process and step.module != "pytest":
        status, code = run_in_process(cmd, log_path)
    else:
        status, code = run_subprocess(cmd, log_path, deadline - time.monotonic(), run_env)
    seconds = time.monotonic() - began
    record = {"status": status, "seconds": round(seconds, 2), "exit_code": code, "note": None}
    if step.module == "pytest":
        counts = write_tests_result(out, env, cmd, status, seconds)["counts"]
        record["note"] = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no tests"
        if status == "error" and code == 5:  # pytest: no tests collected
            record["status"] = "ok"
        elif status == "error" and (counts["failed"] or counts["error"]):
            record["status"] = "failed"  # the tests ran and some failed: a result, not a crash of the step
        return record
    result = out / f"{step.name}.json"
    partial = None
    if result.exists():
        try:
            partial = bool(json.loads(result.read_text()).get("partial"))
        except (OSError, json.JSONDecodeError):
            partial = True
    if status == "ok" and partial is None:
        record.update(status="error", note="exited without writing its result")
    elif status != "ok":
        record["note"] = ("kept its checkpoint of the cases it finished" if partial else "no result written") + (
            f"; log: {tail(log_path, 1)[:200]}" if status == "error" else "")
        if partial:
            try:  # the plots a killed step never drew (the JSON is the record; this only renders it)
                common.render(result)
            except Exception as exc:  # noqa: BLE001 - a rendering failure must not stop the suite
                record["note"] += f"; not rendered: {type(exc).__name__}"
    return record


if __name__ == "__main__":
    main()
