"""NaN/Inf loss guard: skip a bad step, roll back to the last checkpoint after K bad steps in a row."""
from __future__ import annotations

import math
from typing import Literal, Optional

from .rundir import PathLike, append_event

Verdict = Literal["ok", "skip", "rollback"]


class NanGuard:
    """Judges each step's loss: "ok" (finite), "skip" (non-finite: drop this update), "rollback" (K in a row).

    Give it the globally reduced loss so that every rank reaches the same verdict. When `run_dir` is given
    the guard writes the `nan_skip` / `nan_rollback` events itself (rank 0 only, to avoid one line per rank).
    On a rollback the trainer restores model/optimizer/data from the last checkpoint but keeps this guard's
    live state (do not load the guard from that checkpoint), so `rollbacks` keeps counting and the trainer
    can give up after too many.
    """

    def __init__(self, rollback_after: int = 3, run_dir: Optional[PathLike] = None, rank: int = 0):
        if rollback_after < 1:
            raise ValueError(f"nan guard rollback_after={rollback_after}: must be >= 1")
        self.rollback_after = rollback_after
        self.run_dir = run_dir
        self.rank = rank
        self.consecutive = 0  # non-finite losses in a row
        self.skipped = 0  # steps skipped in total
        self.rollbacks = 0

    def check(self, loss_value: float, step: Optional[int] = None) -> Verdict:
        """The verdict for this step's loss (a float or a 0-dim tensor)."""
        value = float(loss_value)
        if math.isfinite(value):
            self.consecutive = 0
            return "ok"
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.rollback_after:
            self.consecutive = 0
            self.rollbacks += 1
            self._event("nan_rollback", f"loss {value} at step {step}: {self.rollback_after} non-finite losses in a "
                                        f"row, rolling back to the last checkpoint", step, value)
            return "rollback"
        self._event("nan_skip", f"loss {value} at step {step}: update skipped "
                                f"({self.consecutive}/{self.rollback_after} before rollback)", step, value)
        return "skip"

    def _event(self, kind: str, message: str, step: Optional[int], value: float) -> None:
        if self.run_dir is not None and self.rank == 0:
            append_event(self.run_dir, kind, self.rank, message, step=step, loss=str(value),
                         skipped_total=self.skipped, rollbacks=self.rollbacks)

    def state_dict(self) -> dict:
        """Counters to checkpoint."""
        return {"consecutive": self.consecutive, "skipped": self.skipped, "rollbacks": self.rollbacks,
                "rollback_after": self.rollback_after}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by state_dict (rollback_after stays as configured now)."""
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])
        self.rollbacks = int(state["rollbacks"])
