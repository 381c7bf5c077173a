"""Operations tooling: run directory files, heartbeats, watchdog, stragglers, NaN guard, MLflow tracking, radio-monitor."""
from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from radio_scale.monitoring import rundir
from radio_scale.monitoring.cli import main, ui_command
from radio_scale.monitoring.heartbeat import Heartbeat, read_heartbeats
from radio_scale.monitoring.nan_guard import NanGuard
from radio_scale.monitoring.progress import StepProgress
from radio_scale.monitoring.status import collect_status
from radio_scale.monitoring.stragglers import find_stragglers
from radio_scale.monitoring.watchdog import Watchdog

RADIO_MONITOR = str(Path(sys.executable).parent / "radio-monitor")


# ---------------------------------------------------------------------------------------------- run directory files
def test_events_appended_by_concurrent_processes_stay_whole_lines(tmp_path):
    writer = textwrap.dedent("""
        import sys
        from radio_scale.monitoring.rundir import append_event
        for i in range(150):
            append_event(sys.argv[1], "checkpoint", int(sys.argv[2]), "x" * 5000, i=i)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path), str(r)]) for r in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    lines = (tmp_path / rundir.EVENTS).read_text().splitlines()
    events = [json.loads(line) for line in lines]  # a torn or interleaved line would fail to parse
    assert len(events) == 600
    for r in range(4):
        assert [e["i"] for e in events if e["rank"] == r] == list(range(150))
    assert {e["kind"] for e in events} == {"checkpoint"}


def test_append_event_rejects_an_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown event kind 'oops'"):
        rundir.append_event(tmp_path, "oops", 0, "message")


def test_atomic_json_and_jsonl_tail_stay_strict_json(tmp_path):
    rundir.atomic_write_json(tmp_path / "a.json", {"loss": float("nan"), "ok": 1.5})
    assert json.loads((tmp_path / "a.json").read_text()) == {"loss": None, "ok": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind
    for i in range(100):
        rundir.append_jsonl(tmp_path / "m.jsonl", {"step": i, "pad": "y" * 100})
    tail = rundir.read_jsonl(tmp_path / "m.jsonl", tail_bytes=1000)
    assert tail and tail[-1]["step"] == 99 and len(tail) < 10
    assert [r["step"] for r in tail] == list(range(100 - len(tail), 100))  # the cut first line is dropped


# ---------------------------------------------------------------------------------------------- heartbeats
def test_heartbeats_are_written_every_n_steps_and_on_phase_change(tmp_path):
    hb = Heartbeat(tmp_path, rank=1, every=2)
    assert hb.beat(0, "stage1", loss=2.5, step_time=0.5, phase="train")
    assert not hb.beat(1, "stage1", loss=2.4, step_time=0.5, phase="train")
    assert hb.beat(1, "stage1", loss=2.4, step_time=0.5, phase="checkpoint")  # a phase change is always written
    assert hb.beat(3, "stage1", loss=float("nan"), step_time=0.6, phase="train", group="sam")
    Heartbeat(tmp_path, rank=0).beat(3, "stage1", loss=2.0, step_time=0.4, phase="train")

    beats = read_heartbeats(tmp_path)
    assert [b["rank"] for b in beats] == [0, 1]
    one = beats[1]
    assert (one["step"], one["phase"], one["loss"], one["step_time"], one["group"]) == (3, "train", None, 0.6, "sam")
    assert one["pid"] == os.getpid() and abs(one["time"] - time.time()) < 5
    assert rundir.heartbeat_path(tmp_path, 1).name == "rank_00001.json"


# ---------------------------------------------------------------------------------------------- watchdog
HUNG_CHILD = textwrap.dedent("""
    import sys, threading, time
    from radio_scale.monitoring.watchdog import Watchdog

    wd = Watchdog(sys.argv[1], rank=3, timeouts={"startup": 60, "train": 1.0, "checkpoint": 60})
    wd.phase("train")
    for _ in range(5):
        time.sleep(0.1)
        wd.progress()

    def blocked_in_fake_allreduce():
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()  # never returns: stands for a collective whose peer died

    blocked_in_fake_allreduce()
""")


def test_watchdog_kills_a_rank_hung_in_a_blocking_call_and_leaves_evidence(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HUNG_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 3, proc.stderr
    assert elapsed < 15
    stacks = list((tmp_path / rundir.STACKS_DIR).glob("rank_00003_*.txt"))
    assert len(stacks) == 1
    dump = stacks[0].read_text()
    assert "blocked_in_fake_allreduce" in dump and "phase 'train'" in dump
    marker = json.loads((tmp_path / rundir.HANG_MARKER).read_text())
    assert marker["rank"] == 3 and "train" in marker["reason"]
    (hang,) = [e for e in rundir.read_events(tmp_path) if e["kind"] == "hang"]
    assert hang["rank"] == 3 and hang["phase"] == "train" and 1.0 <= hang["seconds"] < 5
    assert "rank 3 hung in phase 'train'" in proc.stderr


def test_watchdog_stays_quiet_while_progress_is_made_then_fires(tmp_path):
    reports = []
    wd = Watchdog(tmp_path, rank=0, timeouts={"startup": None, "train": 0.6}, on_hang=reports.append, exit_code=None)
    wd.phase("train")
    for _ in range(24):  # 1.2 s of steps, each well inside the timeout
        time.sleep(0.05)
        wd.progress()
    assert reports == [] and not (tmp_path / rundir.HANG_MARKER).exists()
    time.sleep(1.2)
    wd.stop()
    assert len(reports) == 1 and reports[0]["phase"] == "train" and reports[0]["seconds"] > 0.6
    assert (tmp_path / rundir.HANG_MARKER).exists()


def test_checkpoint_phase_gets_its_own_longer_timeout(tmp_path):
    reports = []
    wd = Watchdog(tmp_path, rank=0, timeouts={"startup": None, "train": 0.5, "checkpoint": 3.0},
                  on_hang=reports.append, exit_code=None)
    wd.phase("checkpoint")
    time.sleep(1.2)  # over the train timeout, under the checkpoint one
    assert reports == []
    wd.phase("train")
    time.sleep(1.2)
    wd.stop()
    assert [r["phase"] for r in reports] == ["train"]
    with pytest.raises(ValueError, match="phase 'eval' has no timeout"):
        wd.phase("eval")


# ---------------------------------------------------------------------------------------------- stragglers
def test_stragglers_are_ranks_slower_than_ratio_times_their_groups_median():
    beats = [{"rank": 0, "step_time": 1.0}, {"rank": 1, "step_time": 1.1}, {"rank": 2, "step_time": 0.9},
             {"rank": 3, "step_time": 2.0}, {"rank": 4, "step_time": None}]
    assert find_stragglers(beats, ratio=1.5) == [(3, 2.0, 1.05)]
    assert find_stragglers(beats, ratio=2.0) == []
    # SAM ranks are slower by design: compared among themselves only.
    grouped = [{"rank": r, "step_time": 1.0, "group": "clip"} for r in range(3)] + \
              [{"rank": r, "step_time": 3.0, "group": "sam"} for r in range(3, 6)] + \
              [{"rank": 6, "step_time": 7.0, "group": "sam"}]
    assert find_stragglers(grouped) == [(6, 7.0, 3.0)]


# ---------------------------------------------------------------------------------------------- NaN guard
def test_nan_guard_skips_bad_steps_and_rolls_back_after_k_in_a_row(tmp_path):
    guard = NanGuard(rollback_after=3, run_dir=tmp_path)
    losses = [1.0, math.nan, math.nan, 0.9, math.nan, math.inf, -math.inf, 0.8]
    verdicts = [guard.check(x, step=i) for i, x in enumerate(losses)]
    assert verdicts == ["ok", "skip", "skip", "ok", "skip", "skip", "rollback", "ok"]
    assert (guard.skipped, guard.rollbacks, guard.consecutive) == (5, 1, 0)
    kinds = [e["kind"] for e in rundir.read_events(tmp_path)]
    assert kinds == ["nan_skip"] * 4 + ["nan_rollback"]

    # A resumed job continues a streak where it stopped.
    guard.check(math.nan)
    resumed = NanGuard(rollback_after=3)
    resumed.load_state_dict(guard.state_dict())
    assert [resumed.check(math.nan), resumed.check(math.nan)] == ["skip", "rollback"]
    with pytest.raises(ValueError, match="rollback_after=0"):
        NanGuard(rollback_after=0)


# ---------------------------------------------------------------------------------------------- MLflow tracking
@pytest.fixture(scope="module")
def mlflow_run_dir(tmp_path_factory):
    """One sqlite tracking store for the whole module (creating one costs seconds)."""
    return tmp_path_factory.mktemp("mlflow_run")


def test_requeued_job_continues_the_same_mlflow_run_with_monotonic_steps(mlflow_run_dir):
    from radio_scale.monitoring.tracking import Tracker, read_metric_history

    params = {"optim": {"lr": 1e-3}, "stages": [{"name": "s1", "steps": 10}]}
    first = Tracker(None, mlflow_run_dir, "radio_scale", "smoke")
    run_id = first.start()
    first.log_params(params)
    for step in range(6):
        first.log_metrics({"loss": 10.0 - step, "lr": 1e-3, "grad_norm": None}, step)
    first.end("KILLED")  # preempted after step 5; the last checkpoint was at step 2

    second = Tracker(None, mlflow_run_dir, "radio_scale", "smoke")
    assert second.start(run_id) == run_id
    assert second.log_params(params) == []  # same values again: accepted
    with pytest.warns(UserWarning, match="optim.lr"):
        assert second.log_params({"optim": {"lr": 5e-4}}) == ["optim.lr"]
    logged = [second.log_metrics({"loss": 20.0 - step}, step) for step in range(3, 9)]
    assert logged == [0, 0, 0, 1, 1, 1]  # steps 3..5 were replayed from the checkpoint
    with pytest.raises(ValueError, match="metric 'stage' = 'stage2' at step 9 is not a number"):
        second.log_metrics({"stage": "stage2"}, 9)
    second.end("FINISHED")

    uri = rundir.mlflow_default_uri(mlflow_run_dir)
    history = read_metric_history(uri, run_id, "loss")
    assert [s for s, _ in history] == list(range(9))
    assert [v for _, v in history] == [10, 9, 8, 7, 6, 5, 14, 13, 12]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.tags["changed_param/optim.lr"] == "0.0005"


def test_params_are_flattened_truncated_and_batched(mlflow_run_dir):
    from mlflow.tracking import MlflowClient

    from radio_scale.monitoring.tracking import MAX_PARAM_VALUE, TRUNCATED, Tracker, flatten_params

    nested = {"teachers": {"clip": {"model": "ViT-H-14", "kwargs": "k" * 7000}},
              "stages": [{"name": "s1", "groups": [{"teachers": ["clip", "dino"]}]}],
              "bad key!": 1, **{f"extra.p{i}": i for i in range(150)}}
    flat = flatten_params(nested)
    assert flat["teachers.clip.model"] == "ViT-H-14"
    assert flat["stages.0.groups.0.teachers"] == "['clip', 'dino']"
    assert "bad key_" in flat
    long = flat["teachers.clip.kwargs"]
    assert len(long) == MAX_PARAM_VALUE and long.endswith(TRUNCATED) and long.startswith("kkk")

    tracker = Tracker(None, mlflow_run_dir, "radio_scale", "params")
    run_id = tracker.start()
    tracker.log_params(nested)  # 155 params: more than one MLflow batch
    tracker.end()
    stored = MlflowClient(tracker.uri).get_run(run_id).data.params
    assert stored == flat and len(stored) == 155


def test_system_metrics_and_artifacts_land_in_the_run(mlflow_run_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from radio_scale.monitoring.tracking import Tracker, read_metric_history

    tracker = Tracker(None, mlflow_run_dir, "radio_scale", "system")
    run_id = tracker.start()
    sampler = tracker.system_metrics(node="node-a", every_s=0.3)
    sample = sampler.sample()
    assert 0 <= sample["cpu_percent"] <= 100 * os.cpu_count() and sample["memory_used_gb"] > 0
    time.sleep(1.2)
    note = tmp_path / "plan.json"
    note.write_text("{}")
    tracker.log_artifact(note)
    tracker.end()
    history = read_metric_history(tracker.uri, run_id, "system/node-a/memory_used_gb")
    assert history and all(v > 0 for _, v in history)
    assert [a.path for a in MlflowClient(tracker.uri).list_artifacts(run_id)] == ["plan.json"]
    assert str(mlflow_run_dir.resolve()) in MlflowClient(tracker.uri).get_run(run_id).info.artifact_uri


def test_disabled_tracker_does_nothing(tmp_path):
    from radio_scale.monitoring.tracking import Tracker

    tracker = Tracker(None, tmp_path, "radio_scale", "rank3", enabled=False)
    assert tracker.start("abc") == "abc"
    tracker.log_params({"a": 1})
    assert tracker.log_metrics({"loss": 1.0}, 0) == 0
    assert tracker.system_metrics() is None
    tracker.end()
    assert not (tmp_path / rundir.MLFLOW_DB).exists()


# ---------------------------------------------------------------------------------------------- radio-monitor
@pytest.fixture
def live_run(tmp_path):
    """A run in stage 2 of 2 at step 150/300, 2 s/step, one straggler, a NaN skip, two requeues."""
    now = time.time()
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG).write_text(yaml.safe_dump(
        {"name": "smoke", "monitor": {"hang_timeout_s": 300, "straggler_ratio": 1.5}}))
    rundir.atomic_write_json(run / rundir.PLAN, {"world_size": 4, "stages": [
        {"name": "stage1", "steps": 100, "groups": []}, {"name": "stage2", "steps": 200, "groups": []}]})
    for rank in range(4):
        rundir.atomic_write_json(rundir.heartbeat_path(run, rank), {
            "rank": rank, "host": f"node{rank // 2}", "pid": 1000 + rank, "step": 150, "stage": 1,  # stage index
            "loss": 0.5, "step_time": 3.0 if rank == 2 else 1.0, "phase": "train", "time": now - 5})
    for i, kind in enumerate(["start", "preempt", "requeue", "resume", "nan_skip"]):
        rundir.append_jsonl(run / rundir.EVENTS, {"time": now - 400 + 60 * i, "rank": 0, "kind": kind,
                                                 "message": f"{kind} happened"})
    for step in range(101, 151):
        rundir.append_jsonl(run / rundir.METRICS, {"step": step, "stage": 1, "loss/total": 0.25,
                                                   "images_per_s": 64.0, "step_time": 1.0, "data/skipped": 7,
                                                   "time": now - 2 * (150 - step) - 5})
    for step, complete in ((140, True), (145, False)):  # 145 is being written
        path = rundir.checkpoint_path(run, step)
        path.mkdir(parents=True)
        if complete:
            rundir.atomic_write_json(path / rundir.CHECKPOINT_COMPLETE, {"step": step, "stage": "stage2", "time": now - 30})
    rundir.atomic_write_json(run / rundir.REQUEUES, {"count": 2, "history": []})
    return run


def test_status_table_shows_progress_eta_checkpoint_stragglers_and_alerts(live_run, capsys):
    assert main(["status", str(live_run)]) == 0
    out = capsys.readouterr().out
    assert "running" in out and "stage2 (2/2)" in out
    assert "150/300 (50.0%)" in out
    assert "ETA" in out and "05:00" in out  # 150 steps left at 2 s/step
    assert "step 140" in out and "step 145" not in out
    assert "rank 2 3.00s (3.0x median 1.00s)" in out
    assert "nan_skip happened" in out and "preempt happened" in out
    assert "skipped=7" in out and "node1" in out


def test_status_json_is_machine_readable(live_run, capsys):
    assert main(["status", str(live_run), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["state"], st["step"], st["total_steps"], st["stage_index"]) == ("running", 150, 300, 2)
    assert st["eta_s"] == pytest.approx(300.0)
    assert st["last_checkpoint"]["step"] == 140 and 25 < st["last_checkpoint"]["age_s"] < 60
    assert [s["rank"] for s in st["stragglers"]] == [2]
    assert [a["kind"] for a in st["alerts"]] == ["preempt", "requeue", "nan_skip"]
    assert st["requeues"] == 2 and st["data"] == {"data/skipped": 7} and st["images_per_s"] == 64.0
    assert st["stage"] == "stage2" and st["loss"] == 0.25
    assert [r["rank"] for r in st["ranks"]] == [0, 1, 2, 3]


def test_status_state_follows_markers_heartbeat_age_and_lifecycle_events(live_run):
    now = time.time()
    assert collect_status(live_run, now=now).state == "running"
    assert collect_status(live_run, now=now + 400).state == "stale"  # 300 s watchdog + 60 s grace passed
    rundir.write_marker(live_run, rundir.HANG_MARKER, 3, "rank 3 hung in phase 'train'")
    hung = collect_status(live_run)
    assert hung.state == "hung" and "rank 3" in hung.reason and hung.eta_s is None
    rundir.append_event(live_run, "resume", 0, "requeued job resumed")  # the marker predates the new job
    assert collect_status(live_run).state == "running"
    rundir.append_event(live_run, "finished", 0, "done at step 300")
    assert collect_status(live_run).state == "finished"


def test_status_before_the_first_heartbeat_is_starting_then_stale(tmp_path):
    rundir.atomic_write_json(tmp_path / rundir.PLAN, {"world_size": 2, "stages": [{"name": "s1", "steps": 10}]})
    queued = collect_status(tmp_path)
    assert (queued.state, queued.step, queued.total_steps) == ("starting", None, 10) and "queued" in queued.reason
    rundir.append_event(tmp_path, "start", 0, "job started")
    assert collect_status(tmp_path).state == "starting"
    assert collect_status(tmp_path, now=time.time() + 3600).state == "stale"  # default limit: 600 s + 60 s grace


def test_status_watch_refreshes_until_interrupted(live_run):
    # Ctrl-C as a terminal sends it: SIGINT at its default disposition in the child (a suite started in the
    # background by a non-interactive shell inherits SIGINT ignored, and Python keeps an inherited SIG_IGN)
    proc = subprocess.Popen([RADIO_MONITOR, "status", str(live_run), "--watch", "0.2", "--json"],
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    assert first["step"] == second["step"] == 150 and second["time"] > first["time"]


def test_status_of_a_missing_or_empty_directory_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    proc = subprocess.run([RADIO_MONITOR, "status", str(missing)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"radio-monitor: run directory {missing} does not exist"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["status", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a run directory" in err[0]


def test_ui_serves_the_run_sqlite_store_on_localhost(tmp_path, capsys):
    cmd = ui_command(tmp_path, 5123)
    assert cmd[-9:] == ["ui", "--backend-store-uri", f"sqlite:///{tmp_path.resolve()}/mlflow.db",
                        "--host", "127.0.0.1", "--port", "5123", "--workers", "1"]
    assert Path(cmd[0]).name in ("mlflow", Path(sys.executable).name)
    assert main(["ui", str(tmp_path)]) == 2  # no store yet
    assert "no MLflow store" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- progress bar
def test_progress_bar_only_when_asked_or_on_a_terminal():
    quiet = io.StringIO()
    with StepProgress(total=10, file=quiet) as bar:  # not a terminal: a batch job's log
        bar.update(5, loss=0.5)
    assert not bar.enabled and quiet.getvalue() == ""
    assert not StepProgress(total=10, rank=1, file=quiet).enabled

    shown = io.StringIO()
    with StepProgress(total=10, initial=2, enabled=True, file=shown) as bar:
        bar.update(7, loss=0.25)
    assert "7/10" in shown.getvalue() and "loss=0.25" in shown.getvalue()
