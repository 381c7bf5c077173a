"""Per-rank heartbeats: each rank replaces its own small JSON file, so a reader never needs the job alive."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .rundir import HEARTBEATS_DIR, PathLike, atomic_write_json, heartbeat_path, read_json


class Heartbeat:
    """Writes `<run_dir>/heartbeats/rank_XXXXX.json` every `every_s` seconds of wall time and/or every `every`
    steps (0: that rule off), and at every phase change.

    On a shared filesystem a write per step per rank is a metadata storm at scale (64 ranks x several steps a
    second); the trainer writes by time (`monitor.heartbeat_every_s`, default 5 s). The `step_time` written is
    the mean over the steps since the previous write, so straggler detection sees every step, not a sample.
    """

    def __init__(self, run_dir: PathLike, rank: int, every: int = 1, every_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        if every < 0 or every_s < 0 or (every == 0 and every_s == 0):
            raise ValueError(f"heartbeat every={every} steps, every_s={every_s}: one of them must be > 0 (neither < 0)")
        self.path = heartbeat_path(run_dir, rank)
        self.rank = rank
        self.every = every
        self.every_s = every_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._clock = clock
        self._last_step: Optional[int] = None
        self._last_phase: Optional[str] = None
        self._last_time = 0.0
        self._times: list[float] = []  # step times since the last write

    def beat(self, step: int, stage: Union[str, int], loss: Optional[float] = None, step_time: Optional[float] = None,
             phase: str = "train", force: bool = False, **extra: Any) -> bool:
        """Record this rank's progress (extra keys, e.g. group, ride along); returns whether the file was written.

        `step_time` should be this rank's own compute time (before it waits in collectives): after a
        collective every rank has taken the same wall time, and stragglers would be invisible.
        """
        now = self._clock()
        if step_time is not None:
            self._times.append(float(step_time))
        due = (force or self._last_step is None or phase != self._last_phase or step < self._last_step
               or (self.every > 0 and step - self._last_step >= self.every)
               or (self.every_s > 0 and now - self._last_time >= self.every_s))
        if not due:
            return False
        mean_time = sum(self._times) / len(self._times) if self._times else None
        atomic_write_json(self.path, {
            "rank": self.rank, "host": self.host, "pid": self.pid, "step": int(step), "stage": stage,
            "loss": None if loss is None else float(loss),
            "step_time": mean_time, "steps_timed": len(self._times),
            "phase": phase, "time": time.time(), **extra,
        })
        self._last_step, self._last_phase, self._last_time = int(step), phase, now
        self._times = []
        return True


def read_heartbeats(run_dir: PathLike) -> list[dict]:
    """Every rank's latest heartbeat, sorted by rank (unreadable files are skipped)."""
    folder = Path(run_dir) / HEARTBEATS_DIR
    if not folder.is_dir():
        return []
    beats = []
    for p in folder.glob("rank_*.json"):
        hb = read_json(p)
        if isinstance(hb, dict) and isinstance(hb.get("rank"), int):
            beats.append(hb)
    return sorted(beats, key=lambda hb: hb["rank"])
