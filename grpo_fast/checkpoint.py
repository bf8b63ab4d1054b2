"""Checkpoints that a crash cannot damage: written to a temporary folder, then renamed into place.

``<run>/checkpoints/step_000040/`` holds

- ``trainable.safetensors``: the trained parameters by name (the LoRA adapter, or every weight
  in full fine-tuning): what ``--resume`` loads;
- ``model/``: the same weights in Hugging Face layout (``adapter_model.safetensors`` +
  ``adapter_config.json`` for LoRA, ``model.safetensors`` + config otherwise) and the tokenizer,
  loadable by ``peft`` / ``from_pretrained`` / ``grpo_fast.evaluation``;
- ``optimizer.pt``, ``scheduler.pt``: their state dicts (tensors and numbers);
- ``rng.json`` (Python's and NumPy's generator states) and ``rng.safetensors`` (torch's CPU and
  CUDA generator states);
- ``scaler.pt`` (``dtype: float16`` runs): the GradScaler's loss scale and growth tracker;
- ``trainer_state.json``: ``step``, ``data_position`` (prompts consumed) and the config.

Nothing is unpickled on load: every ``torch.load`` runs with ``weights_only=True`` (tensors,
numbers, strings and containers only), so a checkpoint from elsewhere cannot run code.

A checkpoint folder appears only by ``os.replace`` of a finished temporary folder whose files were
flushed to disk first (``grpo_fast.fsio``), so any folder named ``step_*`` is complete, also after
a power cut; an interrupted save leaves a ``.tmp-*`` folder that the next save removes, and never
touches the previous checkpoints. Older checkpoints beyond ``keep_last`` are deleted only after the
new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import GRPOConfig, config_to_dict
from .fsio import sync_folder, sync_tree

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TEMPORARY_PREFIX = ".tmp-"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if (match := CHECKPOINT_PATTERN.match(path.name)) and (path / "trainer_state.json").is_file()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def rng_state() -> dict[str, Any]:
    """Every generator's state, as its library returns it."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rng_state(folder: Path, state: dict[str, Any]) -> None:
    """Python's and NumPy's states as JSON numbers, torch's byte states as tensors: no pickle."""
    version, internal, gauss_next = state["python"]
    algorithm, keys, position, has_gauss, cached_gaussian = state["numpy"]
    generators = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"algorithm": algorithm, "keys": [int(key) for key in keys], "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    (folder / "rng.json").write_text(json.dumps(generators))
    tensors = {"torch": state["torch"].contiguous()}
    tensors.update({f"cuda.{index}": cuda.contiguous() for index, cuda in enumerate(state["cuda"])})
    save_file(tensors, str(folder / "rng.safetensors"))


