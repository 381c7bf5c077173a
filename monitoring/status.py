"""What a run is doing, read from its run directory alone (no process, no MLflow): the data of `radio-monitor status`.

State, first match wins:
  finished  the newest lifecycle event (start/resume/finished/failed) is `finished`
  failed    a FAILED marker newer than the last start/resume, or the newest lifecycle event is `failed`
            (the reason is the newer of the two: e.g. "failed twice at step N with no progress, not requeued")
  hung      a HANG marker newer than the last start/resume (a watchdog fired)
  stale     no heartbeat for longer than the phase's watchdog timeout + 60 s: the processes died without a word
  starting  no heartbeat yet: queued, or started less than the startup timeout ago
  running   otherwise

Data: the `data/*` counters of the newest metrics record (cumulative over the run: seen, used, skipped = unusable
samples + shard failures, skipped/<reason>), and the bad shards named in `bad_shard` events (each shard once per
run; the count is the number of files in <run_dir>/bad_shards/).

ETA uses the step rate between the `time` fields of metrics.jsonl records since the last start/resume
(so checkpoint and logging overhead count), else their mean `step_time`, else the heartbeats' median.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .heartbeat import read_heartbeats
from .rundir import (
    ALERT_KINDS, BAD_SHARDS_DIR, CHECKPOINTS_DIR, CONFIG, FAILED_MARKER, HANG_MARKER, METRICS, PLAN, REQUEUES,
    PathLike, complete_checkpoints, read_events, read_json, read_jsonl,
)
from .stragglers import find_stragglers

LIFECYCLE_KINDS = ("start", "resume", "finished", "failed")
STALE_GRACE_S = 60.0
DEFAULT_STALE_S = 600.0
ALERTS_SHOWN = 10
BAD_SHARDS_SHOWN = 5  # in the table
BAD_SHARDS_KEPT = 100  # in RunStatus.bad_shards (--json)
RATE_WINDOW = 50  # metrics records used for the step rate


class RunDirError(Exception):
    """The path is not a readable run directory (one line, naming the path)."""


@dataclass
class RunStatus:
    """A snapshot of one run, JSON-serialisable with to_dict()."""

    run_dir: str
    state: str
    reason: str
    name: Optional[str] = None
    stage: Optional[str] = None
    stage_index: Optional[int] = None  # 1-based
    num_stages: Optional[int] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    world_size: Optional[int] = None
    loss: Optional[float] = None
    images_per_s: Optional[float] = None
    seconds_per_step: Optional[float] = None
    eta_s: Optional[float] = None
    last_checkpoint: Optional[dict] = None  # {step, path, time, age_s}
    requeues: int = 0
    stragglers: list = field(default_factory=list)  # [{rank, step_time, median, ratio}]
    data: dict = field(default_factory=dict)  # data/* counters of the last metrics record
    bad_shard_count: int = 0  # distinct bad shards named so far (over every rank and restart)
    bad_shards: list = field(default_factory=list)  # [{shard, reasons, rank, step, time}] from events, the newest 100
    alerts: list = field(default_factory=list)  # newest last
    ranks: list = field(default_factory=list)  # [{rank, host, pid, step, stage, phase, loss, step_time, age_s, stale}]
    time: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _config(run_dir: Path) -> dict:
    path = run_dir / CONFIG
    if not path.is_file():
        return {}
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _stale_after(cfg: dict, phase: Optional[str]) -> float:
    mon = cfg.get("monitor") if isinstance(cfg.get("monitor"), dict) else {}
    key = {"startup": "startup_timeout_s", "checkpoint": "checkpoint_timeout_s"}.get(phase or "", "hang_timeout_s")
    value = mon.get(key)
    return (float(value) if isinstance(value, (int, float)) else DEFAULT_STALE_S) + STALE_GRACE_S


def _marker_time(path: Path) -> Optional[float]:
    if not path.is_file():
        return None
    info = read_json(path)
    if isinstance(info, dict) and isinstance(info.get("time"), (int, float)):
        return float(info["time"])
    return path.stat().st_mtime


def _stages(run_dir: Path, cfg: dict) -> tuple[list[dict], Optional[int]]:
    plan = read_json(run_dir / PLAN)
    plan = plan if isinstance(plan, dict) else {}
    stages = plan.get("stages") if isinstance(plan.get("stages"), list) else cfg.get("stages")
    out = [{"name": str(s.get("name")), "steps": int(s.get("steps", 0))}
           for s in (stages or []) if isinstance(s, dict)]
    world = plan.get("world_size")
    return out, world if isinstance(world, int) else None


def _seconds_per_step(records: list[dict], since: float) -> Optional[float]:
    recent = [r for r in records if isinstance(r.get("step"), int)][-RATE_WINDOW:]
    timed = [r for r in recent if isinstance(r.get("time"), (int, float)) and r["time"] >= since]
    if len(timed) >= 2 and timed[-1]["step"] > timed[0]["step"] and timed[-1]["time"] > timed[0]["time"]:
        return (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])
    times = [r["step_time"] for r in recent if isinstance(r.get("step_time"), (int, float)) and r["step_time"] > 0]
    return statistics.fmean(times[-20:]) if times else None


def collect_status(run_dir: PathLike, now: Optional[float] = None, stale_after: Optional[float] = None,
                   straggler_ratio: Optional[float] = None) -> RunStatus:
    """Read every file of the run directory into a RunStatus; RunDirError when it is not a run directory."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    if not run_dir.exists():
        raise RunDirError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory")
    cfg = _config(run_dir)
    stages, world = _stages(run_dir, cfg)
    beats = read_heartbeats(run_dir)
    events = read_events(run_dir)
    metrics = read_jsonl(run_dir / METRICS, tail_bytes=256 * 1024)
    if not (cfg or stages or beats or events or metrics):
        raise RunDirError(f"{run_dir} is not a run directory (no {CONFIG}, {PLAN}, heartbeats, events or metrics)")

    last = metrics[-1] if metrics else {}
    lifecycle = [e for e in events if e.get("kind") in LIFECYCLE_KINDS]
    started = max([e.get("time", 0.0) for e in lifecycle if e.get("kind") in ("start", "resume")], default=0.0)

    # Progress: the freshest of heartbeats (every rank, every step) and rank 0's metrics.
    newest = max(beats, key=lambda hb: hb.get("time", 0.0), default=None)
    leader = max(beats, key=lambda hb: hb.get("step", -1), default=None)
    step = leader.get("step") if leader else None
    stage = leader.get("stage") if leader else None
    if isinstance(last.get("step"), int) and (step is None or last["step"] > step):
        step, stage = last["step"], last.get("stage", stage)
    total = sum(s["steps"] for s in stages) or None
    if isinstance(stage, int) and 0 <= stage < len(stages):  # writers may give the stage's index
        stage_index, stage = stage + 1, stages[stage]["name"]
    else:
        stage_index = next((i + 1 for i, s in enumerate(stages) if s["name"] == stage), None)

    # State.
    hang_t, failed_t = _marker_time(run_dir / HANG_MARKER), _marker_time(run_dir / FAILED_MARKER)
    last_kind = lifecycle[-1].get("kind") if lifecycle else None
    hb_age = now - newest.get("time", 0.0) if newest else None
    threshold = stale_after if stale_after is not None else _stale_after(cfg, newest.get("phase") if newest else None)
    if last_kind == "finished" or (beats and all(hb.get("phase") == "finished" for hb in beats)):
        state, reason = "finished", lifecycle[-1].get("message", "") if last_kind == "finished" else "all ranks finished"
    elif (failed_t is not None and failed_t > started) or last_kind == "failed":
        info = read_json(run_dir / FAILED_MARKER)
        state = "failed"
        event = lifecycle[-1] if last_kind == "failed" else None
        if event is not None and (failed_t is None or event.get("time", 0.0) >= failed_t):
            reason = event.get("message", "")  # e.g. why the job was not requeued
        else:
            reason = info.get("reason", "") if isinstance(info, dict) else ""
    elif hang_t is not None and hang_t > started:
        info = read_json(run_dir / HANG_MARKER)
        state, reason = "hung", info.get("reason", "") if isinstance(info, dict) else "HANG marker present"
    elif hb_age is None:
        if not started:
            state, reason = "starting", "no rank has started yet (queued?)"
        elif now - started <= threshold:
            state, reason = "starting", f"started {format_duration(now - started)} ago, no heartbeat yet"
        else:
            state, reason = "stale", f"started {format_duration(now - started)} ago, no heartbeat was ever written"
    elif hb_age > threshold:
        state, reason = "stale", f"no heartbeat for {format_duration(hb_age)} (limit {format_duration(threshold)})"
    else:
        state, reason = "running", f"last heartbeat {format_duration(hb_age)} ago"

    # Speed and ETA.
    per_step = _seconds_per_step(metrics, started)
    if per_step is None:
        times = [hb["step_time"] for hb in beats if isinstance(hb.get("step_time"), (int, float))]
        per_step = statistics.median(times) if times else None
    eta = None
    if total is not None and step is not None and per_step is not None and state in ("running", "starting", "stale"):
        eta = max(0, total - step) * per_step

    ckpt_cfg = cfg.get("checkpoint") if isinstance(cfg.get("checkpoint"), dict) else {}
    ckpts = complete_checkpoints(ckpt_cfg.get("dir") or run_dir / CHECKPOINTS_DIR)
    last_ckpt = None
    if ckpts:
        path, info = ckpts[-1]
        last_ckpt = {"step": info.get("step"), "stage": info.get("stage"), "path": str(path),
                     "time": info.get("time"), "age_s": now - info["time"] if isinstance(info.get("time"), (int, float)) else None}

    bad = [{"shard": e.get("shard"), "reasons": e.get("reasons") if isinstance(e.get("reasons"), dict) else {},
            "rank": e.get("rank"), "step": e.get("step"), "time": e.get("time")}
           for e in events if e.get("kind") == "bad_shard"]
    try:
        bad_count = max(len(bad), sum(1 for _ in (run_dir / BAD_SHARDS_DIR).iterdir()))
    except OSError:
        bad_count = len(bad)

    requeue_info = read_json(run_dir / REQUEUES)
    requeues = int(requeue_info.get("count", 0)) if isinstance(requeue_info, dict) else 0

    mon = cfg.get("monitor") if isinstance(cfg.get("monitor"), dict) else {}
    ratio = straggler_ratio or mon.get("straggler_ratio") or 1.5
    stragglers = [{"rank": r, "step_time": t, "median": m, "ratio": t / m} for r, t, m in find_stragglers(beats, ratio)]

    ranks = []
    for hb in beats:
        age = now - hb.get("time", 0.0)
        limit = stale_after if stale_after is not None else _stale_after(cfg, hb.get("phase"))
        row = {k: hb.get(k) for k in ("rank", "host", "pid", "step", "stage", "phase", "loss", "step_time")}
        ranks.append({**row, "age_s": age, "stale": age > limit})

    return RunStatus(
        run_dir=str(run_dir), state=state, reason=reason, name=cfg.get("name"), stage=stage,
        stage_index=stage_index, num_stages=len(stages) or None, step=step, total_steps=total, world_size=world,
        loss=next((last[k] for k in ("loss", "loss/total") if isinstance(last.get(k), (int, float))),
                  (leader or {}).get("loss")),
        images_per_s=last.get("images_per_s"), seconds_per_step=per_step, eta_s=eta, last_checkpoint=last_ckpt,
        requeues=requeues, stragglers=stragglers,
        data={k: v for k, v in last.items() if k.startswith("data/")},
        bad_shard_count=bad_count, bad_shards=bad[-BAD_SHARDS_KEPT:],
        alerts=[e for e in events if e.get("kind") in ALERT_KINDS][-ALERTS_SHOWN:],
        ranks=ranks, time=now,
    )


