"""The run directory: where every file of a run lives, and the only ways they are written.

```
<run_dir>/config.yaml                     resolved config (trainer writes)
<run_dir>/plan.json                       rank plan (launcher writes): {"world_size", "stages": [{"name","steps","groups"}]}
<run_dir>/heartbeats/rank_00000.json      per-rank heartbeat (atomic replace)
<run_dir>/events.jsonl                    append-only events {"time","rank","kind","message",...}
<run_dir>/bad_shards/<hash>               one file per bad data shard (its name), so it is named in one event per run
<run_dir>/metrics.jsonl                   rank-0 step metrics
<run_dir>/checkpoints/step_000000120/     DCP checkpoints; complete ones hold `.complete` (json: step, stage, time)
<run_dir>/stacks/rank_00003_<time>.txt    faulthandler dumps of a hung rank
<run_dir>/HANG, <run_dir>/FAILED          markers (json: time, rank, reason)
<run_dir>/requeues.json                   {"count": n, "history": [{time, reason, job_id, restart, step, cause}],
                                           "stopped": {...} when a job was not requeued}
<run_dir>/mlflow.db                       default MLflow tracking store (sqlite)
```
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]

CONFIG = "config.yaml"
PLAN = "plan.json"
HEARTBEATS_DIR = "heartbeats"
EVENTS = "events.jsonl"
METRICS = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_COMPLETE = ".complete"
STACKS_DIR = "stacks"
HANG_MARKER = "HANG"
FAILED_MARKER = "FAILED"
REQUEUES = "requeues.json"
BAD_SHARDS_DIR = "bad_shards"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"

EVENT_KINDS = (
    "start", "resume", "requeue", "preempt", "checkpoint", "nan_skip", "nan_rollback",
    "hang", "straggler", "finished", "failed", "bad_shard", "phi_s",
)
# Kinds an operator must look at; the others are the run's normal life.
ALERT_KINDS = ("requeue", "preempt", "nan_skip", "nan_rollback", "hang", "straggler", "failed")


def heartbeat_path(run_dir: PathLike, rank: int) -> Path:
    """The heartbeat file of `rank`."""
    return Path(run_dir) / HEARTBEATS_DIR / f"rank_{rank:05d}.json"


def checkpoint_path(run_dir: PathLike, step: int) -> Path:
    """The checkpoint directory of `step` under the run's default checkpoint root."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:09d}"


def stack_dump_path(run_dir: PathLike, rank: int, when: Optional[float] = None) -> Path:
    """Where a faulthandler dump of `rank` taken at unix time `when` goes."""
    return Path(run_dir) / STACKS_DIR / f"rank_{rank:05d}_{int(time.time() if when is None else when)}.txt"


def mlflow_default_uri(run_dir: PathLike) -> str:
    """The default tracking URI: the sqlite store inside the run directory."""
    return f"sqlite:///{Path(run_dir).resolve() / MLFLOW_DB}"


def json_safe(obj: Any) -> Any:
    """obj with NaN/Inf floats replaced by None, so files stay strict JSON (readable by jq and browsers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write obj as JSON to path so readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and thread: two writers of the same file must not share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), allow_nan=False, default=str))
    os.replace(tmp, path)


def read_json(path: PathLike) -> Optional[Any]:
    """The JSON in path, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def append_jsonl(path: PathLike, record: dict) -> None:
    """Append one JSON line with a single O_APPEND write, so concurrent writers never interleave within a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(json_safe(record), allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # One write(2) of the whole line: O_APPEND makes seek-to-end + write atomic on a local filesystem
        # (not guaranteed on NFS, where a shared events file may interleave under heavy contention).
        written = os.write(fd, data)
        if written != len(data):  # only on a full disk; finish the line rather than leave it torn
            os.write(fd, data[written:])
    finally:
        os.close(fd)


def append_event(run_dir: PathLike, kind: str, rank: int, message: str, **extra: Any) -> dict:
    """Append an event {time, rank, kind, message, host, pid, **extra} to events.jsonl and return it."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind '{kind}' (known: {', '.join(EVENT_KINDS)})")
    record = {"time": time.time(), "rank": rank, "kind": kind, "message": message,
              "host": socket.gethostname(), "pid": os.getpid(), **extra}
    append_jsonl(Path(run_dir) / EVENTS, record)
    return record


