"""Preemption: signal handlers only set a flag; ranks agree on it at the next step boundary."""
from __future__ import annotations

import signal
from typing import Optional


# SLURM sends SIGUSR2 before a time limit / preemption (submitit's --signal=USR2@delay); schedulers send SIGTERM.
PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    """Set by SIGUSR2/SIGTERM; the trainer all-reduces it at the step boundary so every rank stops on the same step."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # only a flag: never save or exit from a signal handler
        self.signum = signum

    @property
    def requested(self) -> bool:
        """This rank got a preemption signal (the trainer all-reduces it with the step's metrics)."""
        return self.signum is not None
