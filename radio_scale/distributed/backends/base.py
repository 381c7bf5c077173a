"""The interface the trainer calls (SPMD: every rank calls every method in the same order)."""
from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Optional

import torch
from torch import nn


class Backend:
    """One distributed backend. `setup` wraps the model; afterwards `module` is what the trainer calls forward on
    and `optimizer.param_groups` carries the learning rate it logs."""

    name = ""
    # whether `write_state` can return before the bytes are on disk (the Checkpointer finalises it later)
    supports_async_save = False

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.model: Optional[nn.Module] = None
        self.module: Optional[nn.Module] = None
        self.optimizer = None

    def setup(self, model: nn.Module, student_blocks: nn.ModuleList, student_sharding: str,
              shard_group_size: int) -> None:
        raise NotImplementedError

    def set_gradient_sync(self, on: bool) -> None:
        """Reduce gradients over the ranks in this micro-step's backward (on for the last micro-step only)."""

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def finish_step(self, max_norm: float, lr: float, allowed: bool) -> tuple[float, bool]:
        """Clip to `max_norm` and, when `allowed` and the gradient norm is finite, apply the optimizer step at `lr`.
        Gradients are cleared either way. Returns (global gradient norm before clipping, applied)."""
        raise NotImplementedError

    def grad_norm(self, max_norm: float) -> float:
        """The global gradient norm without stepping or clearing (apply=False steps: gradients kept for tests)."""
        return float("nan")

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every parameter's full gradient on every rank, by name (tests; before `finish_step`)."""
        raise NotImplementedError

    def write_state(self, directory: Path, asynchronous: bool, process_group=None) -> Optional[Future]:
        """Write model + optimizer state into `directory` (which rank 0 created); a Future when asynchronous."""
        raise NotImplementedError

    def read_state(self, path: Path, with_optimizer: bool, written_by: int) -> None:
        """Restore model (+ optimizer) state from a checkpoint directory written by `written_by` ranks."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state on CPU; every rank takes part, rank 0 gets every tensor."""
        raise NotImplementedError
