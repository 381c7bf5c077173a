"""Deterministic, resumable per-worker sample streams: shards → samples → shuffle → views → batches.

A stream (one per rank and DataLoader worker) is a sequence of *chunks*. Chunk c draws its shards
from a generator seeded by (seed, rank, stream, reseed, c) (with replacement: the stream is infinite),
reads them in order and shuffles their samples through a buffer seeded the same way. The k-th sample of
a chunk gets its crop from a generator seeded by (…, c, k). So (chunk, k) pins the stream down exactly:
resuming replays chunk c's tar bytes without decoding the first k samples and carries on.
"""
from __future__ import annotations

import copy
import logging
import random
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from radio_scale.data.shards import DataError
from radio_scale.data.views import Batch, SampleSkip, ViewSpec, content_fraction, decode_views, stack_view

log = logging.getLogger("radio_scale.data")

SAMPLE_SKIP_REASONS = ("missing_image", "empty_image", "undecodable", "bad_label")
# unreadable_shard: cannot open/read it (missing, permissions, I/O, a failing pipe:); empty_shard: zero bytes;
# not_a_tar: no tar member could be read; corrupt_tar: cut short or corrupt after some members (those are kept);
# duplicate_member: a member repeating a (key, extension) or a key already read in the shard (dropped, first kept)
SHARD_ERROR_REASONS = ("unreadable_shard", "empty_shard", "not_a_tar", "corrupt_tar", "duplicate_member")
BAD_DATA_REASONS = SAMPLE_SKIP_REASONS + SHARD_ERROR_REASONS

# A stream that reads this many chunks in a row without a single sample has no readable shard left.
_EMPTY_CHUNKS_LIMIT = 64
# This many skipped samples in a row with none used means a configuration error (e.g. a wrong image key).
_CONSECUTIVE_SKIPS_LIMIT = 2000


