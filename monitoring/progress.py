"""A progress bar for interactive local runs; silent in batch jobs (no TTY) and on ranks other than 0."""
from __future__ import annotations

import sys
from typing import Any, Optional, TextIO


class StepProgress:
    """tqdm bar over training steps, shown only when `enabled` (default: rank 0 with stdout on a terminal)."""

    def __init__(self, total: int, initial: int = 0, rank: int = 0, desc: str = "train",
                 enabled: Optional[bool] = None, file: Optional[TextIO] = None):
        out = file if file is not None else sys.stdout
        self.enabled = (rank == 0 and out.isatty()) if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            # SLURM logs are not terminals: a bar there would write thousands of carriage-return lines.
            self._bar = tqdm(total=total, initial=initial, desc=desc, file=out, dynamic_ncols=True, unit="step")
        self._step = initial

    def update(self, step: int, **postfix: Any) -> None:
        """Move the bar to `step` and show postfix values (loss=..., stage=...)."""
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)
        self._bar.update(step - self._step)
        self._step = step

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
