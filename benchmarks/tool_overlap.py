"""Tool execution overlapping decoding: the engine's decode steps per second while some rows wait on a tool.

    python -m benchmarks.tool_overlap                     # CPU: the tiny Qwen2 shape, 32 rows, 100 ms tool
    python -m benchmarks.tool_overlap --model qwen2.5-0.5b --rows 64

Two runs of ``RolloutEngine.generate`` on the same random-weight model and prompts, alternated
``--reps`` times (medians reported):

- **without tools**: ``turns=None``, EOS suppressed (every row decodes ``--max-new`` tokens);
- **with tools**: a ``TurnHandler`` whose tool sleeps ``--tool-ms`` in a thread pool and then
  appends ``--appended`` tokens; every EOS a row samples ends a turn and calls it. The lm_head is
  replaced by zero weights plus a bias, so every step samples EOS with the same probability p (the
  decode step's cost is unchanged); p is set from the first run's step time so that about
  ``--waiting`` of the rows are waiting on the tool at any time (reported as measured).

Rate: decode steps per second over the steps from 10% to 90% of ``--max-new`` (no row can finish
before then, so the batch is the same in both runs: what changes is only that some rows wait on a
tool, the host's turn bookkeeping at its syncs, and any wait when every row is paused). Steps are
timed as they return (on CUDA they are queued: the window's ends are off by at most the steps
between two host syncs). The ratio with/without tools is the figure; the issue's goal is >= 0.9.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import statistics
import time

import torch

from benchmarks import common
from benchmarks.models import EOS_ID, PAD_ID, SHAPES, build_random_model
from grpo_fast.engine import RolloutEngine
from grpo_fast.rollout import SamplingParams

class TimedEngine(RolloutEngine):
    """The engine, recording when each decode step returns."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.step_times: list[float] = []

    def _step_function(self, device):
        step = super()._step_function(device)

        def timed(*args):
            logits = step(*args)
            self.step_times.append(time.perf_counter())
            return logits

        return timed


class SleepingTool:
    """A ``TurnHandler``: every turn calls a tool that sleeps, then appends ``appended``."""

    def __init__(self, seconds: float, appended: list[int], workers: int):
        self.seconds, self.appended = seconds, appended
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.spans: list[tuple[float, float]] = []  # (called, returned) per tool call

    def turn_ended(self, row, completion_ids):
        called = time.perf_counter()

        def tool():
            time.sleep(self.seconds)
            self.spans.append((called, time.perf_counter()))
            return self.appended

        return self.pool.submit(tool)