class Counters:
    """Seen / used / skipped counts of one stream, by reason and by shard; plain dicts on the wire."""

    def __init__(self, state: Optional[dict] = None) -> None:
        state = copy.deepcopy(state) if state else {}
        self.seen: int = state.get("seen", 0)
        self.used: int = state.get("used", 0)
        self.skipped: dict[str, int] = state.get("skipped", {})
        self.shard_errors: dict[str, int] = state.get("shard_errors", {})
        self.by_shard: dict[str, dict[str, int]] = state.get("by_shard", {})
        # False while a resumed stream fast-forwards through events the checkpoint already counted.
        self.active = True

    def skip(self, reason: str, shard: str) -> None:
        """Count one unusable sample."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        per = self.by_shard.setdefault(shard, {})
        per[reason] = per.get(reason, 0) + 1

    def shard_error(self, reason: str, shard: str) -> None:
        """Count one shard-level failure (unless fast-forwarding)."""
        if not self.active:
            return
        self.shard_errors[reason] = self.shard_errors.get(reason, 0) + 1
        per = self.by_shard.setdefault(shard, {})
        per[reason] = per.get(reason, 0) + 1

    def as_dict(self) -> dict:
        """A deep copy as plain data (shipped from workers with every batch)."""
        return copy.deepcopy(
            {"seen": self.seen, "used": self.used, "skipped": self.skipped,
             "shard_errors": self.shard_errors, "by_shard": self.by_shard}
        )


def merge_counters(parts: list[dict]) -> dict:
    """Sum counter dicts (from several streams, or a previous layout's total)."""
    total = Counters()
    for p in parts:
        if not p:
            continue
        total.seen += p.get("seen", 0)
        total.used += p.get("used", 0)
        for k, n in p.get("skipped", {}).items():
            total.skipped[k] = total.skipped.get(k, 0) + n
        for k, n in p.get("shard_errors", {}).items():
            total.shard_errors[k] = total.shard_errors.get(k, 0) + n
        for url, per in p.get("by_shard", {}).items():
            mine = total.by_shard.setdefault(url, {})
            for k, n in per.items():
                mine[k] = mine.get(k, 0) + n
    return total.as_dict()


def fresh_position() -> dict:
    """The position of a stream that has delivered nothing."""
    return {"chunk": 0, "offset": 0, "counters": Counters().as_dict()}


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to rebuild its stream (plain data: pickled into worker processes)."""

    shards: tuple[str, ...]
    student: ViewSpec
    teacher_views: tuple[ViewSpec, ...]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    n_streams: int  # max(1, num_workers)
    shuffle_buffer: int
    shards_per_chunk: int
    crop_scale: Optional[tuple[float, float]]
    crop_ratio: tuple[float, float]
    image_keys: tuple[str, ...]
    label_key: Optional[str]
    resampled: bool
    reseed: int  # 0 for a fresh run; the batch count at which an incompatible resume re-seeded


def _entropy(spec: StreamSpec, stream: int, *rest: int) -> list[int]:
    return [spec.seed % (2**63), spec.rank, stream, spec.reseed, *rest]


class _CountingReader:
    """A read-only stream wrapper that counts the bytes read (tells an empty shard from a broken one)."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.bytes = 0

    def read(self, *args) -> bytes:
        data = self._stream.read(*args)
        self.bytes += len(data)
        return data

    def close(self) -> None:
        self._stream.close()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _classify(exn: BaseException, nbytes: int, members: int) -> str:
    if isinstance(exn, OSError) and not isinstance(exn, tarfile.TarError):
        return "unreadable_shard"
    if nbytes == 0:
        return "empty_shard"
    return "not_a_tar" if members == 0 else "corrupt_tar"


def _unique_members(files: Iterator[dict], url: str, counters: Counters, members: list) -> Iterator[dict]:
    """Tar members in order, without repeats (each dropped member counted as duplicate_member).

    webdataset groups adjacent members by key. A (key, extension) seen twice in a row would abort the rest of the
    shard, and a key that comes back after another key would make a second sample with the same key: the first
    copy is kept and the repeats are dropped, so the keys of a shard's samples are unique.
    """
    done: set = set()  # keys whose members are behind us
    current, exts = None, set()
    for f in files:
        members[0] += 1
        name = f.get("fname")
        key, ext = base_plus_ext(name) if isinstance(name, str) else (None, None)
        if key is None:  # not a sample member (webdataset skips it too)
            yield f
            continue
        if key != current:
            if key in done:
                counters.shard_error("duplicate_member", url)
                log.debug("shard %s: member %s repeats key %s, dropped", url, name, key)
                continue
            if current is not None:
                done.add(current)
            current, exts = key, set()
        if ext.lower() in exts:
            counters.shard_error("duplicate_member", url)
            log.debug("shard %s: duplicate member %s dropped", url, name)
            continue
        exts.add(ext.lower())
        yield f


def read_shard(url: str, counters: Counters) -> Iterator[dict]:
    """Raw samples ({"__key__", ext: bytes}) of one shard; read/tar failures are counted, never raised."""
    try:
        stream = _CountingReader(gopen(url, "rb"))
    except Exception as exn:
        counters.shard_error("unreadable_shard", url)
        log.debug("cannot open shard %s: %s", url, exn)
        return

    failed = []
    members = [0]  # tar members read so far

    def stop(exn: BaseException) -> bool:  # webdataset handler: count, then drop the rest of the shard
        failed.append(exn)
        counters.shard_error(_classify(exn, stream.bytes, members[0]), url)
        log.debug("shard %s: %s", url, exn)
        return False

    try:
        files = (dict(f, __url__=url) for f in tar_file_iterator(stream, handler=stop))
        yield from group_by_keys(_unique_members(files, url, counters, members), handler=stop)
    except Exception as exn:  # raised outside webdataset's handlers (tar header / open errors)
        stop(exn)
    finally:
        try:
            stream.close()
        except Exception as exn:  # e.g. a pipe: command that exited non-zero (counted once per shard)
            if not failed:
                counters.shard_error("unreadable_shard", url)
            log.debug("shard %s: %s", url, exn)


def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of `size`, flushing (shuffled) at the end."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class ViewStream(IterableDataset):
    """The IterableDataset behind DistillLoader: each worker runs one deterministic stream of Batches."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec
        self.positions: list[dict] = [fresh_position() for _ in range(spec.n_streams)]
        self.offset = 0  # stream served by worker 0 (round-robin continues across restarts)
        views = [spec.student, *spec.teacher_views]
        self._unique_views = list({v.render_key: v for v in views}.values())

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.spec.n_streams:
            raise DataError(f"data loader: {workers} workers running a layout made for {self.spec.n_streams}")
        stream = (worker + self.offset) % self.spec.n_streams
        return self.batches(stream, self.positions[stream])

    # -- chunks and samples -------------------------------------------------------------------

    def chunk_shards(self, stream: int, chunk: int) -> Optional[list[str]]:
        """Shards of chunk `chunk` of `stream` (None: a finite stream is exhausted)."""
        spec = self.spec
        if spec.resampled:
            rng = np.random.default_rng(_entropy(spec, stream, chunk, 0))
            idx = rng.integers(0, len(spec.shards), size=spec.shards_per_chunk)
            return [spec.shards[i] for i in idx]
        total = spec.world_size * spec.n_streams
        mine = spec.shards[spec.rank * spec.n_streams + stream :: total]
        return [mine[chunk]] if chunk < len(mine) else None

    def samples(self, stream: int, chunk: int, skip: int, counters: Counters) -> Iterator[tuple[int, int, dict]]:
        """(chunk, index in chunk, raw sample) from `chunk` on, the first `skip` samples fast-forwarded."""
        empty_run = 0
        while True:
            shards = self.chunk_shards(stream, chunk)
            if shards is None:
                return
            counters.active = skip == 0
            raw = (s for url in shards for s in read_shard(url, counters))
            shuffle_rng = random.Random(int(np.random.SeedSequence(_entropy(self.spec, stream, chunk, 1)).generate_state(1)[0]))
            k = 0
            for sample in buffer_shuffle(raw, self.spec.shuffle_buffer, shuffle_rng):
                if k < skip:
                    k += 1
                    counters.active = k >= skip  # from here on, events are new
                    continue
                yield chunk, k, sample
                k += 1
            counters.active = True
            empty_run = empty_run + 1 if k == 0 else 0
            if empty_run >= _EMPTY_CHUNKS_LIMIT:
                raise DataError(
                    f"data: no readable sample in {empty_run} chunks of {len(shards)} shards on rank {self.spec.rank} "
                    f"(last tried {shards[-1]}; errors so far {counters.shard_errors})"
                )
            skip = 0
            chunk += 1

    # -- views and batches --------------------------------------------------------------------

    def render(self, sample: dict, rng: np.random.Generator) -> tuple[dict, Optional[int]]:
        """Views {render_key: uint8 HWC} and label of one raw sample; SampleSkip if unusable."""
        data = next((sample[k] for k in self.spec.image_keys if k in sample), None)
        if data is None:
            raise SampleSkip("missing_image")
        label = None
        key = self.spec.label_key
        if key and key in sample:
            try:
                label = int(sample[key].decode().strip())
            except (ValueError, UnicodeDecodeError):
                raise SampleSkip("bad_label") from None
        views = decode_views(data, self._unique_views, self.spec.crop_scale, self.spec.crop_ratio, rng)
        return views, label

    def batches(self, stream: int, position: dict) -> Iterator[Batch]:
        """Batches of `stream` continuing from `position` ({chunk, offset, counters})."""
        spec = self.spec
        counters = Counters(position["counters"])
        rows: list[tuple[str, dict, Optional[int]]] = []
        skipped_in_row = 0
        for chunk, k, sample in self.samples(stream, position["chunk"], position["offset"], counters):
            counters.seen += 1
            url = sample.get("__url__", "?")
            rng = np.random.default_rng(_entropy(spec, stream, chunk, k, 2))
            try:
                views, label = self.render(sample, rng)
            except SampleSkip as skip:
                counters.skip(skip.args[0], url)
                skipped_in_row += 1
                if skipped_in_row >= _CONSECUTIVE_SKIPS_LIMIT:
                    raise DataError(
                        f"data: {skipped_in_row} samples in a row were unusable on rank {spec.rank} "
                        f"(skipped {counters.skipped}; image keys {'/'.join(spec.image_keys)}; last shard {url})"
                    ) from None
                continue
            skipped_in_row = 0
            counters.used += 1
            rows.append((sample["__key__"], views, label))
            if len(rows) == spec.batch_size:
                yield self.collate(rows, stream, {"chunk": chunk, "offset": k + 1, "counters": counters.as_dict()})
                rows = []
        if rows:  # finite streams end with a short batch
            yield self.collate(rows, stream, {"chunk": chunk, "offset": k + 1, "counters": counters.as_dict()})
        # ...and an empty one that only carries the counters of what came after the last sample.
        end = {"chunk": position["chunk"], "offset": 0, "counters": counters.as_dict()}
        yield Batch(torch.empty(0), {}, None, [], {"stream": stream, "position": end, "end": True})

    def collate(self, rows: list, stream: int, position: dict) -> Batch:
        """Stack rows into a Batch whose meta carries the stream position after its last sample."""
        cache: dict[tuple, torch.Tensor] = {}

        def view_tensor(v: ViewSpec) -> torch.Tensor:
            if v.render_key not in cache:
                cache[v.render_key] = stack_view([r[1][v.render_key] for r in rows], v)
            return cache[v.render_key]

        student = view_tensor(self.spec.student)
        teachers = {v.name: view_tensor(v) for v in self.spec.teacher_views}
        labels = [r[2] for r in rows]
        label_t = None if all(x is None for x in labels) else torch.tensor([-1 if x is None else x for x in labels])
        content = {}
        for v in self.spec.teacher_views:
            frac = content_fraction([r[1][v.render_key] for r in rows], v)
            if frac is not None:
                content[v.name] = frac
        return Batch(student, teachers, label_t, [r[0] for r in rows], {"stream": stream, "position": position}, content,
                     views={v.name: v for v in self.spec.teacher_views}, student_view=self.spec.student)