def format_duration(seconds: Optional[float]) -> str:
    """Seconds as '2d 03:04:05', '03:04:05', '04:05' or '7s'."""
    if seconds is None:
        return "-"
    s = int(round(max(0.0, seconds)))
    days, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if days:
        return f"{days}d {h:02d}:{m:02d}:{sec:02d}"
    if h:
        return f"{h:02d}:{m:02d}:{sec:02d}"
    if m:
        return f"{m:02d}:{sec:02d}"
    return f"{sec}s"


STATE_STYLE = {"running": "bold green", "starting": "cyan", "finished": "bold blue", "failed": "bold red",
               "hung": "bold red", "stale": "bold yellow"}


def _count(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def render_status(st: RunStatus) -> Any:
    """The status as a rich renderable (overview, alerts, per-rank heartbeats)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    over = Table.grid(padding=(0, 2))
    over.add_column(style="bold")
    over.add_column()
    over.add_row("run", f"{st.name or '-'}  ({st.run_dir})")
    over.add_row("state", Text.assemble((st.state, STATE_STYLE.get(st.state, "")), f"  {st.reason}"))
    stage = st.stage or "-"
    if st.stage_index and st.num_stages:
        stage += f" ({st.stage_index}/{st.num_stages})"
    over.add_row("stage", stage)
    pct = f" ({100 * st.step / st.total_steps:.1f}%)" if st.step is not None and st.total_steps else ""
    over.add_row("step", f"{_num(st.step, 'd')}/{_num(st.total_steps, 'd')}{pct}")
    over.add_row("loss", _num(st.loss, ".4f"))
    over.add_row("speed", f"{_num(st.images_per_s, '.1f')} images/s, {_num(st.seconds_per_step, '.3f')} s/step")
    eta = "-"
    if st.eta_s is not None:
        eta = f"{format_duration(st.eta_s)} (at {time.strftime('%Y-%m-%d %H:%M', time.localtime(st.time + st.eta_s))})"
    over.add_row("ETA", eta)
    ck = st.last_checkpoint
    over.add_row("last checkpoint", f"step {ck['step']}, {format_duration(ck['age_s'])} ago  ({ck['path']})" if ck else "none")
    over.add_row("requeues", str(st.requeues))
    over.add_row("stragglers", ", ".join(f"rank {s['rank']} {s['step_time']:.2f}s ({s['ratio']:.1f}x median "
                                         f"{s['median']:.2f}s)" for s in st.stragglers) or "none")
    over.add_row("data", ", ".join(f"{k.removeprefix('data/')}={_count(v)}" for k, v in st.data.items()
                                   if not (k.startswith("data/skipped/") and v == 0)) or "-")
    if st.bad_shard_count:
        newest = "; ".join(f"{b['shard']} ({', '.join(f'{r} x{n}' for r, n in b['reasons'].items())})"
                           for b in st.bad_shards[-BAD_SHARDS_SHOWN:])
        over.add_row("bad shards", f"{st.bad_shard_count}" + (f", newest: {newest}" if newest else ""))
    else:
        over.add_row("bad shards", "none")
    parts: list = [over]

    if st.alerts:
        alerts = Table(title="alerts (newest last)", title_justify="left", expand=False)
        for col in ("age", "rank", "kind", "message"):
            alerts.add_column(col)
        for e in st.alerts:
            age = format_duration(st.time - e["time"]) if isinstance(e.get("time"), (int, float)) else "-"
            alerts.add_row(age, str(e.get("rank", "-")), Text(str(e.get("kind")), style="red"), str(e.get("message", "")))
        parts.append(alerts)

    if st.ranks:
        ranks = Table(title="ranks (last heartbeat)", title_justify="left", expand=False)
        for col in ("rank", "age", "step", "phase", "loss", "s/step", "host", "pid"):
            ranks.add_column(col, justify="right" if col in ("rank", "step", "loss", "s/step", "pid") else "left")
        for r in st.ranks:
            ranks.add_row(str(r["rank"]), Text(format_duration(r["age_s"]), style="yellow" if r["stale"] else ""),
                          _num(r["step"], "d"), str(r["phase"]), _num(r["loss"], ".4f"), _num(r["step_time"], ".3f"),
                          str(r["host"]), str(r["pid"]))
        parts.append(ranks)
    return Group(*parts)
