"""What a run reports: per-step figures (JSONL, optional TensorBoard), a progress bar, samples, a plot.

Files under the run directory:

- ``log.jsonl``: one JSON object per step (keys below);
- ``samples.jsonl``: every ``sample_every`` steps, a few completions with their rewards;
- ``eval.jsonl``: every ``eval_every`` steps, each held-out prompt's greedy completion and rewards
  (the step's ``eval/...`` figures go to ``log.jsonl``);
- ``reward_length.png``: mean reward and mean completion length over steps (at the end);
- ``tensorboard/``: the same scalars, with ``tensorboard: true``.

Each line is on disk when ``log`` returns (``fsync``), so a crash can tear only the line being
written; a resumed run drops such a torn last line (and says so) with the records of steps after
its checkpoint. A damaged line elsewhere is an error naming the file and the line.

Per-step keys: ``reward/mean``, ``reward/std``, ``reward/<function>/mean|std``,
``frac_reward_zero_std`` (groups whose completions all scored the same: no signal),
``completions/mean_length|min_length|max_length``, ``completions/clipped_ratio`` (hit
max_completion_length), ``kl`` (beta > 0), ``entropy``, ``clip_ratio/low_mean|high_mean|region_mean``,
``loss``, ``grad_norm`` (unscaled; averaged over the optimiser steps taken), ``lr``, ``grad_scale`` and
``skipped_steps`` (``dtype: float16``: the loss scale after the step, the optimiser steps skipped for
overflowing gradients), ``time/generation|scoring|training|step``, ``tokens_per_second``,
``peak_memory_gb`` and ``peak_memory_reserved_gb`` (CUDA allocator, this step; null on CPU),
``nonfinite_skipped`` (``on_nonfinite: skip``: the optimiser steps skipped for a NaN / inf loss or
gradient norm).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .config import GRPOConfig, config_to_dict
from .fsio import append_lines, write_text_atomic
from .agent import model_token_lengths
from .rollout import Rollout
from .scoring import Scores

LOG_FILES = ("log.jsonl", "samples.jsonl", "eval.jsonl")  # JSONL logs with a "step" per record
BAR_KEYS = {"reward/mean": "reward", "completions/mean_length": "len", "kl": "kl", "loss": "loss"}


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    finite = values[~torch.isnan(values)]
    if finite.numel() == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std()) if finite.numel() > 1 else 0.0


def step_figures(rollout: Rollout, scores: Scores, loss_figures: dict[str, float], timings: dict[str, float],
                 *, lr: float, device: torch.device) -> dict[str, Any]:
    """The JSONL record of one step (everything but the step number)."""
    record: dict[str, Any] = {}
    record["reward/mean"], record["reward/std"] = _mean_std(scores.total)
    for name, values in scores.per_function.items():
        record[f"reward/{name}/mean"], record[f"reward/{name}/std"] = _mean_std(values)
    grouped = scores.total.view(-1, rollout.group_size)
    record["frac_reward_zero_std"] = float((grouped.std(dim=1) < 1e-6).float().mean())
    lengths = model_token_lengths(rollout).float()  # with tools: the model's tokens only (TRL's)
    record["completions/mean_length"] = float(lengths.mean())
    record["completions/min_length"] = int(lengths.min())
    record["completions/max_length"] = int(lengths.max())
    record["completions/clipped_ratio"] = float(rollout.truncated.float().mean())
    record.update(rollout.tool_figures)
    record.update(loss_figures)
    record["lr"] = lr
    step_time = sum(timings.values())
    for name, seconds in timings.items():
        record[f"time/{name}"] = seconds
    record["time/step"] = step_time
    tokens = int(rollout.prompt_mask.sum() + rollout.completion_lengths.sum())
    record["tokens_per_second"] = tokens / step_time if step_time > 0 else math.nan
    cuda = device.type == "cuda"
    record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    record["peak_memory_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None
    return record


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Appends records to ``log.jsonl`` (kept across a resume), drives the bar and TensorBoard."""

    def __init__(self, run_dir: Path, config: GRPOConfig, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.config = config
        self.log_path, self.samples_path, self.eval_path = (self.run_dir / name for name in LOG_FILES)
        if start_step == 0:  # a fresh run starts fresh files; a resumed one drops steps after its checkpoint
            for path in (self.log_path, self.samples_path, self.eval_path):
                path.unlink(missing_ok=True)
        else:
            self._truncate_after(start_step)
        write_text_atomic(self.run_dir / "config.json", json.dumps(config_to_dict(config), indent=2))
        self.writer = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError("tensorboard: expected the tensorboard package with tensorboard=true "
                                 "(pip install 'grpo-fast[tensorboard]'), received an ImportError") from error

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.bar = None
        if config.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.max_steps, initial=start_step, desc="grpo", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        for path in (self.log_path, self.samples_path, self.eval_path):
            if not path.exists():
                continue
            records, torn = read_records(path)
            if torn is not None:
                print(f"{path}: dropped its last line, torn by a crash mid-write ({torn[:60]!r}...)",
                      file=sys.stderr, flush=True)
            kept = [record for record in records if record["step"] <= step]
            if torn is not None or len(kept) < len(records):
                write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict[str, Any]) -> None:
        append_lines(self.log_path, [json.dumps({key: _json_safe(value) for key, value in record.items()})])
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])
        if self.bar is not None:
            self.bar.set_postfix({short: f"{record[key]:.3g}" for key, short in BAR_KEYS.items() if key in record})
            self.bar.update(1)

    def samples(self, step: int, rollout: Rollout, scores: Scores, count: int) -> None:
        """The first completion of each of the first ``count`` groups, with its rewards."""
        rows = []
        for row in range(0, min(len(rollout), count * rollout.group_size), rollout.group_size):
            rows.append({
                "step": step,
                "prompt": rollout.prompts[row],
                "completion": rollout.completions[row],
                "reward": float(scores.total[row]),
                **{name: _json_safe(float(values[row])) for name, values in scores.per_function.items()},
            })
        append_lines(self.samples_path, [json.dumps(sample) for sample in rows])
        if self.bar is not None:
            for sample in rows:
                self.bar.write(f"[step {step}] reward {sample['reward']:.3f} | {str(sample['prompt'])[-60:]!r} -> "
                               f"{str(sample['completion'])[:80]!r}")

    def eval_examples(self, step: int, examples: list[dict[str, Any]]) -> None:
        """Every held-out example of one evaluation, tagged with the step, appended to ``eval.jsonl``."""
        append_lines(self.eval_path, [json.dumps({"step": step, **{key: _json_safe(value) for key, value in example.items()}})
                                      for example in examples])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.config.plot and self.log_path.exists():
            plot_history(read_log(self.log_path), self.run_dir / "reward_length.png")


