"""Kernel launches through one function, so that the static kernel report can record them.

`python -m benchmarks.static.kernel_report` compiles the Triton kernels offline for GPUs the machine does
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


# How a launch's programs share an SM: the one rule the NF4 decode planner (kernels/nf4_decode.py)
# and the static kernel report's model (benchmarks/static/static_model.py) both charge instructions by.

SCHEDULERS_PER_SM = 4  # warp schedulers (SM sub-partitions) per SM, sm_80 to sm_90


def issue_rate(warps: int, schedulers: int = SCHEDULERS_PER_SM) -> int:
    """Warp-instructions per clock an SM holding ``warps`` warps issues at most: one per scheduler,
    and one per warp (a warp issues at most one instruction per clock)."""
    return max(1, min(schedulers, warps))


def sm_waves(programs: int, sms: int, resident: int) -> list[int]:
    """Programs per wave on the busiest SM: ceil(programs / sms) of them, ``resident`` (blocks per SM)
    at a time."""
    per_sm = -(-programs // sms)
    resident = max(1, resident)
    full, rest = divmod(per_sm, resident)
    return [resident] * full + ([rest] if rest else [])


def busiest_sm_cycles(programs: int, sms: int, resident: int, warps_per_program: int, program_cycles: float,
                      schedulers: int = SCHEDULERS_PER_SM) -> float:
    """Clocks of the busiest SM for programs of ``program_cycles`` each at the full issue rate: each
    wave its programs' cycles scaled by schedulers / issue_rate(the wave's warps)."""
    return sum(n * program_cycles * schedulers / issue_rate(n * warps_per_program, schedulers)
               for n in sm_waves(programs, sms, resident))