def claim_bad_shard(run_dir: PathLike, shard: str) -> bool:
    """True for the first caller, over every rank and every restart of the run, that claims `shard`.

    An exclusive create of <run_dir>/bad_shards/<hash of the name>: the rank that wins names the shard in a
    `bad_shard` event, so each bad shard appears in events.jsonl once however many ranks (and resumes) meet it.
    """
    import hashlib

    folder = Path(run_dir) / BAD_SHARDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / hashlib.sha1(shard.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, shard.encode("utf-8", "surrogateescape") + b"\n")
    finally:
        os.close(fd)
    return True


def read_jsonl(path: PathLike, tail_bytes: Optional[int] = None) -> list[dict]:
    """The records of a JSON-lines file (only those in its last tail_bytes when given); torn lines are skipped."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if tail_bytes is not None:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - tail_bytes))
                data = f.read()
                if size > tail_bytes:  # the first line is probably cut
                    data = data.split(b"\n", 1)[1] if b"\n" in data else b""
            else:
                data = f.read()
    except OSError:
        return []
    records = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written right now, or a crash mid-line
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_events(run_dir: PathLike, tail_bytes: Optional[int] = 1 << 20) -> list[dict]:
    """The events of a run, oldest first (the last MiB of the file by default)."""
    return read_jsonl(Path(run_dir) / EVENTS, tail_bytes)


def complete_checkpoints(root: PathLike) -> list[tuple[Path, dict]]:
    """Complete checkpoints under root as (path, .complete contents), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        marker = p / CHECKPOINT_COMPLETE
        if p.name.startswith("step_") and marker.is_file():
            try:
                step = int(p.name.split("_", 1)[1])
            except ValueError:
                continue
            info = read_json(marker)
            info = info if isinstance(info, dict) else {}
            info.setdefault("step", step)
            info.setdefault("time", marker.stat().st_mtime)
            found.append((step, p, info))
    return [(p, info) for _, p, info in sorted(found, key=lambda t: t[0])]


def write_marker(run_dir: PathLike, name: str, rank: int, reason: str) -> Path:
    """Write the HANG or FAILED marker (json: time, rank, host, pid, reason)."""
    if name not in (HANG_MARKER, FAILED_MARKER):
        raise ValueError(f"unknown marker '{name}' (known: {HANG_MARKER}, {FAILED_MARKER})")
    path = Path(run_dir) / name
    atomic_write_json(path, {"time": time.time(), "rank": rank, "host": socket.gethostname(),
                             "pid": os.getpid(), "reason": reason})
    return path


def progress_step(run_dir: PathLike, checkpoint_root: Optional[PathLike] = None) -> int:
    """How far the run has got: the largest step in the heartbeats, metrics.jsonl and complete checkpoints (0: none).

    Heartbeats and metrics survive a requeue, so a requeued job that fails again before it passes its
    predecessor's step reports the same step: no progress.
    """
    run_dir = Path(run_dir)
    steps = [0]
    folder = run_dir / HEARTBEATS_DIR
    if folder.is_dir():
        for p in folder.glob("rank_*.json"):
            hb = read_json(p)
            if isinstance(hb, dict) and isinstance(hb.get("step"), int):
                steps.append(hb["step"])
    steps += [r["step"] for r in read_jsonl(run_dir / METRICS, tail_bytes=64 * 1024) if isinstance(r.get("step"), int)]
    for root in {Path(checkpoint_root or run_dir / CHECKPOINTS_DIR), run_dir / CHECKPOINTS_DIR}:
        for _, info in complete_checkpoints(root):
            if isinstance(info.get("step"), int):
                steps.append(info["step"])
    return max(steps)


def record_requeue_stopped(run_dir: PathLike, reason: str, **info: Any) -> None:
    """Note in requeues.json that a job was not requeued, and why (read by the other ranks of the same job)."""
    path = Path(run_dir) / REQUEUES
    state = read_json(path)
    if not isinstance(state, dict):
        state = {"count": 0, "history": []}
    state["stopped"] = {"time": time.time(), "reason": reason, **info}
    atomic_write_json(path, state)


def record_requeue(run_dir: PathLike, reason: str, **info: Any) -> int:
    """Count one more requeue in requeues.json (single writer: the launcher) and return the new count."""
    path = Path(run_dir) / REQUEUES
    state = read_json(path)
    if not isinstance(state, dict):
        state = {"count": 0, "history": []}
    state["count"] = int(state.get("count", 0)) + 1
    state.setdefault("history", []).append({"time": time.time(), "reason": reason, **info})
    atomic_write_json(path, state)
    return state["count"]
