"""Ctrl-C (SIGINT) and SIGTERM during training: finish or abandon the step cleanly, never mid-update.

    with InterruptGuard() as interrupts, UpdateCounter(optimizer) as updates:
        for step in ...:
            updates.reset()
            ...                              # a second signal raises StepAbandoned wherever it lands
            if interrupts.requested:         # the first one is only recorded
                save the step, stop

Python raises ``KeyboardInterrupt`` wherever a Ctrl-C lands: halfway through an optimiser update, or
through a checkpoint save, with a long traceback. Here the first SIGINT or SIGTERM only records the
signal (and says so on stderr): the loop finishes the step it is in, saves it and stops. A second
one abandons the step at once (``StepAbandoned``); the trainer then saves the last finished step
when the abandoned one had not updated the weights yet (``UpdateCounter``: a rollout can take
minutes, the update seconds). Outside the main thread, where Python never delivers signals, the
guard changes nothing.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StepAbandoned(KeyboardInterrupt):
    """A second signal: the step in progress is abandoned where it stands."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class InterruptGuard:
    """Records the first SIGINT / SIGTERM (``requested``, ``signal_number``); raises ``StepAbandoned``
    on the second. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> bool:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        return False

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None:
            raise StepAbandoned(number)
        self.signal_number = number
        # os.write, not print: the signal may land inside a print to stderr (a progress bar), and
        # Python's buffered streams refuse re-entrant writes
        os.write(2, f"\n{signal.Signals(number).name}: finishing the current step, then saving a checkpoint "
                    f"(send it again to abandon the step)\n".encode())


class UpdateCounter:
    """Counts the optimiser's ``step`` calls since ``reset``: until the first, the model and optimiser
    still hold the previous step's state."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.count = 0
        self._handle = None

    def reset(self) -> None:
        self.count = 0

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self.count += 1

    def __enter__(self) -> "UpdateCounter":
        self._handle = self.optimizer.register_step_pre_hook(self._pre_step)
        return self

    def __exit__(self, *exc_info) -> bool:
        self._handle.remove()
        return False
