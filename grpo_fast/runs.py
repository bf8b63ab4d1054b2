"""A run directory belongs to one run: resolved and checked before anything loads, claimed after.

``output_dir/run_name`` holds one run: ``config.json``, ``log.jsonl``, ``samples.jsonl``,
``eval.jsonl``, ``checkpoints/``, ... (``RUN_FILES``). ``plan_run(config)`` decides, before the model
loads and before anything is written:

- a new run needs a directory that holds no run: one that does is refused unless ``overwrite``
  (its files are deleted by ``start_run``, only once every other input was checked), so a reused
  ``run_name`` never mixes two runs' logs and checkpoints;
- ``resume`` continues the run's latest complete checkpoint (its logs must be readable, a torn
  last line aside). Without ``run_name`` it takes the run
  under ``output_dir`` written to most recently, and refuses when that run has no checkpoint
  rather than silently continuing an older run. The checkpoint's config must equal the run's on
  every key that decides what is trained; the keys in ``RESUMABLE`` (how long, how often to save,
  log or evaluate, how the same maths is computed) may change;
- ``output_dir`` must be a folder this process can write (probed by creating a folder in it).

Every refusal is a ``ValueError`` naming the key (``run_name``, ``resume``, ``output_dir``, or the
config key that differs) with what was expected and what was found.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .checkpoint import CHECKPOINT_PATTERN, latest_checkpoint
from .config import GRPOConfig, config_to_dict
from .metrics import LOG_FILES, read_records

RUN_FILES = ("config.json", *LOG_FILES, "reward_length.png", "checkpoints", "tensorboard")

# keys a resumed run may change: its length, what it saves, logs and evaluates, and how (not what) it computes
RESUMABLE = frozenset({
    "output_dir", "run_name", "resume", "overwrite", "max_steps", "save_every", "save_total_limit", "sample_every",
    "num_samples", "progress_bar", "plot", "tensorboard", "eval_every", "eval_dataset", "eval_dataset_split",
    "eval_dataset_config", "eval_limit", "eval_batch_size", "eval_max_completion_length", "micro_batch_size",
    "loss_backend", "loss_chunk_size", "gradient_checkpointing", "attn_implementation", "on_nonfinite",
    "micro_batch_tokens", "max_memory_gb", "activation_offload",  # same update for every loss type (tested)
    "rollout_memory",  # where the engine's cache lives between steps, not what it samples
})


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    checkpoint: Path | None = None  # resume: the checkpoint to load
    step: int = 0  # the checkpoint's step (0: a new run)
    replaces: bool = False  # overwrite: the directory holds a run whose files start_run deletes


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


def last_written(folder: Path) -> float:
    """When the run in ``folder`` last wrote a log line, its config or a checkpoint (seconds)."""
    times = [(folder / name).stat().st_mtime for name in RUN_FILES if (folder / name).exists()]
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None:
        times.append((checkpoint / "trainer_state.json").stat().st_mtime)
    return max(times, default=0.0)


def describe(folder: Path) -> str:
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return "no checkpoint"
    return f"latest checkpoint: step {int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))}"


def check_output_dir(run_dir: Path) -> None:
    """The run directory can be created and written: its nearest existing folder accepts a new folder."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output_dir: expected a folder, received {str(run_dir.parent)!r}, where {str(existing)!r} "
                         "is a file")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".grpo-fast-write-check-", dir=existing))
    except OSError as error:
        raise ValueError(f"output_dir: expected a folder this process can write, received {str(run_dir.parent)!r} "
                         f"(creating a folder in {str(existing)!r}: {error.strerror})") from None
    probe.rmdir()


def new_run_name(output_dir: Path) -> str:
    """grpo-<UTC time>, with a suffix when a run started in the same second."""
    name = f"grpo-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    candidate = name
    while (output_dir / candidate).exists():
        suffix += 1
        candidate = f"{name}-{suffix}"
    return candidate


def _resume_dir(config: GRPOConfig, output_dir: Path) -> Path:
    if config.run_name is not None:
        return output_dir / config.run_name
    runs = [path for path in output_dir.iterdir() if holds_run(path)] if output_dir.is_dir() else []
    if not runs:
        raise ValueError(f"resume: expected a run under {str(output_dir)!r} to continue, received none")
    return max(runs, key=last_written)


def check_resumable(config: GRPOConfig, checkpoint: Path) -> int:
    """The checkpoint's step, after checking that ``config`` continues the run that wrote it."""
    state_path = checkpoint / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text())
        step = int(state["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"resume: expected a readable {str(state_path)!r}, received a damaged file ({error})") from None
    saved, current = state.get("config") or {}, config_to_dict(config)
    changed = [key for key in saved if key in current and key not in RESUMABLE and saved[key] != current[key]]
    if changed:
        key, others = changed[0], f" (also {', '.join(changed[1:])})" if changed[1:] else ""
        raise ValueError(f"{key}: expected the resumed run's value {saved[key]!r}, received {current[key]!r}{others}; "
                         f"resume with the settings in {str(checkpoint.parent.parent / 'config.json')!r}, or start "
                         "a new run")
    if step >= config.max_steps:
        raise ValueError(f"max_steps: expected more than the checkpoint's step {step} to resume "
                         f"{str(checkpoint.parent.parent)!r}, received {config.max_steps}")
    return step


def plan_run(config: GRPOConfig) -> RunPlan:
    """The run directory and what to do with it; refusals before anything is loaded or written."""
    output_dir = Path(config.output_dir)
    if config.resume:
        run_dir = _resume_dir(config, output_dir)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            if not run_dir.exists() or not holds_run(run_dir):  # nothing to continue: start it, nothing to delete
                why = "no such folder" if not run_dir.exists() else "no run there"
                raise ValueError(f"resume: expected a complete checkpoint under {str(run_dir)!r}, received none "
                                 f"({why}); start the run without resume, or set run_name to resume another run")
            raise ValueError(f"resume: expected a complete checkpoint under {str(run_dir)!r}, received none (the run "
                             "stopped before its first save); start it again with overwrite (deletes its logs), "
                             "or set run_name to resume another run")
        check_output_dir(run_dir)
        step = check_resumable(config, checkpoint)
        for name in LOG_FILES:  # a damaged line is refused now; a torn last one is dropped when the run starts
            if (run_dir / name).exists():
                read_records(run_dir / name)
        return RunPlan(run_dir, checkpoint, step)
    run_dir = output_dir / (config.run_name or new_run_name(output_dir))
    check_output_dir(run_dir)
    replaces = holds_run(run_dir)
    if replaces and not config.overwrite:
        raise ValueError(f"run_name: expected a folder without a run, received {str(run_dir)!r}, which holds one "
                         f"({describe(run_dir)}); continue it with resume, start it over with overwrite (deletes "
                         "its logs and checkpoints), or choose another run_name")
    return RunPlan(run_dir, replaces=replaces)


def start_run(plan: RunPlan) -> None:
    """Create the run directory; with ``overwrite``, delete the old run's files first."""
    if plan.replaces:
        for name in RUN_FILES:
            path = plan.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    plan.run_dir.mkdir(parents=True, exist_ok=True)
