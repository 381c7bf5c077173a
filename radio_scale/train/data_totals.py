"""A run's data counters: cumulative over its stages and resumes, and every bad shard named once in the events.

Each stage builds new loaders, and a resume at a stage boundary or at another world size cannot restore the
old streams. `DataTally` carries the counts over in every case, into the new loaders' own counters (their
base, which is part of every checkpoint), so `data/*` metrics never go back:

- a new stage in the same process: the previous stage's totals;
- the first stage of a resumed process whose loaders were not restored from the checkpoint (saved at a stage
  end, or written by another world size): the loader states in that checkpoint's rank files (this rank's own at
  the same world size; all of them, on rank 0, at another), which are exactly the totals at that step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from radio_scale.data.loader import bad_data_metrics
from radio_scale.data.stream import merge_counters
from radio_scale.monitoring.rundir import CHECKPOINT_COMPLETE, append_event, claim_bad_shard

log = logging.getLogger("radio_scale.train")


def loader_state_counters(state: dict) -> dict:
    """The counters a saved loader position holds (its base plus every stream's)."""
    return merge_counters([state.get("base") or {}] + [p.get("counters") or {} for p in state.get("positions", [])])


def checkpoint_data_counters(path: Path, rank: int, world_size: int) -> dict:
    """This rank's share of the data counters saved in checkpoint `path` (see the module docstring)."""
    files = sorted(Path(path).glob("rank_*.pt"))
    if len(files) == world_size:
        files = [f for f in files if f.name == f"rank_{rank:05d}.pt"]
    elif rank != 0:
        return merge_counters([])
    parts = []
    for f in files:
        state = torch.load(f, weights_only=True)
        for saved in (state.get("data") or {}).values():
            parts.append(loader_state_counters(saved))
    return merge_counters(parts)


class DataTally:
    """Per rank: the run's data counters as metrics (`update`, every step) and `bad_shard` events."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, checkpoint_root: Path) -> None:
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.checkpoint_root = Path(checkpoint_root)
        self._stage = None  # the StageRuntime last read
        self._last = merge_counters([])  # its loaders' totals then
        self._extra = merge_counters([])  # a carry with no loader to hold it (a rank without groups)

    def update(self, stage, step: int) -> dict[str, float]:
        """This rank's cumulative counters as metrics (fixed keys: they are all-reduced); names new bad shards."""
        loaders = [stage.loaders[name] for name in sorted(stage.loaders)]
        if stage is not self._stage:
            if self._stage is not None:
                carry = self._last  # a new stage (or a rollback into another one) in this process
            elif step > 0 and not any(getattr(ld, "restored", False) for ld in loaders):
                carry = self._from_checkpoint(step)  # resumed, streams not restored: the checkpoint has the totals
            else:
                carry = None
            if carry and carry.get("seen", 0) + sum(carry.get("shard_errors", {}).values()):
                if loaders and hasattr(loaders[0], "carry"):
                    loaders[0].carry(carry)
                else:
                    self._extra = merge_counters([self._extra, carry])
            self._stage = stage
        totals = merge_counters([ld.stats().counters() for ld in loaders if hasattr(ld, "stats")])
        self._last = merge_counters([totals, self._extra])
        self._name_bad_shards(loaders, step)
        return bad_data_metrics(self._last)

    def _from_checkpoint(self, step: int) -> Optional[dict]:
        from radio_scale.train.checkpoint import step_dir_name

        path = self.checkpoint_root / step_dir_name(step)
        if not (path / CHECKPOINT_COMPLETE).is_file():
            return None
        try:
            return checkpoint_data_counters(path, self.rank, self.world_size)
        except Exception as e:  # counters are worth a warning, never a failed run
            log.warning("rank %d: data counters of %s not carried over (%s)", self.rank, path, e)
            return None

    def _name_bad_shards(self, loaders: list, step: int) -> None:
        for ld in loaders:
            for url, reasons in (ld.new_bad_shards() if hasattr(ld, "new_bad_shards") else []):
                try:
                    if claim_bad_shard(self.run_dir, url):
                        what = ", ".join(f"{k} x{n}" for k, n in sorted(reasons.items()))
                        append_event(self.run_dir, "bad_shard", self.rank, f"bad data shard {url}: {what}",
                                     shard=url, reasons=reasons, step=step + 1)
                except OSError as e:
                    log.warning("rank %d: could not record bad shard %s in the run directory (%s)", self.rank, url, e)
