"""Sharded checkpoints: atomic (temp dir + rename), keep-last-k, async where the backend can.

Layout of one checkpoint `<root>/step_000000120/`:
  model + optimizer        the backend's own sharded format: DCP shards + .metadata (fsdp2, resharded on load),
                           or DeepSpeed's ZeRO files (deepspeed; another world size goes through its universal
                           format)
  trainer.json             global trainer state (step, stage, tracking run id, guards), written by rank 0
  rank_00003.pt            per-rank state (RNG states, data position), weights-only loadable
  .complete                written last, just before the rename; only complete checkpoints are ever loaded
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from radio_scale.monitoring.rundir import CHECKPOINT_COMPLETE as COMPLETE  # one definition of "complete"

TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_complete(root: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None; half-written ones (temp dirs, no marker) are never returned."""
    done = list_complete(root)
    return done[-1] if done else None


class Checkpointer:
    """Saves and restores the trainer's state; every rank calls every method (SPMD)."""

    def __init__(self, root: Path, keep: int, async_save: bool, rank: int, world_size: int,
                 kill_in_save_at: Optional[int] = None):
        self.root = Path(root)
        self.kill_in_save_at = kill_in_save_at  # fault drill (monitor.inject_kill_in_checkpoint)
        self.keep = max(1, keep)
        self.async_save = async_save and world_size >= 1
        self.rank = rank
        self.world_size = world_size
        self._pending: Optional[tuple[Future, Path, Path, dict]] = None
        self.last_stall_s = 0.0
        self.last_saved_step: Optional[int] = None
        # The async writer runs collectives from a background thread: give it its own group so it never
        # interleaves with the training collectives.
        self._pg = dist.new_group(backend="gloo") if dist.is_initialized() and self.async_save else None
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for p in self.root.glob(TMP_PREFIX + "*"):  # leftovers of a save killed halfway
                shutil.rmtree(p, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    def save(self, step: int, backend, trainer_state: dict, rank_state: dict, block: bool = False) -> float:
        """Checkpoint `step`; returns the seconds the training loop was stalled."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if dist.is_initialized():
            dist.barrier()
        torch.save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
        fut = backend.write_state(tmp, asynchronous=self.async_save and not block and backend.supports_async_save,
                                  process_group=self._pg)
        if fut is not None:
            self._pending = (fut, tmp, final, trainer_state)
        else:
            if dist.is_initialized():
                dist.barrier()  # every rank's files are written before rank 0 marks the checkpoint complete
            self._finalize(tmp, final, trainer_state)
        self.last_stall_s = time.perf_counter() - t0
        return self.last_stall_s

    def poll(self) -> None:
        """Finalize an async save whose writes have finished (cheap; call every step)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is written and finalized."""
        if self._pending is None:
            return
        fut, tmp, final, trainer_state = self._pending
        self._pending = None
        fut.result()
        self._finalize(tmp, final, trainer_state)

    def _finalize(self, tmp: Path, final: Path, trainer_state: dict) -> None:
        # DCP's finish step gathers every rank's write results before the coordinator writes .metadata, so once
        # rank 0 is here all shards and rank files are on disk.
        if self.rank == 0:
            if self.kill_in_save_at is not None and trainer_state.get("step") == self.kill_in_save_at:
                os.kill(os.getpid(), signal.SIGKILL)  # fault drill: killed mid-save, shards written, no marker
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
            (tmp / COMPLETE).write_text(json.dumps({"step": trainer_state.get("step"), "time": time.time()}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.last_saved_step = trainer_state.get("step")
            for old in list_complete(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, backend, with_optimizer: bool = True) -> tuple[dict, Optional[dict]]:
        """Restore model (+ optimizer) from `path`; returns (trainer_state, this rank's state or None)."""
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"checkpoint {path} is not complete (no {COMPLETE} marker)")
        backend.read_state(path, with_optimizer, written_by=checkpoint_world_size(path))
        trainer_state = json.loads((path / "trainer.json").read_text())
        rank_file = path / f"rank_{self.rank:05d}.pt"
        rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else None
        return trainer_state, rank_state

    def close(self) -> None:
        self.wait()


def checkpoint_world_size(path: Path) -> int:
    """How many ranks wrote the checkpoint at `path`."""
    return len(list(Path(path).glob("rank_*.pt")))


def load_model_weights(path: Path) -> dict[str, Any]:
    """Model tensors of a checkpoint as a plain dict, without a process group (for evaluation/export); either
    backend's format."""
    import tempfile

    path = Path(path)
    if not (path / ".metadata").is_file() and any(path.glob("*model_states.pt")):  # DeepSpeed's format
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "full.pt"
        dcp_to_torch_save(str(path), str(out))
        full = torch.load(out, weights_only=True)
    return full["model"]