def eos_head(model, probability: float) -> None:
    """The lm_head as zero weights and a bias: every step samples EOS with ``probability``."""
    head = model.lm_head
    vocab = head.out_features
    biased = torch.nn.Linear(head.in_features, vocab, bias=True, device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        biased.weight.zero_()
        biased.bias.zero_()
        biased.bias[PAD_ID] = -math.inf  # the pad token is never sampled
        biased.bias[EOS_ID] = math.log(probability * (vocab - 2) / (1 - probability))
    biased.requires_grad_(False)
    model.lm_head = biased


def window_rate(times: list[float], first: int, last: int) -> tuple[float, float, float, float]:
    """(steps per second, the same from the median step interval, start, end) over decode steps
    ``first`` .. ``last``. The median is robust to other processes' bursts on a shared CPU, but blind
    to rare long gaps (the host waiting while every row waits on a tool), which the mean counts."""
    median = statistics.median(b - a for a, b in zip(times[first:last], times[first + 1:last + 1]))
    return (last - first) / (times[last] - times[first]), 1.0 / median, times[first], times[last]


def waiting_fraction(spans, rows: int, start: float, end: float) -> float:
    """The share of row-time in [start, end] that rows spent waiting on the tool."""
    waited = sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)
    return waited / (rows * (end - start))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, choices=sorted(SHAPES),
                        help="shape (default: tiny on CPU, qwen2.5-0.5b on CUDA)")
    parser.add_argument("--rows", type=int, default=32, help="rows decoding together (num_generations x 4 prompts)")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--max-new", type=int, default=384, help="max_completion_length")
    parser.add_argument("--tool-ms", type=float, default=100.0)
    parser.add_argument("--waiting", type=float, default=0.25, help="target share of rows waiting on the tool")
    parser.add_argument("--appended", type=int, default=8, help="tokens a tool turn appends")
    parser.add_argument("--sync-every", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (1: steady timings on a CPU shared with other work)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out-dir", default=None, help='default benchmarks/results/<device>/')
    parser.add_argument("--name", default=None, help="file stem (default tool-overlap-<date>-<time>)")
    parser.add_argument("--commit", default=None, help="commit to record where the checkout has no .git")
    args = parser.parse_args(argv)
    if args.rows % 4:
        parser.error(f"--rows: expected a multiple of 4 (4 prompts), received {args.rows}")

    device = common.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = common.env_info(device, None if argv is None else [__file__, *argv])
    if env["git_commit"] is None and args.commit:
        env["git_commit"] = args.commit
    name = args.model or ("qwen2.5-0.5b" if device.type == "cuda" else "tiny")
    torch.manual_seed(0)
    model = build_random_model(SHAPES[name], device, load_in_4bit=False).eval()
    vocab = model.config.vocab_size
    prompts = torch.randint(2, vocab, (4, args.prompt_length), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(num_generations=args.rows // 4, max_completion_length=args.max_new,
                            eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID, top_k=0)
    plain = dataclasses.replace(params, min_completion_length=args.max_new)  # EOS suppressed
    first, last = args.max_new // 10, args.max_new * 9 // 10
    appended = list(range(2, 2 + args.appended))
    print(f"device: {common.device_name(device)} ({torch.get_num_threads()} torch threads); model {name}, "
          f"{args.rows} rows, {args.max_new} tokens, tool {args.tool_ms:.0f} ms, sync_every {args.sync_every}", flush=True)

    probability, rows = None, []
    for rep in range(args.reps + 1):  # rep 0 warms up (and sets p from the step time)
        engine = TimedEngine(sync_every=args.sync_every, seed=rep)
        engine.generate(model, prompts, plain)
        base, base_median, _, _ = window_rate(engine.step_times, first, last)
        if probability is None:
            # a row's cycle: the tool, then its appended tokens (a step each), ~1/p sampled steps and
            # ~sync_every steps between its EOS and the sync that offers it plus between the tool's
            # end and the sync that resumes it: p so that the tool takes --waiting of the cycle
            steps = args.tool_ms / 1000 * (1 - args.waiting) / args.waiting * base
            probability = 1.0 / max(2.0, steps - args.appended - args.sync_every)
            eos_head(model, probability)
        engine = TimedEngine(sync_every=args.sync_every, seed=rep)
        tool = SleepingTool(args.tool_ms / 1000, appended, workers=args.rows)
        output = engine.generate(model, prompts, params, turns=tool)
        with_tools, tools_median, start, end = window_rate(engine.step_times, first, last)
        waiting = waiting_fraction(tool.spans, args.rows, start, end)
        turns = sum(mask.count(0) for mask in output.tool_mask) / max(1, args.appended) / args.rows
        row = {"rep": rep, "steps_per_s_without_tools": base, "steps_per_s_with_tools": with_tools,
               "ratio": with_tools / base, "median_step_ratio": tools_median / base_median, "waiting": waiting,
               "tool_turns_per_row": turns, "eos_probability": probability}
        print(("warm-up " if rep == 0 else "") + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        if rep:
            rows.append(row)
    summary = {key: statistics.median(row[key] for row in rows) for key in rows[0] if key != "rep"}
    summary["rep"] = "median"
    rows.append(summary)
    print(f"device: {common.device_name(device)}, {torch.get_num_threads()} torch threads")
    print(f"decode steps/s without tools: {summary['steps_per_s_without_tools']:.1f}")
    print(f"decode steps/s with {summary['waiting']:.0%} of rows waiting on a {args.tool_ms:.0f} ms tool: "
          f"{summary['steps_per_s_with_tools']:.1f}")
    print(f"ratio: {summary['ratio']:.3f} (goal >= 0.9); from median step intervals: "
          f"{summary['median_step_ratio']:.3f}")
    payload = {
        "benchmark": "tool_overlap",
        "title": "Tool execution overlapping decoding: decode steps/s with and without tools",
        "env": env,
        "notes": [f"model {name} (random weights), {args.rows} rows, prompts of {args.prompt_length} tokens, "
                  f"{args.max_new} tokens per row, sync_every {args.sync_every}, {torch.get_num_threads()} torch threads; "
                  f"tool: sleeps {args.tool_ms:.0f} ms in a thread pool, appends {args.appended} tokens",
                  f"rate: decode steps/s over steps {first}..{last} (no row can finish before); waiting: the share "
                  f"of row-time in that window spent waiting on the tool; EOS sampled with probability p each step",
                  "without tools: turns=None, EOS suppressed; ratio = with / without (goal >= 0.9), per "
                  "repetition; ratio of median steps: the same from each run's median step interval (robust to "
                  "other processes' bursts, blind to rare long waits); the median row: medians of the columns"],
        "rows": rows,
        "columns": [["rep", "rep", "s"], ["steps_per_s_without_tools", "steps/s without tools", ".1f"],
                    ["steps_per_s_with_tools", "steps/s with tools", ".1f"], ["ratio", "ratio", ".3f"],
                    ["median_step_ratio", "ratio of median steps", ".3f"],
                    ["waiting", "rows waiting", ".1%"], ["tool_turns_per_row", "tool turns/row", ".1f"],
                    ["eos_probability", "p(EOS)", ".3f"]],
    }
    out_dir = common.results_dir(env, args.out_dir)
    written = common.write_results(payload, out_dir, args.name or common.default_stem("tool-overlap", env))
    print("wrote", ", ".join(str(p) for p in written.values() if p))
    return payload


if __name__ == "__main__":
    main()
