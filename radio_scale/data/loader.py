"""DistillLoader: the training data stream of one rank, with its position (state) and counters (stats)."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from radio_scale.data.shards import DataError, resolve_shards, shards_fingerprint
from radio_scale.data.stream import (
    BAD_DATA_REASONS,
    SHARD_ERROR_REASONS,
    StreamSpec,
    ViewStream,
    fresh_position,
    merge_counters,
)
from radio_scale.data.views import Batch, ViewSpec, student_view

log = logging.getLogger("radio_scale.data")

STATE_VERSION = 1


@dataclass(frozen=True)
class DataStats:
    """Counters summed over this rank's workers (and over earlier runs this one resumed from).

    seen = used + sum(skipped) at every batch boundary; shard_errors count events (an unreadable
    shard, a corrupt tar), not samples; by_shard names the shards behind every skip and error.
    """

    seen: int
    used: int
    skipped: dict[str, int]
    shard_errors: dict[str, int]
    by_shard: dict[str, dict[str, int]]
    batches: int

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat {name: value} for metric logging: `bad_data_metrics` plus the batch count."""
        return {**bad_data_metrics(self.counters(), prefix), f"{prefix}batches": float(self.batches)}

    def counters(self) -> dict:
        """The counters as the plain dict the streams use (see `merge_counters`)."""
        return {"seen": self.seen, "used": self.used, "skipped": dict(self.skipped),
                "shard_errors": dict(self.shard_errors), "by_shard": {k: dict(v) for k, v in self.by_shard.items()}}


def bad_data_metrics(counters: dict, prefix: str = "data/") -> dict[str, float]:
    """Counters -> the metrics the trainer logs, always the same keys in the same order (they are all-reduced).

    `skipped` counts every bad-data event: unusable samples and shard-level failures (an unreadable, empty,
    non-tar, cut-short or duplicate-member shard); `skipped/<reason>` splits it by reason (SAMPLE_SKIP_REASONS
    count samples, SHARD_ERROR_REASONS count events). seen = used + the sample reasons' sum.
    """
    by_reason = {**counters.get("skipped", {}), **counters.get("shard_errors", {})}
    out = {f"{prefix}seen": float(counters.get("seen", 0)), f"{prefix}used": float(counters.get("used", 0)),
           f"{prefix}skipped": float(sum(by_reason.values()))}
    out.update({f"{prefix}skipped/{k}": float(by_reason.get(k, 0)) for k in BAD_DATA_REASONS})
    return out


def is_bad_shard(per_reason: dict, warn_after: int) -> bool:
    """A shard that failed at shard level, or whose skips and errors reached `warn_after`."""
    return any(k in SHARD_ERROR_REASONS for k in per_reason) or sum(per_reason.values()) >= warn_after


def _identity(batch: Batch) -> Batch:  # batches are assembled in the workers already
    return batch


