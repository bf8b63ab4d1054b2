"""Kernel launches through one function, so that the static kernel report can record them.

`python -m benchmarks.kernel_report` compiles the Triton kernels offline for GPUs the machine does
not have. To compile each kernel with the arguments, constexprs and launch options its launcher
really passes (rather than a copy of the launcher's choices), the report calls the launchers on
meta tensors inside `recording()`: there `launch` appends the call to a list instead of running it,
and the launcher's torch code around it runs on meta tensors (shapes only, no data, no device).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional


@dataclass(frozen=True)
class Launch:
    """One kernel launch: `kernel[grid](*args, **kwargs)`."""

    kernel: Any  # a triton JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict = field(default_factory=dict)


_recorded: Optional[list[Launch]] = None


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, or inside `recording()` its record instead."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), args, dict(kwargs)))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, launches are recorded (in the yielded list), not run. Not re-entrant."""
    global _recorded
    if _recorded is not None:
        raise RuntimeError("recording(): already recording launches")
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None