def read_rng_state(folder: Path) -> dict[str, Any]:
    if not (folder / "rng.json").is_file():
        old = " (an older grpo-fast's rng.pt, a pickle, which is never loaded)" if (folder / "rng.pt").exists() else ""
        raise ValueError(f"checkpoint: expected rng.json and rng.safetensors in {str(folder)!r}, received none{old}; "
                         "start a new run (or resume a checkpoint written by this version)")
    generators = json.loads((folder / "rng.json").read_text())
    tensors = load_file(str(folder / "rng.safetensors"))
    python, numpy_state = generators["python"], generators["numpy"]
    cuda = [tensors[f"cuda.{index}"] for index in range(sum(name.startswith("cuda.") for name in tensors))]
    return {
        "python": (python["version"], tuple(python["state"]), python["gauss_next"]),
        "numpy": (numpy_state["algorithm"], np.array(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                  numpy_state["has_gauss"], numpy_state["cached_gaussian"]),
        "torch": tensors["torch"],
        "cuda": cuda,
    }


def load_tensors(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; anything else in the file is a ValueError naming it."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"checkpoint: expected tensors and numbers only in {str(path)!r}, received objects that "
                         f"only unpickling could load, which is refused ({' '.join(str(error).split())[:200]})") from None


@contextlib.contextmanager
def quiet_hf_progress_bars() -> Iterator[None]:
    """No "Writing model shards" bars from transformers / huggingface_hub while a checkpoint is written
    (they would break the run's own progress bar at every save); their settings restored after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_enabled = transformers_logging.is_progress_bar_enabled()
    hub_disabled = are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also disables huggingface_hub's
    try:
        yield
    finally:
        if transformers_enabled:
            transformers_logging.enable_progress_bar()
        if hub_disabled:
            disable_progress_bars()
        else:
            enable_progress_bars()


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().cpu().contiguous()
            for name, parameter in model.named_parameters() if parameter.requires_grad}


def write_checkpoint(folder: Path, model, optimizer, scheduler, tokenizer, state: dict[str, Any],
                     scaler: torch.amp.GradScaler | None = None, *, rng: dict[str, Any] | None = None,
                     scaler_state: dict[str, Any] | None = None) -> None:
    """Every file of a checkpoint into ``folder`` (which may be left half-written by a crash).
    ``rng`` / ``scaler_state``: the states to store (default: the live ones)."""
    save_file(trainable_state(model), str(folder / "trainable.safetensors"))
    with quiet_hf_progress_bars():
        if hasattr(model, "peft_config"):
            # PEFT would build the adapter from model.state_dict(), and on CPUs with AVX512-BF16
            # bitsandbytes' Linear4bit state_dict re-quantises weights that an eval-mode forward had
            # repacked, changing the live model (bitsandbytes 0.50): give it the parameters instead.
            parameters = {name: parameter.detach() for name, parameter in model.named_parameters()}
            model.save_pretrained(str(folder / "model"), state_dict=parameters)
        else:
            model.save_pretrained(str(folder / "model"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder / "model"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    if scaler is not None and scaler.is_enabled():
        torch.save(scaler_state if scaler_state is not None else scaler.state_dict(), folder / "scaler.pt")
    write_rng_state(folder, rng if rng is not None else rng_state())
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, tokenizer=None, *,
                    data_position: int, config: GRPOConfig | None = None, keep_last: int = 2,
                    scaler: torch.amp.GradScaler | None = None, extra_state: dict[str, Any] | None = None,
                    rng: dict[str, Any] | None = None, scaler_state: dict[str, Any] | None = None) -> Path:
    """Write ``step``'s checkpoint atomically and durably, then keep the last ``keep_last``; returns its
    folder. ``scaler``: saved when enabled (fp16 loss scaling); ``extra_state``: JSON values the
    trainer carries across steps (e.g. the adaptive entropy coefficient), in ``trainer_state.json``;
    ``rng`` / ``scaler_state``: states to store instead of the live ones (a step abandoned before it
    changed the weights is saved as the step before it, with the states that step ended with)."""
    if keep_last < 1:
        raise ValueError(f"keep_last: expected >= 1, received {keep_last}")
    parent = checkpoints_dir(run_dir)
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{TEMPORARY_PREFIX}*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    final = parent / f"step_{step:06d}"
    temporary = parent / f"{TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    temporary.mkdir()
    state = {"step": step, "data_position": data_position,
             "config": config_to_dict(config) if config is not None else None, **(extra_state or {})}
    try:
        write_checkpoint(temporary, model, optimizer, scheduler, tokenizer, state, scaler, rng=rng,
                         scaler_state=scaler_state)
        sync_tree(temporary)  # on disk before its name says it is complete
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():  # saving the same step again (a resumed run re-reaching it): replace it whole
        shutil.rmtree(final)
    os.replace(temporary, final)
    sync_folder(parent)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, model, optimizer=None, scheduler=None, *, restore_rng: bool = True,
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Load weights (and optimizer, scheduler, RNG, loss scaler) from ``folder``; returns the trainer state.

    An enabled ``scaler`` takes the checkpoint's ``scaler.pt``; a checkpoint without one (written by
    a run without loss scaling) leaves it at its initial scale, as in a new run."""
    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        raise ValueError(f"checkpoint: expected a complete checkpoint folder, received {str(folder)!r}")
    rng = read_rng_state(folder) if restore_rng else None  # refused before anything is loaded
    saved = load_file(str(folder / "trainable.safetensors"))
    parameters = dict(model.named_parameters())
    expected = {name for name, parameter in parameters.items() if parameter.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved))[:3], sorted(set(saved) - expected)[:3]
        raise ValueError(f"checkpoint: expected the model's trainable parameters in {str(folder)!r}, "
                         f"received a different set (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, tensor in saved.items():
            parameters[name].copy_(tensor.to(parameters[name].device))
    if optimizer is not None:
        optimizer.load_state_dict(load_tensors(folder / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(load_tensors(folder / "scheduler.pt"))
    if scaler is not None and scaler.is_enabled() and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(load_tensors(folder / "scaler.pt"))
    if rng is not None:
        set_rng_state(rng)
    return json.loads((folder / "trainer_state.json").read_text())