def read_records(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(the records of a JSONL log, its torn last line or None). A last line that is not a whole JSON
    record is what a crash mid-write leaves; any other bad line is a ValueError naming file and line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as error:
            if number == len(lines):
                return records, line
            raise ValueError(f"{path}: expected one JSON record with a 'step' per line, received line {number} "
                             f"({line[:60]!r}: {error}); remove or repair that line") from None
        records.append(record)
    return records, None


def read_log(path: Path) -> list[dict[str, Any]]:
    return read_records(path)[0]


def plot_history(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean reward, mean completion length (and with tools the tool calls per completion) against step, one
    PNG (matplotlib, Agg)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [record["step"] for record in history]
    tools = "tools/call_frequency" in history[-1]  # runs with tools: the calls per completion too
    figure, axes = plt.subplots(1, 3 if tools else 2, figsize=(15 if tools else 10, 3.5))
    reward_axis, length_axis = axes[:2]
    reward_axis.plot(steps, [record["reward/mean"] for record in history])
    reward_axis.set(xlabel="step", ylabel="mean reward", title="reward")
    length_axis.plot(steps, [record["completions/mean_length"] for record in history], color="tab:orange")
    length_axis.set(xlabel="step", ylabel="tokens", title="completion length")
    if tools:
        axes[2].plot(steps, [record.get("tools/call_frequency", math.nan) for record in history], color="tab:green")
        axes[2].set(xlabel="step", ylabel="calls per completion", title="tool calls")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
