"""Per-rank heartbeats: each rank replaces its own small JSON file, so a reader never needs the job alive."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Optional, Union

from .rundir import HEARTBEATS_DIR, PathLike, atomic_write_json, heartbeat_path, read_json


class Heartbeat:
    """Writes `<run_dir>/heartbeats/rank_XXXXX.json` every `every` steps and at every phase change."""

    def __init__(self, run_dir: PathLike, rank: int, every: int = 1):
        if every < 1:
            raise ValueError(f"heartbeat every={every}: must be >= 1 step")
        self.path = heartbeat_path(run_dir, rank)
        self.rank = rank
        self.every = every
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._last_step: Optional[int] = None
        self._last_phase: Optional[str] = None

    def beat(self, step: int, stage: Union[str, int], loss: Optional[float] = None, step_time: Optional[float] = None,
             phase: str = "train", force: bool = False, **extra: Any) -> bool:
        """Record this rank's progress (extra keys, e.g. group, ride along); returns whether the file was written.

        `step_time` should be this rank's own compute time (before it waits in collectives): after a
        collective every rank has taken the same wall time, and stragglers would be invisible.
        """
        due = (force or self._last_step is None or phase != self._last_phase
               or step - self._last_step >= self.every or step < self._last_step)
        if not due:
            return False
        atomic_write_json(self.path, {
            "rank": self.rank, "host": self.host, "pid": self.pid, "step": int(step), "stage": stage,
            "loss": None if loss is None else float(loss),
            "step_time": None if step_time is None else float(step_time),
            "phase": phase, "time": time.time(), **extra,
        })
        self._last_step, self._last_phase = int(step), phase
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