class DistillLoader:
    """An iterator of Batches for one rank; `state_dict()` is its data position, `stats()` its counters.

    Training streams (resampled) never end. Finite streams (resampled=False) end after one pass over
    this rank's shards; iterating again starts a new pass.
    """

    def __init__(self, dataset: ViewStream, num_workers: int, *, bad_shard_warn_after: int,
                 pin_memory: bool, shards_fingerprint: str) -> None:
        self._dataset = dataset
        self._num_workers = num_workers
        self._warn_after = bad_shard_warn_after
        self._pin = pin_memory
        self._fingerprint = shards_fingerprint
        self._streams = [fresh_position() for _ in range(dataset.spec.n_streams)]
        self._base = merge_counters([])  # counts carried over from a resume with another layout
        self._round = 0  # batches since the current layout (re)started: picks the next stream
        self._batches = 0
        self._warned: set[str] = set()  # bad shards already named (log warning + new_bad_shards)
        self._pending: list[tuple[str, dict]] = []  # named, not yet taken by new_bad_shards()
        self.restored = False  # True once a saved position (or a carry) was loaded: its counters continue
        self._it = None

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> "DistillLoader":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._start()
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                self._end_pass()
                raise
            self._streams[batch.meta["stream"]] = batch.meta["position"]
            self._round += 1
            if not batch.meta.get("end"):  # the end marker of a finite stream only updates counters
                break
        self._batches += 1
        self._note_bad_shards(batch.meta["position"]["counters"]["by_shard"])
        return batch

    def _start(self) -> None:
        self._dataset.positions = copy.deepcopy(self._streams)
        # A fresh DataLoader asks worker 0 first: hand worker 0 the stream whose turn it is.
        self._dataset.offset = self._round % self._dataset.spec.n_streams
        workers = self._num_workers
        loader = DataLoader(
            self._dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=self._pin,
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
        )
        self._it = iter(loader)

    def _end_pass(self) -> None:
        self.close()
        self._base = merge_counters([self._base] + [s["counters"] for s in self._streams])
        self._streams = [fresh_position() for _ in self._streams]
        self._round = 0

    def close(self) -> None:
        """Stop the worker processes (the position is kept: the next batch continues the stream)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- position --------------------------------------------------------------------------------

    def _layout(self) -> dict:
        spec = self._dataset.spec
        return {
            "seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size, "streams": spec.n_streams,
            "shuffle_buffer": spec.shuffle_buffer, "shards_per_chunk": spec.shards_per_chunk,
            "resampled": spec.resampled, "shards": self._fingerprint,
        }

    def state_dict(self) -> dict:
        """The data position of this rank (plain data): per-stream (chunk, offset, counters) and layout."""
        return {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "reseed": self._dataset.spec.reseed,
            "round": self._round,
            "batches": self._batches,
            "positions": copy.deepcopy(self._streams),
            "base": copy.deepcopy(self._base),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the same stream if the layout matches, else fresh streams seeded by the resume point."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"data position: unsupported state (version {state.get('version') if isinstance(state, dict) else state!r})")
        self.close()
        self._batches = int(state["batches"])
        self.restored = True
        if state["layout"] == self._layout():
            self._dataset.spec = _with_reseed(self._dataset.spec, int(state["reseed"]))
            self._streams = copy.deepcopy(state["positions"])
            self._base = copy.deepcopy(state["base"])
            self._round = int(state["round"])
            self._mark_known_bad()
            return
        changed = sorted(k for k, v in self._layout().items() if state["layout"].get(k) != v)
        # Another world size / worker count / shard list: the old streams cannot be continued, but
        # replaying from the start would repeat data, so re-seed from the resume point instead.
        reseed = self._batches + 1 + int(state["reseed"])
        log.warning("data position: layout changed (%s); continuing with fresh streams re-seeded at batch %d",
                    ", ".join(changed), self._batches)
        self._dataset.spec = _with_reseed(self._dataset.spec, reseed)
        self._base = merge_counters([state["base"]] + [s["counters"] for s in state["positions"]])
        self._streams = [fresh_position() for _ in self._streams]
        self._round = 0
        self._mark_known_bad()

    def carry(self, counters: dict) -> None:
        """Add counters from before this loader (an earlier stage, or a resume that could not restore the streams).

        They join the loader's base counts, so stats() and state_dict() include them from now on: a run's
        counters are cumulative over its stages and survive every resume.
        """
        self._base = merge_counters([self._base, counters])
        self.restored = True
        self._mark_known_bad()

    # -- counters -------------------------------------------------------------------------------

    def stats(self) -> DataStats:
        """Counters summed over every worker of this rank."""
        total = merge_counters([self._base] + [s["counters"] for s in self._streams])
        return DataStats(total["seen"], total["used"], total["skipped"], total["shard_errors"],
                         total["by_shard"], self._batches)

    def new_bad_shards(self) -> list[tuple[str, dict]]:
        """Bad shards (`is_bad_shard`) seen since the last call, each once: [(shard, {reason: count})]."""
        out, self._pending = self._pending, []
        return out

    def _mark_known_bad(self) -> None:
        """Shards already bad in restored/carried counters were named before (by the run that counted them)."""
        self._pending = []
        self._warned = {url for url, per in self.stats().by_shard.items() if is_bad_shard(per, self._warn_after)}

    def _note_bad_shards(self, by_shard: dict) -> None:
        fresh = [url for url in by_shard if url not in self._warned]
        if not fresh:
            return
        totals = merge_counters([self._base] + [s["counters"] for s in self._streams])["by_shard"]
        for url in fresh:
            per = totals.get(url, {})
            if is_bad_shard(per, self._warn_after):
                self._warned.add(url)
                self._pending.append((url, dict(per)))
                log.warning("data: shard %s is bad (%d errors: %s)", url, sum(per.values()), per)


def _with_reseed(spec: StreamSpec, reseed: int) -> StreamSpec:
    return replace(spec, reseed=reseed)


def build_loader(
    shards: Union[str, Sequence[str]],
    student_res: int,
    teacher_views: Sequence[ViewSpec],
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    crop_scale: Optional[Sequence[float]] = (0.35, 1.0),
    crop_ratio: Sequence[float] = (0.75, 1.3333),
    image_key: str = "jpg;jpeg;png;webp",
    label_key: Optional[str] = "cls",
    position: Optional[dict] = None,
    resampled: bool = True,
    shards_per_chunk: int = 4,
    bad_shard_warn_after: int = 3,
    pin_memory: Optional[bool] = None,
    allow_pipe_in_lists: bool = False,
) -> DistillLoader:
    """The data stream of one rank: student view at student_res plus every teacher view, batch_size per batch.

    crop_scale=None uses the whole image (evaluation); resampled=False makes one finite pass over the
    shards split across ranks and workers. Bad specs raise DataError here, before any training starts.
    """
    shard_list = resolve_shards(shards, allow_pipe_in_lists) if isinstance(shards, str) else list(shards)
    if not shard_list:
        raise DataError("data.shards: empty shard list")
    _check(batch_size >= 1, f"data: batch_size must be >= 1, got {batch_size}")
    _check(world_size >= 1 and 0 <= rank < world_size, f"data: rank {rank} outside world_size {world_size}")
    _check(num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}")
    _check(shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {shuffle_buffer}")
    _check(shards_per_chunk >= 1, f"data.shards_per_chunk must be >= 1, got {shards_per_chunk}")
    _check(bad_shard_warn_after >= 1, f"data.bad_shard_warn_after must be >= 1, got {bad_shard_warn_after}")
    if crop_scale is not None:
        crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        _check(0 < crop_scale[0] <= crop_scale[1] <= 1, f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
    crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
    _check(0 < crop_ratio[0] <= crop_ratio[1], f"data.crop_ratio must satisfy 0 < lo <= hi, got {crop_ratio}")
    image_keys = tuple(k.strip().lower() for k in image_key.split(";") if k.strip())
    _check(bool(image_keys), f"data.image_key names no key: {image_key!r}")
    names = [v.name for v in teacher_views]
    _check("student" not in names, "data: a teacher view may not be called 'student'")
    _check(len(set(names)) == len(names), f"data: duplicate teacher view names {names}")
    spec = StreamSpec(
        shards=tuple(shard_list),
        student=student_view(student_res),
        teacher_views=tuple(teacher_views),
        batch_size=batch_size,
        seed=int(seed),
        rank=rank,
        world_size=world_size,
        n_streams=max(1, num_workers),
        shuffle_buffer=shuffle_buffer,
        shards_per_chunk=shards_per_chunk,
        crop_scale=crop_scale,
        crop_ratio=crop_ratio,
        image_keys=image_keys,
        label_key=label_key or None,
        resampled=resampled,
        reseed=0,
    )
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    loader = DistillLoader(ViewStream(spec), num_workers, bad_shard_warn_after=bad_shard_warn_after,
                           pin_memory=pin, shards_fingerprint=shards_fingerprint(shard_list))
    if position:
        loader.load_state_dict(position)
    return loader


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DataError(message)
