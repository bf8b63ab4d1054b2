"""Fail-safe Triton paths: when a kernel cannot compile or launch, its torch path runs instead.

Every Triton path of grpo-fast (the loss's training pass, the no-grad log-probs, the NF4 decode
matmul, the decode attention, the sampler) has a torch twin that computes the same thing. A kernel
that fails to *compile or launch* on this machine (an unsupported architecture, too little shared
memory, a driver error, a Triton bug) should cost speed, not the run: the path falls back to torch,
one warning line names the kernel, the device and the reason, and the kernel is not tried again on
that device in this process (a compile that fails once fails every time; retrying costs seconds).

``GRPO_FAST_STRICT=1`` makes such a failure an error instead (tests and benchmarks, which must never
time or check the torch path while believing they run the kernel).

Only failures of Triton itself are caught (``kernel_failure``): a ``ValueError`` about the caller's
arguments, a CUDA out-of-memory error or an error from torch code around the launch still raise.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")

STRICT_ENV = "GRPO_FAST_STRICT"


class KernelFallbackWarning(UserWarning):
    """A Triton kernel failed to compile or launch; its torch path runs instead."""


class KernelFailure(RuntimeError):
    """A Triton kernel failed to compile or launch under GRPO_FAST_STRICT=1."""


def _triton_error_types() -> tuple[type, ...]:
    """Triton's own exception classes, as far as this Triton version has them (names moved between
    3.0 and 3.9; ``TritonError`` is the common base from 3.3 on)."""
    found = []
    for module_name, names in (("triton.errors", ("TritonError",)),
                               ("triton.compiler.errors", ("CompilationError",)),
                               ("triton.runtime.errors", ("OutOfResources", "PTXASError", "InterpreterError"))):
        try:
            module = __import__(module_name, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(module, name) for name in names if isinstance(getattr(module, name, None), type)]
    return tuple(found)


_TRITON_ERRORS = _triton_error_types()


def _raised_inside_triton(error: BaseException) -> bool:
    """The innermost Python frame of the traceback is Triton's (its compiler passes and its launcher
    raise plain RuntimeErrors, e.g. 'PassManager::run failed', 'Triton Error [CUDA]: ...')."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    return "/triton/" in filename


def kernel_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failure to compile or launch a Triton kernel (so the torch path can run)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False  # the torch path needs more memory, not less
    if isinstance(error, _TRITON_ERRORS):
        return True
    if isinstance(error, NotImplementedError):  # e.g. a backend without support for this architecture
        return True
    return type(error) is RuntimeError and _raised_inside_triton(error)


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "0").strip().lower() in ("1", "true", "yes")


def describe_device(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H100 80GB HBM3, sm_90)', 'cpu (Triton interpreter)'."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, sm_{major}{minor})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return f"{device.type} (Triton interpreter)"
    return str(device)


def describe_error(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


_lock = threading.Lock()
_failed: dict[tuple[str, str], str] = {}  # (kernel, device) -> the reason; the kernel is not tried again there
_working: set[tuple[str, str]] = set()  # (kernel, device) that a probe() found working


def _key(kernel: str, device: torch.device) -> tuple[str, str]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return kernel, str(device)


def usable(kernel: str, device: torch.device) -> bool:
    """False once ``kernel`` has failed on ``device`` in this process."""
    return _key(kernel, device) not in _failed


def failure_reason(kernel: str, device: torch.device) -> Optional[str]:
    return _failed.get(_key(kernel, device))


def record_failure(kernel: str, device: torch.device, error: BaseException) -> None:
    """``kernel`` failed to compile or launch on ``device``: raise under GRPO_FAST_STRICT=1, else warn
    (once per kernel and device) and mark it unusable there."""
    message = f"grpo-fast: Triton kernel '{kernel}' failed on {describe_device(device)}: {describe_error(error)}"
    if strict():
        raise KernelFailure(f"{message} ({STRICT_ENV}=1, so no torch fallback)") from error
    key = _key(kernel, device)
    with _lock:
        first = key not in _failed
        _failed[key] = describe_error(error)
        _working.discard(key)
    if first:
        warnings.warn(f"{message}; using its torch path from now on (slower; set {STRICT_ENV}=1 to make this "
                      "an error)", KernelFallbackWarning, stacklevel=3)


def run(kernel: str, device: torch.device, fused: Callable[[], T], torch_path: Callable[[], T]) -> T:
    """``fused()``, or ``torch_path()`` when the kernel has failed on ``device`` before or fails now to
    compile or launch. ``fused`` must not have written anything the torch path reads when it fails."""
    if not usable(kernel, device):
        return torch_path()
    try:
        return fused()
    except Exception as error:  # noqa: BLE001 - filtered by kernel_failure, everything else re-raised
        if not kernel_failure(error):
            raise
        record_failure(kernel, device, error)
    return torch_path()


def probe(kernel: str, device: torch.device, launch: Callable[[], object]) -> bool:
    """Decide once per process whether ``kernel`` works on ``device``, by ``launch()``ing it eagerly
    (before a CUDA graph captures it: a failure inside a capture cannot fall back). True when it works."""
    key = _key(kernel, device)
    if key in _failed:
        return False
    if key in _working:
        return True
    try:
        launch()
    except Exception as error:  # noqa: BLE001 - filtered as in run()
        if not kernel_failure(error):
            raise
        record_failure(kernel, device, error)
        return False
    _working.add(key)
    return True


def reset(kernel: Optional[str] = None) -> None:
    """Forget the failures (and probes) of ``kernel`` (None: all): the next call tries it again; a later
    failure warns again. For tests and for ``grpo-fast doctor``."""
    with _lock:
        for store in (_failed, _working):
            for key in [key for key in store if kernel is None or key[0] == kernel]:
                if isinstance(store, dict):
                    del store[key]
                else:
                    store.discard(key)
