"""Hang watchdog: a daemon thread that notices when a rank stops making progress and takes it down loudly.

A hung rank (blocked collective, dead NFS, deadlocked data worker) otherwise burns the whole allocation
silently. When the current phase has had no progress for its timeout, the watchdog

1. dumps every thread's Python stack to `<run_dir>/stacks/rank_XXXXX_<unix time>.txt` (faulthandler),
2. writes the HANG marker and a `hang` event naming rank, phase and seconds,
3. calls `on_hang(report)` if given (e.g. to abort an NCCL communicator), and
4. ends the process with `os._exit(exit_code)` (3 by default; `exit_code=None` keeps it alive).

The non-zero exit is what a requeue-capable launcher treats as a failure to restart. The thread only
needs the GIL to be free, which every blocking C call of interest releases (collectives, sleeps, locks,
I/O), so it fires while the main thread is stuck; no signal is sent to the main thread, whose handler
would never run while it is blocked inside C.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable, Mapping, Optional

from .rundir import HANG_MARKER, PathLike, append_event, stack_dump_path, write_marker

DEFAULT_EXIT_CODE = 3


class Watchdog:
    """Per-rank hang detector; call `phase(name)` when the phase changes and `progress()` every step."""

    def __init__(self, run_dir: PathLike, rank: int, timeouts: Mapping[str, Optional[float]],
                 on_hang: Optional[Callable[[dict], None]] = None, exit_code: Optional[int] = DEFAULT_EXIT_CODE,
                 initial_phase: str = "startup"):
        for name, t in timeouts.items():
            if t is not None and t <= 0:
                raise ValueError(f"watchdog timeout for phase '{name}' is {t}: must be > 0 s (or None: unwatched)")
        self.run_dir = run_dir
        self.rank = rank
        self.timeouts = dict(timeouts)
        self.on_hang = on_hang
        self.exit_code = exit_code
        self.fired: Optional[dict] = None  # the report, once it has fired
        self._check_phase(initial_phase)
        self._phase = initial_phase
        self._last = time.monotonic()
        self._stop = threading.Event()
        watched = [t for t in self.timeouts.values() if t is not None]
        # Check often enough that the overshoot is a small fraction of the shortest timeout.
        self._poll_s = min([1.0] + [t / 10 for t in watched])
        self._thread = threading.Thread(target=self._run, name=f"watchdog-rank{rank}", daemon=True)
        self._thread.start()

    def _check_phase(self, name: str) -> None:
        if name not in self.timeouts:
            raise ValueError(f"watchdog phase '{name}' has no timeout (phases: {', '.join(self.timeouts)})")

    def phase(self, name: str) -> None:
        """Enter phase `name` (its own timeout applies from now)."""
        self._check_phase(name)
        self._phase = name
        self._last = time.monotonic()

    def progress(self) -> None:
        """Mark progress in the current phase (cheap: one float store)."""
        self._last = time.monotonic()

    @property
    def current_phase(self) -> str:
        return self._phase

    def stop(self) -> None:
        """Stop watching (at the end of training, before a clean exit)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            phase, last = self._phase, self._last
            timeout = self.timeouts.get(phase)
            idle = time.monotonic() - last
            if timeout is not None and idle > timeout:
                self._fire(phase, idle, timeout)
                return

    def _fire(self, phase: str, idle: float, timeout: float) -> None:
        stacks = stack_dump_path(self.run_dir, self.rank)
        stacks.parent.mkdir(parents=True, exist_ok=True)
        with open(stacks, "w") as f:
            f.write(f"rank {self.rank} pid {os.getpid()}: no progress in phase '{phase}' for {idle:.1f} s "
                    f"(timeout {timeout:g} s)\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        message = f"rank {self.rank} hung in phase '{phase}': no progress for {idle:.0f} s (timeout {timeout:g} s)"
        report = {"rank": self.rank, "phase": phase, "seconds": round(idle, 3), "timeout": timeout,
                  "stacks": str(stacks)}
        write_marker(self.run_dir, HANG_MARKER, self.rank, message)
        append_event(self.run_dir, "hang", self.rank, message, phase=phase, seconds=round(idle, 3),
                     timeout=timeout, stacks=str(stacks))
        print(f"[watchdog] {message}; stacks in {stacks}", file=sys.stderr, flush=True)
        self.fired = report
        if self.on_hang is not None:
            try:
                self.on_hang(report)
            except Exception as e:  # the exit below must happen whatever the callback does
                print(f"[watchdog] on_hang failed: {e!r}", file=sys.stderr, flush=True)
        if self.exit_code is not None:
            # os._exit, not sys.exit: the main thread is stuck and must not get to run atexit/finally code that
            # would block on the same dead collective.
            os._exit(self.exit_code)
